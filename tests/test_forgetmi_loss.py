"""Forget-MI losses against a hand computation in numpy, with a toy linear model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from scipy.spatial.distance import pdist

from forgetmi_jax.train.losses import safe_norm
from forgetmi_jax.unlearning.forgetmi import (forgetmi_grads, forgetmi_loss, non_member_spread,
                                              normalised_weights, project_conflict)

TERMS = ('ur', 'uu', 'mu', 'mr')


def _weights(vector):
  return {k: jnp.float32(v) for k, v in zip(TERMS, vector)}


@struct.dataclass
class Out:
  z_uni: jax.Array
  z_joint: jax.Array


def toy_apply(variables, image, input_ids, attention_mask, train=False, rngs=None, mutable=None):
  p = variables['params']
  x = image.reshape(image.shape[0], -1)
  t = input_ids.astype(jnp.float32)
  out = Out(z_uni=jnp.concatenate([x @ p['wi'], t @ p['wt']], -1),
            z_joint=jnp.tanh(x @ p['wj']))
  return (out, {'batch_stats': variables['batch_stats']}) if mutable else out


def _toy_problem():
  """3 forget + 3 retain rows (the third is padding), K=2 noise draws."""
  rng = np.random.default_rng(0)
  params = {'wi': rng.normal(size=(4, 3)).astype(np.float32),
            'wt': rng.normal(size=(5, 2)).astype(np.float32),
            'wj': rng.normal(size=(4, 3)).astype(np.float32)}
  b, k = 3, 2

  def examples(n):
    return {'image': rng.uniform(size=(n, 2, 2, 1)).astype(np.float32),
            'input_ids': rng.integers(0, 9, size=(n, 5)).astype(np.int32),
            'attention_mask': np.ones((n, 5), np.int32), 'mask': np.array([1, 1, 0], np.float32)}
  batch = {'forget': examples(b), 'retain': examples(b)}
  targets = {'forget_uni': rng.normal(size=(k, b, 5)).astype(np.float32),
             'forget_joint': rng.normal(size=(k, b, 3)).astype(np.float32),
             'retain_uni': rng.normal(size=(b, 5)).astype(np.float32),
             'retain_joint': rng.normal(size=(b, 3)).astype(np.float32)}
  w = normalised_weights({'ur': 2, 'uu': 1, 'mu': 1, 'mr': 2})
  hp = {'loss_weights': _weights([w[k] for k in TERMS]),
        'retention_cap': {'ur': jnp.float32(1e30), 'mr': jnp.float32(1e30)}}
  return params, batch, targets, hp


def test_losses_match_hand_computation():
  b = 3
  params, batch, targets, hp = _toy_problem()
  w = np.asarray([hp['loss_weights'][k] for k in TERMS])
  np.testing.assert_allclose(w, [1 / 3, 1 / 6, 1 / 6, 1 / 3], rtol=1e-6)
  total, (_, terms) = forgetmi_loss(params, {}, targets, batch, jax.random.PRNGKey(0), hp,
                                    toy_apply)

  def emb(x):
    flat = x['image'].reshape(b, -1)
    return (np.concatenate([flat @ params['wi'], x['input_ids'] @ params['wt']], -1),
            np.tanh(flat @ params['wj']))
  fu, fj = emb(batch['forget'])
  ru, rj = emb(batch['retain'])
  real = slice(0, 2)  # third row is padding
  uu = -np.mean(np.mean(np.linalg.norm(fu[None] - targets['forget_uni'], axis=-1), 0)[real])
  mu = -np.mean(np.mean(np.linalg.norm(fj[None] - targets['forget_joint'], axis=-1), 0)[real])
  ur = np.mean(np.linalg.norm(ru - targets['retain_uni'], axis=-1)[real])
  mr = np.mean(np.linalg.norm(rj - targets['retain_joint'], axis=-1)[real])
  np.testing.assert_allclose([terms['ur'], terms['uu'], terms['mu'], terms['mr']],
                             [ur, uu, mu, mr], rtol=1e-5)
  np.testing.assert_allclose(total, w @ np.array([ur, uu, mu, mr]), rtol=1e-5)


def test_set_by_set_gradient_equals_joint_gradient():
  """forgetmi_grads (forget set, then retain set) is the gradient of forgetmi_loss."""
  params, batch, targets, hp = _toy_problem()
  args = ({}, targets, batch, jax.random.PRNGKey(0), hp, toy_apply)
  joint, (_, joint_terms) = jax.grad(forgetmi_loss, has_aux=True)(params, *args)
  split, (_, split_terms) = jax.jit(forgetmi_grads, static_argnums=6)(params, *args)
  for name in params:
    assert np.any(np.asarray(joint[name]) != 0)
    np.testing.assert_allclose(split[name], joint[name], rtol=1e-5, atol=1e-6)
  for name in ('loss', 'ur', 'uu', 'mu', 'mr'):
    np.testing.assert_allclose(split_terms[name], joint_terms[name], rtol=1e-6)
  # wi/wt feed both sets' z_uni: each part contributes, so dropping one changes the gradient.
  w = [hp['loss_weights'][k] for k in TERMS]
  only_retain = dict(hp, loss_weights=_weights(np.multiply(w, [1., 0., 0., 1.])))
  g_r = jax.grad(forgetmi_loss, has_aux=True)(params, {}, targets, batch,
                                              jax.random.PRNGKey(0), only_retain, toy_apply)[0]
  assert not np.allclose(g_r['wi'], joint['wi'])
  # REFERENCE 8.3 cap below both retention terms: the retain part gives no gradient at all,
  # while the logged UR/MR values are unchanged.
  capped = dict(hp, retention_cap={'ur': jnp.float32(0), 'mr': jnp.float32(0)})
  only_forget = dict(hp, loss_weights=_weights(np.multiply(w, [0., 1., 1., 0.])))
  g_cap, (_, cap_terms) = forgetmi_grads(params, {}, targets, batch, jax.random.PRNGKey(0),
                                         capped, toy_apply)
  g_f = jax.grad(forgetmi_loss, has_aux=True)(params, {}, targets, batch,
                                              jax.random.PRNGKey(0), only_forget, toy_apply)[0]
  for name in params:
    np.testing.assert_allclose(g_cap[name], g_f[name], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([cap_terms['ur'], cap_terms['mr']],
                             [joint_terms['ur'], joint_terms['mr']], rtol=1e-6)


def test_safe_norm_finite_gradient_at_zero():
  g = jax.grad(lambda x: safe_norm(x))(jnp.zeros(3))
  assert np.all(np.isfinite(g)) and np.all(g == 0)
  np.testing.assert_allclose(safe_norm(jnp.array([3.0, 4.0])), 5.0)


def test_normalised_weights_reject_bad_weights():
  import pytest
  with pytest.raises(ValueError, match='loss weights'):
    normalised_weights({'ur': 0, 'uu': 0, 'mu': 0, 'mr': 0})
  rounded = normalised_weights({'ur': 1, 'uu': 1, 'mu': 2, 'mr': 2}, True)
  np.testing.assert_allclose([rounded[k] for k in TERMS], [0.17, 0.17, 0.33, 0.33])


def test_bounded_forget_terms_and_their_gradient():
  """forget_bound: each sample's distance counts up to the bound, -mean(min(d, bound)); a
  sample past it gives no gradient (beyond the paper; unbounded = the paper)."""
  b = 3
  params, batch, targets, hp = _toy_problem()
  flat = batch['forget']['image'].reshape(b, -1)
  fu = np.concatenate([flat @ params['wi'], batch['forget']['input_ids'] @ params['wt']], -1)
  fj = np.tanh(flat @ params['wj'])
  d_uni = np.mean(np.linalg.norm(fu[None] - targets['forget_uni'], axis=-1), 0)[:2]
  d_joint = np.mean(np.linalg.norm(fj[None] - targets['forget_joint'], axis=-1), 0)[:2]
  bound = {'uu': float(np.mean(d_uni)), 'mu': float(d_joint.max()) + 1.0}  # binds one row
  assert d_uni.min() < bound['uu'] < d_uni.max()
  bounded = dict(hp, forget_bound={k: jnp.float32(v) for k, v in bound.items()})
  _, (_, terms) = forgetmi_loss(params, {}, targets, batch, jax.random.PRNGKey(0), bounded,
                                toy_apply)
  np.testing.assert_allclose(terms['uu'], -np.mean(np.minimum(d_uni, bound['uu'])), rtol=1e-5)
  np.testing.assert_allclose(terms['mu'], -np.mean(d_joint), rtol=1e-5)  # not binding
  # the row past its bound gets no unimodal push: with only UU weighted, the gradient of a
  # parameter that only that row's input feeds is exactly zero
  only_uu = dict(bounded, loss_weights=_weights([0.0, 1.0, 0.0, 0.0]))
  grads, _ = forgetmi_grads(params, {}, targets, batch, jax.random.PRNGKey(0), only_uu,
                            toy_apply)
  far = int(np.argmax(d_uni))
  unbounded, _ = forgetmi_grads(params, {}, targets, batch, jax.random.PRNGKey(0),
                                dict(hp, loss_weights=_weights([0.0, 1.0, 0.0, 0.0])),
                                toy_apply)
  near = 1 - far
  # per-row gradient of d w.r.t. wt is linear in the row's tokens: compare with the near row's
  def row_grad(i):
    g = jax.grad(lambda p: -jnp.linalg.norm(
        jnp.concatenate([flat[i] @ p['wi'], batch['forget']['input_ids'][i] @ p['wt']])[None]
        - targets['forget_uni'][:, i], axis=-1).mean() / 2)(params)
    return g
  np.testing.assert_allclose(grads['wt'], row_grad(near)['wt'], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(unbounded['wt'], row_grad(near)['wt'] + row_grad(far)['wt'],
                             rtol=1e-4, atol=1e-6)


def test_non_member_spread_is_the_mean_pairwise_distance():
  rng = np.random.default_rng(0)
  z_uni, z_joint = rng.normal(size=(7, 4)), rng.normal(size=(7, 3))

  class Source:
    def __len__(self):
      return 7

    def get_batch(self, idx, pad_to=None, text_len=None):
      idx = np.asarray(idx)
      n = pad_to or len(idx)
      pad = np.r_[idx, np.repeat(idx[-1:], n - len(idx))]
      return {'id': pad, 'mask': (np.arange(n) < len(idx)).astype(np.float32),
              'image': np.zeros((n, 1, 1, 1), np.float32),
              'input_ids': np.zeros((n, 2), np.int32),
              'attention_mask': np.ones((n, 2), np.int32), 'label': np.zeros(n, np.int32)}

  def embed(batch):
    ids = batch['forget']['id']
    return {'retain_uni': z_uni[ids], 'retain_joint': z_joint[ids]}
  got = non_member_spread(Source(), np.arange(7), embed, batch_size=3)
  assert got['uu'] == pytest.approx(pdist(z_uni).mean(), rel=1e-9)
  assert got['mu'] == pytest.approx(pdist(z_joint).mean(), rel=1e-9)


def _flat(tree):
  return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)]).astype(np.float64)


def test_project_conflict_matches_the_pcgrad_formula():
  """Conflicting gradients lose their component along g_r (numpy, by hand); agreeing ones and
  strength 0 pass unchanged, bit for bit."""
  g_r = {'a': np.array([1.0, 0.0], np.float32), 'b': np.array([[0.0, 2.0]], np.float32)}
  g_f = {'a': np.array([-3.0, 1.0], np.float32), 'b': np.array([[1.0, -1.0]], np.float32)}
  f, r = _flat(g_f), _flat(g_r)
  dot = f @ r  # -3 - 2 = -5 < 0: a conflict
  assert dot == -5
  out, cos = project_conflict(g_f, g_r, jnp.float32(1.0))
  want = f - dot / (r @ r) * r  # [-2, 1, 1, 1]
  np.testing.assert_allclose(_flat(out), want, rtol=1e-6)
  assert abs(_flat(out) @ r) < 1e-5  # orthogonal to the retain gradient
  np.testing.assert_allclose(cos, dot / np.sqrt((f @ f) * (r @ r)), rtol=1e-6)
  half, _ = project_conflict(g_f, g_r, jnp.float32(0.5))
  np.testing.assert_allclose(_flat(half), f - 0.5 * dot / (r @ r) * r, rtol=1e-6)
  for strength, grads in ((0.0, g_f), (1.0, {'a': -g_f['a'], 'b': -g_f['b']})):
    same, _ = project_conflict(grads, g_r, jnp.float32(strength))
    for k in grads:
      np.testing.assert_array_equal(same[k], grads[k])


def test_forgetmi_grads_projects_the_forget_part_only():
  """With project_conflicts, forgetmi_grads = PCGrad(g_forget, g_retain) + g_retain, each part
  the gradient of the loss with the other part's weights at 0 (computed independently)."""
  params, batch, targets, hp = _toy_problem()
  rng = jax.random.PRNGKey(0)
  w = [hp['loss_weights'][k] for k in TERMS]
  part = {}
  for name, keep in (('forget', [0., 1., 1., 0.]), ('retain', [1., 0., 0., 1.])):
    only = dict(hp, loss_weights=_weights(np.multiply(w, keep)))
    part[name] = _flat(jax.grad(forgetmi_loss, has_aux=True)(params, {}, targets, batch, rng,
                                                             only, toy_apply)[0])
  f, r = part['forget'], part['retain']
  assert f @ r < 0  # this toy problem conflicts, so the projection binds
  grads, (_, metrics) = forgetmi_grads(params, {}, targets, batch, rng,
                                       dict(hp, project_conflicts=jnp.float32(1.0)), toy_apply)
  np.testing.assert_allclose(_flat(grads), f - (f @ r) / (r @ r) * r + r, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics['grad_cos'], (f @ r) / np.sqrt((f @ f) * (r @ r)),
                             rtol=1e-4)
  plain, _ = forgetmi_grads(params, {}, targets, batch, rng,
                            dict(hp, project_conflicts=jnp.float32(0.0)), toy_apply)
  np.testing.assert_allclose(_flat(plain), f + r, rtol=1e-5, atol=1e-6)
