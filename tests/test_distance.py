import numpy as np
import pytest

from forgetmi_jax.evaluation.distance import cosine_similarity_rows, distance_to_retrain


def test_identical_and_negated_and_scaled():
  x = np.random.default_rng(0).normal(size=(50, 4))
  assert distance_to_retrain(x, x) == pytest.approx(0.0, abs=1e-12)
  assert distance_to_retrain(x, -x) == pytest.approx(2.0, abs=1e-12)
  assert distance_to_retrain(x, 3.0 * x) == pytest.approx(0.0, abs=1e-12)  # scale-free


def test_hand_worked_example():
  a = np.array([[1.0, 0.0, 0.0, 0.0],   # vs [0,1,0,0]: orthogonal, cos 0
                [1.0, 1.0, 0.0, 0.0],   # vs [1,0,0,0]: cos 1/sqrt(2)
                [3.0, 4.0, 0.0, 0.0]])  # vs [4,3,0,0]: cos 24/25
  b = np.array([[0.0, 1.0, 0.0, 0.0],
                [1.0, 0.0, 0.0, 0.0],
                [4.0, 3.0, 0.0, 0.0]])
  np.testing.assert_allclose(cosine_similarity_rows(a, b), [0.0, 2 ** -0.5, 0.96])
  expected = 1.0 - (0.0 + 2 ** -0.5 + 0.96) / 3.0
  assert distance_to_retrain(a, b) == pytest.approx(expected, abs=1e-12)


def test_zero_vectors_are_finite():
  a = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
  b = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
  d = distance_to_retrain(a, b)
  assert np.isfinite(d)
  assert d == pytest.approx(0.5)  # zero row: cosine 0 (torch convention); other row: 1


def test_shape_errors():
  with pytest.raises(ValueError):
    distance_to_retrain(np.zeros((3, 4)), np.zeros((2, 4)))
  with pytest.raises(ValueError):
    distance_to_retrain(np.zeros((0, 4)), np.zeros((0, 4)))
