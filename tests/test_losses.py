"""The shared loss pieces (forgetmi_jax/train/losses.py) against numpy written from the formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.train import losses


def _ranking_by_hand(z_img, z_txt, labels, ids, min_margin=0.5):
  """Chauhan et al.'s loss, one example at a time: imposter j = i+1 (wrapping), margin
  max(min_margin, |y_i - y_j|), 0 when j carries the same report, dot-product similarity."""
  b = z_img.shape[0]
  out = np.zeros(b)
  for i in range(b):
    j = (i + 1) % b
    same_report = bool(np.array_equal(ids[i], ids[j]))
    margin = 0.0 if same_report else max(min_margin, abs(int(labels[i]) - int(labels[j])))
    pos = float(np.dot(z_img[i], z_txt[i]))
    imposter_text = float(np.dot(z_img[i], z_txt[j]))
    imposter_image = float(np.dot(z_img[j], z_txt[i]))
    out[i] = max(0.0, margin - pos + imposter_text) + max(0.0, margin - pos + imposter_image)
  return out


def _ranking_case(seed=0, b=8, d=6, length=5):
  r = np.random.default_rng(seed)
  z_img = r.normal(size=(b, d)).astype(np.float32)
  z_txt = r.normal(size=(b, d)).astype(np.float32)
  labels = r.integers(0, 4, b).astype(np.int32)
  ids = r.integers(5, 50, (b, length)).astype(np.int32)
  # Examples 2 and 3 are two images of one study: the same report, different labels, so the
  # margin must be 0 there although |y_2 - y_3| = 3. The last example shares the first's
  # report, so the wrap-around pair is a same-report pair too.
  ids[3] = ids[2]
  labels[2], labels[3] = 0, 3
  ids[-1] = ids[0]
  return z_img, z_txt, labels, ids


@pytest.mark.parametrize('min_margin', [0.5, 1.5])
def test_ranking_loss_matches_hand_computation(min_margin):
  z_img, z_txt, labels, ids = _ranking_case()
  got = np.asarray(losses.ranking_loss(jnp.asarray(z_img), jnp.asarray(z_txt),
                                       jnp.asarray(labels), jnp.asarray(ids),
                                       min_margin=min_margin))
  expected = _ranking_by_hand(z_img, z_txt, labels, ids, min_margin)
  assert got.shape == (8,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The case exercises both sides of the hinge.
  assert (expected == 0).any() and (expected > 0).sum() >= 3


def test_ranking_loss_same_report_has_zero_margin():
  z_img, z_txt, labels, ids = _ranking_case(seed=1)
  got = np.asarray(losses.ranking_loss(jnp.asarray(z_img), jnp.asarray(z_txt),
                                       jnp.asarray(labels), jnp.asarray(ids)))
  # Row 2's imposter (row 3) carries the same report: with margin 0 its loss is the two hinges
  # of the similarity differences alone; the |y_i - y_j| = 3 margin would add up to 6.
  pos = z_img[2] @ z_txt[2]
  alone = max(0.0, z_img[2] @ z_txt[3] - pos) + max(0.0, z_img[3] @ z_txt[2] - pos)
  assert got[2] == pytest.approx(alone, abs=1e-5)
  # Changing one token of the report makes it a different report: the margin comes back.
  ids2 = ids.copy()
  ids2[3, 0] += 1
  got2 = np.asarray(losses.ranking_loss(jnp.asarray(z_img), jnp.asarray(z_txt),
                                        jnp.asarray(labels), jnp.asarray(ids2)))
  np.testing.assert_allclose(got2, _ranking_by_hand(z_img, z_txt, labels, ids2), atol=1e-5)
  with_margin = max(0.0, 3 + z_img[2] @ z_txt[3] - pos) + max(0.0, 3 + z_img[3] @ z_txt[2] - pos)
  assert got2[2] == pytest.approx(with_margin, abs=1e-5)
  assert got2[2] > got[2]


def _ce_by_hand(logits, labels):
  x = np.asarray(logits, np.float64)
  m = x.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
  return lse - x[np.arange(x.shape[0]), labels]


def test_per_sample_cross_entropy_matches_numpy():
  r = np.random.default_rng(2)
  logits = r.normal(size=(16, 4)).astype(np.float32) * 3
  labels = r.integers(0, 4, 16)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (16,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _ce_by_hand(logits, labels), rtol=1e-5, atol=1e-6)
  # Large logits stay finite (no naive exp); bfloat16 inputs are computed in float32.
  big = np.array([[80.0, -80.0, 0.0, 40.0], [80.0, -80.0, 0.0, 40.0]], np.float32)
  np.testing.assert_allclose(np.asarray(losses.cross_entropy(jnp.asarray(big),
                                                             jnp.asarray([0, 1]))),
                             _ce_by_hand(big, [0, 1]), rtol=1e-6)
  half = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  assert half.dtype == jnp.float32
  ref = _ce_by_hand(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels)
  np.testing.assert_allclose(np.asarray(half), ref, rtol=1e-5, atol=1e-5)


def test_safe_norm_value_and_zero_gradient_at_zero():
  r = np.random.default_rng(3)
  x = r.normal(size=(5, 7)).astype(np.float32)
  x[2] = 0.0
  np.testing.assert_allclose(np.asarray(losses.safe_norm(jnp.asarray(x))),
                             np.linalg.norm(x, axis=1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.safe_norm(jnp.asarray(x), axis=0)),
                             np.linalg.norm(x, axis=0), rtol=1e-6)
  g = np.asarray(jax.grad(lambda v: jnp.sum(losses.safe_norm(v)))(jnp.asarray(x)))
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[2], np.zeros(7))
  rest = [0, 1, 3, 4]
  np.testing.assert_allclose(g[rest], x[rest] / np.linalg.norm(x[rest], axis=1, keepdims=True),
                             rtol=1e-5)
  # The plain norm's gradient at 0 is nan: what safe_norm exists to avoid.
  naive = jax.grad(lambda v: jnp.sum(jnp.sqrt(jnp.sum(v * v, axis=-1))))(jnp.asarray(x))
  assert np.isnan(np.asarray(naive)[2]).all()


def test_masked_mean_and_draw_averaged_distance():
  r = np.random.default_rng(4)
  v = r.normal(size=6).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0, 0], np.float32)
  assert float(losses.masked_mean(jnp.asarray(v), jnp.asarray(mask))) == pytest.approx(
      v[mask == 1].mean(), rel=1e-6)
  assert float(losses.masked_mean(jnp.asarray(v), jnp.zeros(6))) == 0.0
  z = r.normal(size=(4, 3)).astype(np.float32)
  targets = r.normal(size=(2, 4, 3)).astype(np.float32)  # [K draws, B, D]
  expected = np.mean([np.linalg.norm(z - targets[k], axis=1) for k in range(2)], axis=0)
  np.testing.assert_allclose(np.asarray(losses.distance(jnp.asarray(z), jnp.asarray(targets))),
                             expected, rtol=1e-5)
