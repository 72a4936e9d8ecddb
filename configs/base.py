"""Every config key with its default. Variants import this and override.

`get_config(arg)` follows big_vision: `--config configs/forgetmi_10pct.py:smoke` shrinks the
cohort, model and schedule to a run of a couple of minutes on 2 CPU cores.
"""
import ml_collections

# Paper settings of the four Forget-MI loss weights (REFERENCE 4), before normalisation.
LOSS_WEIGHT_PRESETS = {
    'equal': dict(ur=1.0, uu=1.0, mu=1.0, mr=1.0),
    'multimodal': dict(ur=1.0, uu=1.0, mu=2.0, mr=2.0),
    'unimodal': dict(ur=2.0, uu=2.0, mu=1.0, mr=1.0),
    'retention': dict(ur=2.0, uu=1.0, mu=1.0, mr=2.0),
    'no_noise': dict(ur=1.0, uu=1.0, mu=1.0, mr=1.0),
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'forgetmi'
  c.forget_fraction = 0.10
  c.workdir = ''  # default: runs/<config name>
  c.cache_dir = ''  # default: <workdir>/../cache, shared by runs (original, retrained models)

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic' | 'mimic_cxr'
  c.data.image_size = 64
  c.data.max_text_len = 64
  c.data.tokenizer_vocab_size = 2000  # WordPiece trained on the cohort's reports (random-init BERT)
  c.data.split_csv = ''  # synthetic: mirror this split file; mimic_cxr: the edema split file
  c.data.mimic_root = ''  # folder holding files/pXX/... (DICOM, JPG or PNG and sXXXX.txt reports)
  c.data.reports_tsv = ''  # optional reference TSV of normalised reports
  c.data.data_dir = ''  # where the preprocessed array_record dataset is built (default <cache>/tfds)
  c.data.forget_csv = ''  # a user's own forget list (CSV with subject_id); overrides forget_fraction
  c.data.forget_seed = 0
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_subjects = 1663
  c.data.synthetic.severity_signal = -1.0  # <0: generator default
  c.data.synthetic.patient_signal = -1.0
  c.data.synthetic.label_noise = -1.0

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 4
  c.model.image = ml_collections.ConfigDict()
  c.model.image.preset = 'small64'  # 'paper' (2048x2048 exact), 'small64', 'small128'
  c.model.text = ml_collections.ConfigDict()
  c.model.text.pretrained_path = ''  # a BERT checkpoint folder (e.g. SciBERT); '' = random init
  c.model.text.vocab_size = 2000
  c.model.text.hidden_size = 128
  c.model.text.num_hidden_layers = 2
  c.model.text.num_attention_heads = 2
  c.model.text.intermediate_size = 512
  c.model.text.max_position_embeddings = 512
  c.model.text.hidden_dropout_prob = 0.1
  c.model.text.attention_probs_dropout_prob = 0.1
  c.model.fusion = ml_collections.ConfigDict()
  c.model.fusion.variant = 'per_sample'  # 'per_sample' (MAG proper) | 'reference' (public code)
  c.model.fusion.beta = 1.0
  c.model.fusion.eps = 1e-6
  c.model.fusion.dropout_rate = 0.1

  # ------------------------------------------------- original / retrained model training
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 12
  c.train.batch_size = 32
  c.train.lr = 1e-3
  c.train.weight_decay = 0.01
  c.train.ranking_weight = 1.0
  c.train.warmup_steps = 50

  # ---------------------------------------------------------------- unlearning
  c.unlearn = ml_collections.ConfigDict()
  c.unlearn.setting = 'retention'  # key of LOSS_WEIGHT_PRESETS
  # Negative = take the setting's preset; set all four to use your own weights.
  c.unlearn.loss_weights = ml_collections.ConfigDict(dict(ur=-1.0, uu=-1.0, mu=-1.0, mr=-1.0))
  c.unlearn.epochs = 30
  c.unlearn.batch_size = 16  # forget examples per step (and as many retain examples)
  c.unlearn.lr = 1e-4
  c.unlearn.weight_decay = 0.01
  c.unlearn.adam_eps = 1e-6
  c.unlearn.original_train_mode = False  # REFERENCE 8.4 when True (see reference_quirks)
  c.unlearn.cache_original_outputs = True  # reuse the frozen original's outputs (eval mode only)
  c.unlearn.noise = ml_collections.ConfigDict()
  c.unlearn.noise.image_mu = 0.0
  c.unlearn.noise.image_sigma = 0.1
  c.unlearn.noise.num_draws = 1
  c.unlearn.noise.resample_each_epoch = False
  c.unlearn.noise.text_mode = 'char'  # 'char' | 'word' | 'reference' | 'none'
  c.unlearn.noise.text_p = 0.1
  c.unlearn.reference_quirks = ml_collections.ConfigDict()
  c.unlearn.reference_quirks.random_fusion_gates = False  # 8.1: fresh random gates every step
  c.unlearn.reference_quirks.epoch_accumulation = False  # 8.2: one optimiser step per epoch, none in epoch 0
  c.unlearn.reference_quirks.retention_cap = False  # 8.3: cap retention terms at epoch-0 value + 1
  c.unlearn.reference_quirks.original_train_mode = False  # 8.4: frozen original in train mode
  c.unlearn.reference_quirks.replay_retain = False  # 8.7: same retain subset, noise, dropout each epoch
  c.unlearn.reference_quirks.round_weights = False  # weights rounded to 2 decimals like the code

  # ---------------------------------------------------------------- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.head = 'image'  # 'image' | 'joint'
  c.eval.batch_size = 128
  c.eval.mia_per_batch_mean = False  # REFERENCE 8.5 as an extra field when True
  c.eval.mia_seed = 0

  if arg:
    apply_arg(c, arg)
  return c


def apply_arg(c, arg):
  """Named variants after ':' in --config, comma separated (e.g. 'smoke')."""
  for name in str(arg).split(','):
    name = name.strip()
    if not name:
      continue
    if name == 'smoke':
      c.data.synthetic.num_subjects = 80
      c.data.image_size = 32
      c.model.image.preset = 'small32'
      c.data.max_text_len = 32
      c.data.tokenizer_vocab_size = 600
      c.model.text.vocab_size = 600
      c.model.text.hidden_size = 32
      c.model.text.num_hidden_layers = 1
      c.model.text.num_attention_heads = 2
      c.model.text.intermediate_size = 64
      c.model.text.max_position_embeddings = 64
      c.train.epochs = 3
      c.train.batch_size = 16
      c.unlearn.epochs = 2
      c.unlearn.batch_size = 8
    else:
      raise ValueError(f'unknown config variant {name!r} (known: smoke)')
  return c
