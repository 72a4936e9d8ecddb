"""Image noise (JAX) and text noise (nlpaug, deterministic)."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.data.noise import (NOISE_TOKEN, REFERENCE_KEYWORDS, TextNoiser, add_image_noise,
                                     changed_word_fraction)

KEY = jax.random.key(0)
SHAPE = (8, 16, 16, 1)  # one shape and K throughout: each new one costs a compilation
K = 2


def test_noise_statistics_before_clipping():
  x = np.full(SHAPE, 0.5, np.float32)
  y = np.asarray(add_image_noise(KEY, x, np.arange(8), 0.05, 0.04, num_draws=K))
  assert y.shape == (K,) + SHAPE and y.dtype == np.float32
  d = y - 0.5  # mu +- 6 sigma stays inside [0, 1]: no clipping here
  assert abs(d.mean() - 0.05) < 0.003 and abs(d.std() - 0.04) < 0.003
  assert not np.allclose(y[0], y[1])  # draws differ


def test_clipping_bounds():
  x = np.random.default_rng(0).uniform(size=SHAPE).astype(np.float32)
  y = np.asarray(add_image_noise(KEY, x, np.arange(8), 0.3, 1.0, num_draws=K))
  assert y.min() == 0.0 and y.max() == 1.0
  assert (y == 0).mean() > 0.05 and (y == 1).mean() > 0.05


def test_keyed_by_sample_not_batch_position_and_fixed_across_epochs():
  x = np.random.default_rng(1).uniform(0.3, 0.7, size=SHAPE).astype(np.float32)
  ids = np.arange(10, 18)
  a = np.asarray(add_image_noise(KEY, x, ids, 0.0, 0.1, num_draws=K))
  perm = np.array([3, 0, 5, 1, 7, 4, 2, 6])
  b = np.asarray(add_image_noise(KEY, x[perm], ids[perm], 0.0, 0.1, num_draws=K))
  np.testing.assert_array_equal(a[:, perm], b)  # same sample -> same noise, any batch
  # Default (epoch=None): one fixed draw. With epochs: redrawn per epoch, reproducible.
  e0 = np.asarray(add_image_noise(KEY, x, ids, 0.0, 0.1, num_draws=K, epoch=0))
  e0b = np.asarray(add_image_noise(KEY, x, ids, 0.0, 0.1, num_draws=K, epoch=0))
  e1 = np.asarray(add_image_noise(KEY, x, ids, 0.0, 0.1, num_draws=K, epoch=1))
  np.testing.assert_array_equal(e0, e0b)
  assert not np.allclose(e0, e1) and not np.allclose(a, e1)
  other = np.asarray(add_image_noise(jax.random.key(1), x, ids, 0.0, 0.1, num_draws=K))
  assert not np.allclose(a, other)


def test_jittable_with_traced_parameters():
  x = np.full(SHAPE, 0.5, np.float32)
  f = jax.jit(lambda k, img, ids, mu, sigma, ep: add_image_noise(k, img, ids, mu, sigma,
                                                                   num_draws=K, epoch=ep))
  y = f(KEY, x, jnp.arange(8), jnp.float32(0.0), jnp.float32(0.1), jnp.int32(3))
  z = add_image_noise(KEY, x, np.arange(8), 0.0, 0.1, num_draws=K, epoch=3)
  np.testing.assert_allclose(np.asarray(y), np.asarray(z), atol=1e-6)
  zero = f(KEY, x, jnp.arange(8), jnp.float32(0.0), jnp.float32(0.0), jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(zero), np.broadcast_to(x, (K,) + x.shape))


TEXTS = [
    'findings : the cardiac silhouette is enlarged . mild pulmonary vascular congestion without '
    'frank edema . endotracheal tube terminates NUMBER cm above the carina . no pneumothorax . '
    'impression : mild chf with bibasilar atelectasis in the lung bases of the chest .',
    'findings : heart size is normal . no pulmonary edema . lungs are clear . no pleural '
    'effusion . the visualized osseous structures are intact . impression : no acute disease .',
] * 20
IDS = np.arange(len(TEXTS))


@pytest.mark.parametrize('mode', ['char', 'word'])
@pytest.mark.parametrize('p', [0.1, 0.3])
def test_text_noise_rate_and_reproducibility(mode, p):
  noiser = TextNoiser(mode, p=p, seed=0)
  out = noiser.apply(TEXTS, IDS, num_draws=2, epoch=0)
  assert len(out) == 2 and len(out[0]) == len(TEXTS)
  rate = np.mean([changed_word_fraction(a, b) for a, b in zip(TEXTS, out[0])])
  # Swaps move two words per action and deletes shift alignment: allow a band around p.
  assert 0.5 * p <= rate <= 2.2 * p, rate
  assert out == noiser.apply(TEXTS, IDS, num_draws=2, epoch=0)
  assert out[0] != out[1]  # draws differ
  assert out[0] != noiser.apply(TEXTS, IDS, epoch=1)[0]  # epoch changes the draw
  assert out[0] != TextNoiser(mode, p=p, seed=1).apply(TEXTS, IDS)[0]
  # Keyed by sample id, not position.
  single = noiser.apply(TEXTS[5:6], IDS[5:6], num_draws=2)
  assert single[1][0] == out[1][5]


def test_reference_mode_masks_keywords():
  noiser = TextNoiser('reference', p=1.0, seed=0)
  out = noiser.apply(TEXTS, IDS)[0]
  for before, after in zip(TEXTS, out):
    assert NOISE_TOKEN in after
    n_kw = sum(w in REFERENCE_KEYWORDS for w in before.split())
    n_kw_after = sum(w in REFERENCE_KEYWORDS for w in after.split())
    assert 1 <= after.count(NOISE_TOKEN) <= 2 and n_kw_after <= n_kw - 1 + n_kw // 3
  low = TextNoiser('reference', p=0.1, seed=0).apply(TEXTS, IDS)[0]
  assert np.mean([NOISE_TOKEN in t for t in low]) < 0.35


def test_none_mode_and_validation():
  assert TextNoiser('none').apply(TEXTS[:3], IDS[:3], num_draws=2) == [TEXTS[:3], TEXTS[:3]]
  with pytest.raises(ValueError, match='mode'):
    TextNoiser('synonym')
  with pytest.raises(ValueError, match='p must'):
    TextNoiser('char', p=1.5)
  with pytest.raises(ValueError, match='sample ids'):
    TextNoiser('char').apply(TEXTS[:2], [0])


def test_text_noise_leaves_global_random_state_alone():
  random.seed(123)
  np.random.seed(123)
  expect = (random.random(), np.random.random())
  random.seed(123)
  np.random.seed(123)
  TextNoiser('reference', p=0.5).apply(TEXTS[:4], IDS[:4], num_draws=2)
  TextNoiser('word', p=0.5).apply(TEXTS[:4], IDS[:4])
  assert (random.random(), np.random.random()) == expect
