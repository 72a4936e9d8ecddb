"""What the step benchmarks share: sizes, models, synthetic step batches, realistic report
lengths, and the one adapter to the package's Forget-MI step (`package_step`: the only place
that calls forgetmi_jax.unlearning.forgetmi, so an API change is fixed here once).
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# REFERENCE 9's sizes. The image encoder is the paper's 7-stage ResNet at every size (what the
# public code runs; adaptive 2x2 pooling, equal to the paper's fixed pool at 2048 px) unless
# arch='presets' picks the project's per-size presets instead.
SIZES = {
    'tiny': dict(image=64, preset='small64', layers=2, hidden=128, heads=2, ffn=512, tokens=32,
                 vocab=30522),
    'mid': dict(image=512, preset='mid512', layers=4, hidden=256, heads=4, ffn=1024, tokens=128,
                vocab=30522),
    'paper': dict(image=2048, preset='paper', layers=12, hidden=768, heads=12, ffn=3072,
                  tokens=320, vocab=31090),
}
PAPER7 = dict(stem_channels=8, stem_kernel=7, stem_stride=4,
              stage_channels=(8, 16, 32, 64, 128, 192, 192), blocks_per_stage=2,
              pool='adaptive', pool_grid=2, embed_dim=None)
MID512 = dict(stem_channels=8, stem_kernel=7, stem_stride=4,
              stage_channels=(16, 32, 64, 128, 192), blocks_per_stage=2, pool='adaptive',
              pool_grid=2, embed_dim=None)


def image_kwargs(size, arch='paper7'):
  from forgetmi_jax.models.resnet import resnet_preset
  s = SIZES[size]
  if arch == 'paper7':
    return dict(PAPER7, pool='fixed') if size == 'paper' else dict(PAPER7)
  if arch == 'presets':
    return dict(MID512) if s['preset'] == 'mid512' else resnet_preset(s['preset'])
  raise ValueError(f"arch must be 'paper7' or 'presets', got {arch!r}")


def text_config(size, dropout=True):
  s = SIZES[size]
  p = 0.1 if dropout else 0.0
  return dict(vocab_size=s['vocab'], hidden_size=s['hidden'], num_hidden_layers=s['layers'],
              num_attention_heads=s['heads'], intermediate_size=s['ffn'],
              max_position_embeddings=max(512, s['tokens']), hidden_dropout_prob=p,
              attention_probs_dropout_prob=p)


def model_config(size, dtype='float32', arch='paper7', dropout=True):
  """A `model` config for forgetmi_jax.models.build_model."""
  return {'image': dict(image_kwargs(size, arch), preset=''), 'text': text_config(size, dropout),
          'fusion': {'dropout_rate': 0.1 if dropout else 0.0}, 'dtype': dtype}


def jax_model(size, dtype='float32', arch='paper7', dropout=True):
  from forgetmi_jax.models.multimodal import build_model, init_variables
  model, _, _ = build_model(model_config(size, dtype, arch, dropout))
  return model, (lambda: init_variables(model, jax.random.PRNGKey(0), SIZES[size]['image'],
                                        SIZES[size]['tokens']))


def torch_model(size, arch='paper7', dropout=True):
  from benchmarks.torch_step import MultimodalModel
  p = 0.1 if dropout else 0.0
  return MultimodalModel(image_kwargs(size, arch), text_config(size, dropout), fusion_dropout=p)


# ------------------------------------------------------------------------------------ text
def synthetic_report_lengths(num_subjects=300, seed=0):
  """Token lengths (untruncated, with [CLS]/[SEP]) of the synthetic cohort's reports under the
  default config's tokenizer (WordPiece, 2,000 words): the 'realistic' text of the tables."""
  import tempfile

  from forgetmi_jax.data.synthetic import make_synthetic_cohort
  from forgetmi_jax.data.tokenizer import train_wordpiece_tokenizer
  cohort = make_synthetic_cohort(seed=seed, image_size=16, num_subjects=num_subjects,
                                 lazy_images=True)
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_wordpiece_tokenizer(sorted(set(cohort.reports)), 2000,
                                    os.path.join(tmp, 'tok'))
    enc = tok(list(cohort.reports), truncation=False)
  return np.array([len(x) for x in enc['input_ids']], np.int64)


def describe_lengths(lengths):
  q = np.percentile(lengths, [10, 50, 90, 100])
  return (f'{len(lengths)} synthetic reports: median {q[1]:.0f}, p10 {q[0]:.0f}, '
          f'p90 {q[2]:.0f}, max {q[3]:.0f} tokens')


def _text(rng, batch, max_len, lengths, vocab):
  n = np.full(batch, max_len) if lengths is None else np.minimum(
      rng.choice(lengths, batch), max_len)
  mask = (np.arange(max_len)[None] < n[:, None]).astype(np.int32)
  ids = rng.integers(5, min(vocab, 1000), (batch, max_len)).astype(np.int32) * mask
  return ids, mask


def step_batch(size, batch, lengths=None, seed=0):
  """A numpy Forget-MI step batch: forget, retain, forget_noisy (K=1). `lengths`: sample the
  reports' lengths from it (truncated at the size's max), else every position is real."""
  s = SIZES[size]
  rng = np.random.default_rng(seed)

  def examples(offset):
    ids, mask = _text(rng, batch, s['tokens'], lengths, s['vocab'])
    return {'image': rng.uniform(size=(batch, s['image'], s['image'], 1)).astype(np.float32),
            'input_ids': ids, 'attention_mask': mask,
            'label': rng.integers(0, 4, batch).astype(np.int32),
            'id': np.arange(offset, offset + batch, dtype=np.int32),
            'mask': np.ones(batch, np.float32)}
  forget = examples(0)
  return {'forget': forget, 'retain': examples(batch),
          'forget_noisy': {'input_ids': forget['input_ids'][None],
                           'attention_mask': forget['attention_mask'][None]}}


# ---------------------------------------------------------------------- the package's step
def package_step(model, variables, lr=1e-4):
  """The package's Forget-MI step. Returns (step, state, hparams, add_targets):
  step(state, original, batch, rng, hparams) -> (state, metrics), jitted; add_targets(batch)
  -> batch with the frozen original's outputs cached in batch['targets'] (the 'cached' path).

  Calls: unlearning.forgetmi.{make_grads_fn, forget_targets, retain_targets, TERMS, NO_CAP},
  train.optim.{adamw, prefix_mask, HEAD_NAMES}, train.state.TrainState.{create,
  apply_gradients}.
  """
  from forgetmi_jax.train import optim
  from forgetmi_jax.train.state import TrainState
  from forgetmi_jax.unlearning import forgetmi as fm
  tx = optim.adamw(lr, frozen_mask=optim.prefix_mask(variables['params'], optim.HEAD_NAMES))
  state = TrainState.create(variables, tx)
  grads_fn = fm.make_grads_fn(model.apply, num_draws=1)

  @jax.jit
  def step(state, original, batch, rng, hp):
    grads, stats, metrics = grads_fn(state, original, batch, rng, hp)
    return state.apply_gradients(grads, batch_stats=stats), metrics
  step.grads = jax.jit(grads_fn)  # (state, original, batch, rng, hp) -> (grads, stats, metrics)

  hp = {'loss_weights': {k: jnp.float32(0.25) for k in fm.TERMS},
        'retention_cap': {'ur': jnp.float32(fm.NO_CAP), 'mr': jnp.float32(fm.NO_CAP)},
        'noise_mu': jnp.float32(0.0), 'noise_sigma': jnp.float32(0.1),
        'noise_key': jax.random.PRNGKey(2), 'epoch': jnp.int32(0),
        'target_index': jnp.int32(0)}

  @jax.jit
  def _targets(original, batch):
    t = fm.forget_targets(model.apply, original, batch, hp, num_draws=1, no_noise=False,
                          resample_noise=False)
    t.update(fm.retain_targets(model.apply, original, batch['retain']))
    return t

  def add_targets(batch):
    t = {k: np.asarray(v) for k, v in _targets(variables, batch).items()}
    for k in ('forget_uni', 'forget_joint'):  # [K, B, D] -> batch-first [B, T=1, K, D]
      t[k] = np.swapaxes(t[k], 0, 1)[:, None]
    return dict(batch, targets=t)
  return step, state, hp, add_targets


def xla_cost(compiled):
  """(FLOPs, planned bytes) of a compiled program (None where the backend does not say)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else None
  mem = compiled.memory_analysis()
  plan = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                   + mem.output_size_in_bytes)
  return flops, plan
