"""Mixed precision by config (`model.dtype`): bfloat16 compute, float32 parameters.

The float32 model is the reference: the bfloat16 model must give the same embeddings, logits,
Forget-MI loss and gradient step within stated tolerances, and must really compute in bfloat16
(its convolutions and matmuls are bfloat16 ops; the heads, norms and softmax are float32).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from forgetmi_jax.models.multimodal import build_model, init_variables

IMAGE, LEN, BATCH = 32, 16, 4
# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %). Measured here: outputs
# differ by 0.5-1 % (relative L2, ||a - b|| / ||b||), the four Forget-MI terms by <= 0.1 %, the
# gradients have cosine 0.999; the tolerances leave 3-10x room.
REL_OUTPUT = 0.03
REL_LOSS = 0.01
MIN_GRAD_COSINE = 0.99


def _model_cfg(dtype=None):
  cfg = {'image': {'preset': '', 'stem_channels': 8, 'stem_kernel': 3, 'stem_stride': 2,
                   'stage_channels': (8, 16), 'blocks_per_stage': 1, 'pool': 'adaptive',
                   'pool_grid': 2},
         'text': {'vocab_size': 100, 'hidden_size': 32, 'num_hidden_layers': 2,
                  'num_attention_heads': 2, 'intermediate_size': 64,
                  'max_position_embeddings': 32, 'hidden_dropout_prob': 0.0,
                  'attention_probs_dropout_prob': 0.0},
         'fusion': {'dropout_rate': 0.0}}
  if dtype is not None:
    cfg['dtype'] = dtype
  return cfg


def _batch(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, LEN + 1, BATCH)
  mask = (np.arange(LEN)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, 100, (BATCH, LEN)).astype(np.int32) * mask
  return {'image': jnp.asarray(rng.uniform(size=(BATCH, IMAGE, IMAGE, 1)), jnp.float32),
          'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask),
          'label': jnp.asarray(rng.integers(0, 4, BATCH), jnp.int32)}


@pytest.fixture(scope='module')
def setup():
  m32, _, _ = build_model(_model_cfg())
  m16, _, _ = build_model(_model_cfg('bfloat16'))
  v = init_variables(m32, jax.random.PRNGKey(0), IMAGE, LEN)
  return m32, m16, v


def _compile(fn, *args):
  """fn jitted and compiled for args' shapes; on CPU with LLVM optimisation off (each program
  runs once or twice, so compile time is what a test pays; the arithmetic is the same)."""
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _run(fn, *args):
  return _compile(fn, *args)(*args)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _apply(model, variables, x, train):
  args = (x['image'], x['input_ids'], x['attention_mask'])
  if train:
    out, _ = model.apply(variables, *args, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.PRNGKey(1)})
    return out
  return model.apply(variables, *args, train=False)


def test_build_model_reads_and_validates_dtype():
  m_default, _, _ = build_model(_model_cfg())
  m32, _, _ = build_model(_model_cfg('float32'))
  m16, _, _ = build_model(_model_cfg('bfloat16'))
  assert m_default.dtype is jnp.float32 and m32.dtype is jnp.float32
  assert m16.dtype is jnp.bfloat16
  assert m32 == m_default and hash(m32) == hash(m_default)  # same jit cache entries
  for bad in ('float16', 'fp32', 32, None):
    with pytest.raises(ValueError, match='model.dtype'):
      build_model(dict(_model_cfg(), dtype=bad))


def test_params_stay_float32(setup):
  m32, m16, v = setup
  images = jnp.zeros((2, IMAGE, IMAGE, 1))
  ids = jnp.zeros((2, LEN), jnp.int32)
  v16 = jax.eval_shape(lambda: m16.init(jax.random.PRNGKey(0), images, ids, ids, train=False))
  for tree in (v, v16):
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(tree)}
    assert dtypes == {jnp.dtype(jnp.float32)}
  assert (jax.tree_util.tree_structure(v16['params'])
          == jax.tree_util.tree_structure(v['params']))


def _op_dtypes(model, variables, x):
  """Result dtypes of every convolution and matmul in the traced forward."""
  text = str(jax.make_jaxpr(lambda v: _apply(model, v, x, train=True))(variables))
  found = re.findall(r':(\w+)\[[^\]]*\] = (conv_general_dilated|dot_general)\b', text)
  return [d for d, _ in found if _ == 'conv_general_dilated'], \
      [d for d, op in found if op == 'dot_general']


def test_bfloat16_really_computes_in_bfloat16(setup):
  m32, m16, v = setup
  x = _batch(0)
  convs, dots = _op_dtypes(m16, v, x)
  assert convs and set(convs) == {'bf16'}
  # Every matmul is bfloat16 except the three 4-class heads (float32 on purpose).
  assert dots.count('f32') == 3 and dots.count('bf16') == len(dots) - 3 > 10
  convs32, dots32 = _op_dtypes(m32, v, x)
  assert set(convs32) == set(dots32) == {'f32'}


@pytest.mark.parametrize('train', [False, True])
def test_forward_matches_float32(setup, train):
  m32, m16, v = setup
  x = _batch(1)
  o32, o16 = (_run(lambda v, x: _apply(m, v, x, train), v, x) for m in (m32, m16))
  for name in ('z_img', 'z_txt', 'z_uni', 'z_joint', 'logits_img', 'logits_txt',
               'logits_joint'):
    a, b = getattr(o16, name), getattr(o32, name)
    assert a.dtype == jnp.float32, name
    err = _rel(a, b)
    assert 0 < err < REL_OUTPUT, (name, err)  # > 0: the bfloat16 path really ran


def _forgetmi_terms(model, params, stats, original, batch):
  """The four Forget-MI terms (REFERENCE 4), written here from the formulas: per-sample
  Euclidean distances between f_u's and f_o's unimodal / joint embeddings. Two compiled
  forwards (train mode for f_u, eval mode for f_o), each used on two sets."""
  unlearned = {'params': params, 'batch_stats': stats}
  train = _compile(lambda v, x: _apply(model, v, x, True), unlearned, batch['forget'])
  frozen = _compile(lambda v, x: _apply(model, v, x, False), original, batch['retain'])

  def d(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sqrt(np.sum(np.square(a - b), axis=-1))))
  u_f, u_r = train(unlearned, batch['forget']), train(unlearned, batch['retain'])
  o_n, o_r = frozen(original, batch['noisy']), frozen(original, batch['retain'])
  assert u_f.z_uni.dtype == o_n.z_joint.dtype == jnp.float32
  return np.array([d(u_r.z_uni, o_r.z_uni), -d(u_f.z_uni, o_n.z_uni),
                   -d(u_f.z_joint, o_n.z_joint), d(u_r.z_joint, o_r.z_joint)])


def _unlearning_batch():
  forget, retain = _batch(2), _batch(3)
  noise = np.random.default_rng(5).normal(0, 0.1, forget['image'].shape).astype(np.float32)
  noisy = dict(forget, image=jnp.clip(forget['image'] + noise, 0.0, 1.0))
  return {'forget': forget, 'retain': retain, 'noisy': noisy}


def _perturbed(params, scale=0.05):
  """A model that is not the original, so every distance is well above zero (numpy draws:
  eager jax.random would compile once per parameter shape)."""
  rng = np.random.default_rng(9)
  return jax.tree_util.tree_map(
      lambda p: p + scale * np.std(p) * rng.standard_normal(p.shape).astype(np.float32)
      if p.size > 1 else p, params)


def test_forgetmi_loss_matches_float32(setup):
  m32, m16, v = setup
  batch = _unlearning_batch()
  params = _perturbed(v['params'])
  t32, t16 = (_forgetmi_terms(m, params, v['batch_stats'], v, batch) for m in (m32, m16))
  assert np.all(np.abs(t32) > 0.1)  # distances well away from 0
  np.testing.assert_allclose(t16, t32, rtol=REL_LOSS)  # UR, UU, MU, MR
  for w in ([0.25] * 4, [0.17, 0.17, 0.33, 0.33]):  # equal and multimodal weights
    total32, total16 = np.dot(w, t32), np.dot(w, t16)
    assert abs(total16 - total32) <= REL_LOSS * np.dot(w, np.abs(t32))
    assert total16 != total32


def _step_loss(model, params, stats, batch, target):
  """Self-contained training loss: image-head CE plus distance of z_uni to a fixed target."""
  out, _ = model.apply({'params': params, 'batch_stats': stats}, batch['image'],
                       batch['input_ids'], batch['attention_mask'], train=True,
                       mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(1)})
  ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_img, batch['label'])
  dist = jnp.sqrt(jnp.sum(jnp.square(out.z_uni - target), axis=-1))
  return jnp.mean(ce) + jnp.mean(dist)


def test_gradient_step_matches_float32(setup):
  m32, m16, v = setup
  batch = _batch(4)
  target = np.random.default_rng(7).standard_normal((BATCH, 2 * 32)).astype(np.float32)
  tx = optax.adamw(1e-3, eps=1e-6, weight_decay=0.01)
  # One AdamW step from a fresh state; compiled once, shared by both dtypes (same shapes).
  adamw_step = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))

  def one_step(model):
    grad_fn = _compile(jax.value_and_grad(lambda p, *a: _step_loss(model, p, *a)),
                       v['params'], v['batch_stats'], batch, target)
    loss, grads = grad_fn(v['params'], v['batch_stats'], batch, target)
    new = adamw_step(grads, v['params'])
    after, _ = grad_fn(new, v['batch_stats'], batch, target)  # same compiled program
    return loss, grads, new, after

  l32, g32, p32, after32 = one_step(m32)
  l16, g16, p16, after16 = one_step(m16)
  assert abs(float(l16) - float(l32)) < REL_LOSS * abs(float(l32))
  assert float(after16) < float(l16) and float(after32) < float(l32)  # both steps descend
  flat32 = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g32)])
  flat16 = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g16)])
  cos = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cos > MIN_GRAD_COSINE, cos
  assert abs(np.linalg.norm(flat16) / np.linalg.norm(flat32) - 1) < REL_OUTPUT
  for tree in (g16, p16, p32):
    assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.float32)}
  # Per-leaf: every parameter tensor's gradient points the same way in both dtypes.
  for name, a, b in zip(jax.tree_util.tree_leaves_with_path(g16),
                        jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)):
    a, b = np.ravel(a), np.ravel(b)
    if np.linalg.norm(b) > 1e-6:
      assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9, name[0]
