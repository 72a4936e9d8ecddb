"""Forget-MI losses against a hand computation in numpy, with a toy linear model."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from forgetmi_jax.train.losses import safe_norm
from forgetmi_jax.unlearning.forgetmi import forgetmi_grads, forgetmi_loss, normalised_weights

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
