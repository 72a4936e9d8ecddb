"""MAG fusion: a hand-worked numpy forward, the alpha cap, and batch (in)dependence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.models.fusion import MAG

D_IMG, D_TXT = 6, 4


def _inputs(batch=5, seed=0, img_scale=1.0):
  rng = np.random.default_rng(seed)
  z_img = (img_scale * rng.normal(size=(batch, D_IMG))).astype(np.float32)
  z_txt = rng.normal(size=(batch, D_TXT)).astype(np.float32)
  return jnp.asarray(z_img), jnp.asarray(z_txt)


def _init(variant, **kw):
  mag = MAG(variant=variant, **kw)
  z_img, z_txt = _inputs()
  variables = jax.jit(lambda k: mag.init(k, z_img, z_txt, train=False))(jax.random.PRNGKey(0))
  return mag, variables


def _numpy_mag(p, z_img, z_txt, variant, beta=1.0, eps=1e-6, ln_eps=1e-5):
  """Independent numpy version of the MAG formulas (REFERENCE 3)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  z_img, z_txt = np.asarray(z_img, np.float64), np.asarray(z_txt, np.float64)
  g = 1 / (1 + np.exp(-(np.concatenate([z_img, z_txt], 1) @ p['gate']['kernel']
                        + p['gate']['bias'])))
  h = np.concatenate([z_img, g * z_txt], 1) @ p['displacement']['kernel'] + p['displacement']['bias']
  if variant == 'per_sample':
    ratio = np.linalg.norm(z_img, axis=1, keepdims=True) / (
        np.linalg.norm(h, axis=1, keepdims=True) + eps)
  else:
    beta = p['beta'][0]
    ratio = np.full((len(z_img), 1), np.linalg.norm(z_img) / (np.linalg.norm(h) + eps))
  alpha = np.minimum(beta * ratio, 1.0)
  x = z_img + alpha * h
  mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
  out = (x - mu) / np.sqrt(var + ln_eps) * p['layer_norm']['scale'] + p['layer_norm']['bias']
  return out, alpha


@pytest.mark.parametrize('variant,beta', [('per_sample', 1.0), ('per_sample', 0.3),
                                          ('reference', None)])
def test_forward_matches_hand_computation(variant, beta):
  kw = {} if beta is None else {'beta': beta}
  mag, variables = _init(variant, **kw)
  if variant == 'reference':
    assert variables['params']['beta'].shape == (1,)
  # Small images so that alpha < 1 for some rows and the norm ratio really matters.
  z_img, z_txt = _inputs(seed=1, img_scale=0.05)
  out, alpha = jax.jit(lambda v, a, b: mag.apply(v, a, b, train=False, return_alpha=True))(
      variables, z_img, z_txt)
  ref_out, ref_alpha = _numpy_mag(variables['params'], z_img, z_txt, variant,
                                  beta=1.0 if beta is None else beta)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  if variant == 'per_sample':
    assert np.any(np.asarray(alpha) < 1.0)


@pytest.mark.parametrize('variant', ['per_sample', 'reference'])
def test_alpha_never_exceeds_one(variant):
  mag, variables = _init(variant, beta=50.0) if variant == 'per_sample' else _init(variant)
  if variant == 'reference':  # a large learnable beta must still be capped
    variables = {'params': {**variables['params'], 'beta': jnp.array([50.0])}}
  run = jax.jit(lambda a, b: mag.apply(variables, a, b, train=False, return_alpha=True)[1])
  alphas = {}
  for seed, scale in [(0, 1.0), (1, 100.0), (2, 1e-3)]:
    alphas[scale] = np.asarray(run(*_inputs(seed=seed, img_scale=scale)))
    assert alphas[scale].shape == (5, 1) and np.all(alphas[scale] <= 1.0)
  assert np.all(alphas[100.0] == 1.0)  # the cap is active: beta * ratio >> 1
  assert np.all(alphas[1e-3] < 1.0)  # and only then


def test_per_sample_rows_do_not_depend_on_batch():
  mag, variables = _init('per_sample')
  run = jax.jit(lambda a, b: mag.apply(variables, a, b, train=False))
  z_img, z_txt = _inputs(seed=3, img_scale=0.1)
  full = run(z_img, z_txt)
  for i in range(3):
    np.testing.assert_allclose(full[i:i + 1], run(z_img[i:i + 1], z_txt[i:i + 1]),
                               rtol=1e-5, atol=1e-6)


def test_reference_rows_depend_on_batch():
  mag, variables = _init('reference')
  variables = {'params': {**variables['params'], 'beta': jnp.array([0.5])}}
  run = jax.jit(lambda a, b: mag.apply(variables, a, b, train=False))
  z_img, z_txt = _inputs(seed=3, img_scale=0.1)
  assert not np.allclose(run(z_img, z_txt)[:1], run(z_img[:1], z_txt[:1]), atol=1e-4)


def test_dropout_in_train_mode_only_and_alpha_is_sown():
  mag, variables = _init('per_sample', dropout_rate=0.5)
  z_img, z_txt = _inputs()

  @jax.jit
  def train(rng):
    return mag.apply(variables, z_img, z_txt, train=True, rngs={'dropout': rng})

  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and np.mean(np.asarray(a) == 0) > 0.2
  out, state = mag.apply(variables, z_img, z_txt, train=False, mutable=['intermediates'])
  assert state['intermediates']['alpha'][0].shape == (5, 1)
  np.testing.assert_array_equal(out, mag.apply(variables, z_img, z_txt, train=False))


@pytest.mark.parametrize('variant', ['per_sample', 'reference'])
def test_gradients_finite_at_zero_image_embedding(variant):
  """Norms are safe at 0: no nan gradient when an embedding is exactly zero."""
  mag, variables = _init(variant)
  _, z_txt = _inputs()
  z_img = jnp.zeros((5, D_IMG))
  grads = jax.jit(jax.grad(lambda p, zi: jnp.sum(mag.apply({'params': p}, zi, z_txt,
                                                           train=False) ** 2),
                           argnums=(0, 1)))(variables['params'], z_img)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match='unknown MAG variant'):
    MAG(variant='batch').init(jax.random.PRNGKey(0), *_inputs(), train=False)
