"""BERT encoder and checkpoint loading, checked against transformers' PyTorch BertModel."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.models.bert import (BertConfig, BertModel, bert_block_names,
                                      convert_hf_state_dict, from_pretrained,
                                      load_bert_params_into, read_hf_weights)
from tests.helpers import minilm_folder as _minilm_folder

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXTS = ['Mild pulmonary edema, NUMBER.',
         'No acute cardiopulmonary process. Heart size is normal and the lungs are clear; '
         'no pleural effusion or pneumothorax.',
         'Cardiomegaly.']
WORDS = ['mild', 'pulmonary', 'edema', 'no', 'acute', 'heart', 'size', 'is', 'normal', 'and',
         'the', 'lungs', 'are', 'clear', 'number', ',', '.', ';', 'card', '##io', '##megaly']


def _jit_apply(module):
  return jax.jit(lambda p, ids, mask: module.apply({'params': p}, ids, mask, train=False))


def _torch_outputs(folder, enc, cls=None):
  cls = cls or transformers.BertModel
  model = cls.from_pretrained(folder, local_files_only=True).eval()
  if hasattr(model, 'bert'):
    model = model.bert
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc['input_ids']),
                attention_mask=torch.tensor(enc['attention_mask']))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_pretrained_minilm_matches_transformers_pytorch():
  folder = _minilm_folder()
  module, params, tokenizer = from_pretrained(folder)
  assert module.config == BertConfig.from_json(os.path.join(folder, 'config.json'))
  assert module.config.hidden_size == 384 and module.config.num_hidden_layers == 6
  reference_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  enc = tokenizer(TEXTS, padding=True, return_tensors='np')
  ref_enc = reference_tok(TEXTS, padding=True, return_tensors='np')
  np.testing.assert_array_equal(enc['input_ids'], ref_enc['input_ids'])
  np.testing.assert_array_equal(enc['attention_mask'], ref_enc['attention_mask'])
  assert enc['attention_mask'].sum(1).min() < enc['attention_mask'].shape[1]  # real padding
  seq, pooled = _jit_apply(module)(params, jnp.asarray(enc['input_ids']),
                                   jnp.asarray(enc['attention_mask']))
  ref_seq, ref_pooled = _torch_outputs(folder, enc)
  # float32 through 6 layers: values up to ~1.5 differ by up to ~1.1e-4 between the two
  # frameworks' reduction orders (seen once with two processes sharing the 2 cores), so the
  # tolerance scales with the value; a wrong weight mapping differs by O(1).
  np.testing.assert_allclose(seq, ref_seq, atol=1e-4, rtol=1e-4)  # padded positions included
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)


def _write_vocab_tokenizer(folder):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS
  with open(os.path.join(folder, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(vocab) + '\n')
  tok = transformers.BertTokenizerFast(vocab_file=os.path.join(folder, 'vocab.txt'),
                                       do_lower_case=True)
  tok.save_pretrained(folder)
  return len(vocab)


def _tiny_hf_config(vocab_size):
  return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=40, type_vocab_size=2)


@pytest.fixture(scope='module')
def pretraining_folder(tmp_path_factory):
  """A random tiny BertForPreTraining saved by transformers: `bert.` prefix and `cls.*` heads."""
  folder = str(tmp_path_factory.mktemp('tiny_bert'))
  vocab_size = _write_vocab_tokenizer(folder)
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(_tiny_hf_config(vocab_size))
  with torch.no_grad():  # non-trivial LayerNorm and bias values
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return folder


def test_fabricated_prefixed_checkpoint_matches_pytorch(pretraining_folder, caplog):
  names = set(read_hf_weights(pretraining_folder))
  assert any(n.startswith('bert.') for n in names) and any(n.startswith('cls.') for n in names)
  caplog.set_level('INFO', logger='forgetmi_jax.models.bert')
  module, params, tokenizer = from_pretrained(pretraining_folder)
  assert 'cls.' in caplog.text  # the ignored pretraining heads are named in the log
  enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=40, return_tensors='np')
  seq, pooled = _jit_apply(module)(params, jnp.asarray(enc['input_ids']),
                                   jnp.asarray(enc['attention_mask']))
  ref_seq, ref_pooled = _torch_outputs(pretraining_folder, enc, transformers.BertForPreTraining)
  np.testing.assert_allclose(seq, ref_seq, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)


def _state(folder):
  return dict(read_hf_weights(folder))


def test_ignored_keys_are_returned(pretraining_folder):
  state = _state(pretraining_folder)
  config = BertConfig.from_json(pretraining_folder)
  state['bert.embeddings.position_ids'] = np.arange(40)[None]
  _, ignored = convert_hf_state_dict(state, config)
  assert 'embeddings.position_ids' in ignored
  assert ignored and all(n.startswith('cls.') or n.endswith('position_ids') for n in ignored)


def _save_state(folder, state):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(folder, 'model.safetensors'))


def _copy_config(src, dst):
  for name in ('config.json', 'vocab.txt', 'tokenizer.json', 'tokenizer_config.json'):
    if os.path.exists(os.path.join(src, name)):
      with open(os.path.join(src, name), 'rb') as f, open(os.path.join(dst, name), 'wb') as g:
        g.write(f.read())


def test_unknown_key_raises_naming_it(pretraining_folder, tmp_path):
  state = _state(pretraining_folder)
  state['bert.encoder.layer.0.attention.self.extra.weight'] = np.zeros((2, 2), np.float32)
  _copy_config(pretraining_folder, tmp_path)
  _save_state(tmp_path, state)
  with pytest.raises(ValueError, match=r'encoder\.layer\.0\.attention\.self\.extra\.weight'):
    from_pretrained(str(tmp_path))


def test_missing_key_raises_naming_it(pretraining_folder, tmp_path):
  state = _state(pretraining_folder)
  del state['bert.encoder.layer.1.intermediate.dense.bias']
  _copy_config(pretraining_folder, tmp_path)
  _save_state(tmp_path, state)
  with pytest.raises(ValueError, match=r'encoder\.layer\.1\.intermediate\.dense\.bias'):
    from_pretrained(str(tmp_path))


def test_shape_mismatch_raises(pretraining_folder):
  state = _state(pretraining_folder)
  config = BertConfig.from_json(pretraining_folder)
  state['bert.pooler.dense.bias'] = np.zeros((31,), np.float32)
  with pytest.raises(ValueError, match=r'pooler\.dense\.bias.*\(31,\)'):
    convert_hf_state_dict(state, config)


def test_missing_pooler_raises_by_default_or_inits_with_warning(pretraining_folder):
  state = {k: v for k, v in _state(pretraining_folder).items() if 'pooler' not in k}
  config = BertConfig.from_json(pretraining_folder)
  with pytest.raises(ValueError, match=r"pooler\.dense\.weight.*missing_pooler='init'"):
    convert_hf_state_dict(state, config)
  with pytest.warns(UserWarning, match='no pooler'):
    params, _ = convert_hf_state_dict(state, config, missing_pooler='init')
  assert params['pooler']['kernel'].shape == (32, 32)
  assert float(jnp.std(params['pooler']['kernel'])) > 0


def test_other_weight_formats_load_the_same_params(pretraining_folder, tmp_path):
  """pytorch_model.bin (torch.load) and flax_model.msgpack (HF Flax layout) give the same tree
  as safetensors; legacy LayerNorm gamma/beta names are accepted."""
  from flax import serialization
  config = BertConfig.from_json(pretraining_folder)
  state = _state(pretraining_folder)
  expected, _ = convert_hf_state_dict(state, config)

  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _copy_config(pretraining_folder, bin_dir)
  legacy = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                     'LayerNorm.beta'):
            torch.from_numpy(np.array(v)) for k, v in state.items()}
  torch.save(legacy, str(bin_dir / 'pytorch_model.bin'))

  msg_dir = tmp_path / 'msgpack'
  msg_dir.mkdir()
  _copy_config(pretraining_folder, msg_dir)
  tree: dict = {}
  for name, value in state.items():  # HF Flax layout: kernel [in,out], scale, embedding
    *mods, leaf = name.split('.')
    if leaf == 'weight':
      if 'LayerNorm' in mods[-1]:
        leaf = 'scale'
      elif mods[-1].endswith('embeddings'):
        leaf = 'embedding'
      else:
        leaf, value = 'kernel', np.asarray(value).T
    node = tree
    for m in mods:
      node = node.setdefault(m, {})
    node[leaf] = np.asarray(value)
  (msg_dir / 'flax_model.msgpack').write_bytes(serialization.msgpack_serialize(tree))

  for folder in (bin_dir, msg_dir):
    _, params, _ = from_pretrained(str(folder))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)

  # bfloat16 safetensors (numpy has no bfloat16): upcast to float32 on load.
  from safetensors.torch import save_file
  bf_dir = tmp_path / 'bf16'
  bf_dir.mkdir()
  _copy_config(pretraining_folder, bf_dir)
  save_file({k: torch.from_numpy(np.array(v)).bfloat16() if v.dtype == np.float32
             else torch.from_numpy(np.array(v)) for k, v in state.items()},
            str(bf_dir / 'model.safetensors'))
  _, params, _ = from_pretrained(str(bf_dir))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2),
                         params, expected)


def test_no_weights_file_raises(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'hidden_size': 32, 'num_attention_heads': 4}))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    from_pretrained(str(tmp_path))


def test_block_names_match_param_tree():
  config = BertConfig.small(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                            num_attention_heads=2, intermediate_size=32)
  module = BertModel(config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))
  assert set(shapes['params']) == {'embeddings', 'pooler', *bert_block_names(3)}
  assert module.block_names() == ('layer_0', 'layer_1', 'layer_2')


def test_dropout_only_in_train_mode_and_padding_is_masked():
  config = BertConfig.small(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16, hidden_dropout_prob=0.5)
  module = BertModel(config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 10)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 6:].set(0)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), ids, mask)
  run = jax.jit(lambda ids, mask, rng, train: module.apply(
      variables, ids, mask, train=train, rngs={'dropout': rng} if train else {}),
      static_argnums=3)
  seq_a, pool_a = run(ids, mask, jax.random.PRNGKey(1), False)
  seq_b, pool_b = run(ids, mask, jax.random.PRNGKey(2), False)
  np.testing.assert_array_equal(pool_a, pool_b)
  _, pool_t = run(ids, mask, jax.random.PRNGKey(1), True)
  _, pool_t2 = run(ids, mask, jax.random.PRNGKey(2), True)
  assert not np.allclose(pool_t, pool_t2)
  assert np.mean(np.asarray(pool_t) == 0) > 0.2  # pooled output itself is dropped out
  # Changing a padded token does not change the real tokens' outputs.
  seq_c, _ = run(ids.at[1, 8].set(3), mask, jax.random.PRNGKey(1), False)
  np.testing.assert_allclose(seq_c[1, :6], seq_a[1, :6], atol=1e-6)


def test_load_bert_params_into_replaces_subtree_and_checks_shapes():
  config = BertConfig.small(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16,
                            max_position_embeddings=8)
  shapes = jax.eval_shape(lambda: BertModel(config).init(jax.random.PRNGKey(0),
                                                         jnp.ones((1, 4), jnp.int32)))['params']
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ones = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  variables = {'params': {'text_encoder': zeros, 'other': {'w': jnp.zeros(3)}},
               'batch_stats': {'x': jnp.zeros(2)}}
  new = load_bert_params_into(variables, ones)
  assert float(new['params']['text_encoder']['pooler']['kernel'].sum()) == 64.0
  assert new['params']['other'] is variables['params']['other']
  assert float(variables['params']['text_encoder']['pooler']['kernel'].sum()) == 0.0  # no mutation
  bad = dict(ones, pooler={'kernel': jnp.ones((8, 9)), 'bias': jnp.ones(8)})
  with pytest.raises(ValueError, match='pooler/kernel'):
    load_bert_params_into(variables, bad)
  with pytest.raises(ValueError, match='layer_0'):
    load_bert_params_into(variables, {k: v for k, v in ones.items() if k != 'layer_0'})
