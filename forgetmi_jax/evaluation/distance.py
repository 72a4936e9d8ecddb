"""Distance to the retrained model ("D_r", REFERENCE 5): how far an unlearned model's outputs
are from those of the model that never saw the forget set (lower = closer)."""
import numpy as np

EPS = 1e-8


def cosine_similarity_rows(a, b, eps=EPS):
  """Per-row cosine similarity of two [N, C] arrays (float64).

  Like torch.nn.functional.cosine_similarity, each norm is floored at `eps`, so a zero row has
  similarity 0 with anything (including another zero row) instead of producing nan.
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.ndim == 1:  # a single sample
    a = a[None]
  if b.ndim == 1:
    b = b[None]
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'expected two [N, C] arrays of equal shape, got {a.shape} and {b.shape}')
  na = np.maximum(np.linalg.norm(a, axis=1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=1), eps)
  return np.sum(a * b, axis=1) / (na * nb)


def distance_to_retrain(logits_model, logits_retrain, eps=EPS):
  """1 - mean cosine similarity between two models' image logits, row by row.

  The caller passes the rows to compare (the retain set in the paper). 0 = same directions,
  1 = orthogonal on average, 2 = opposite. Cosine ignores logit scale, so this measures
  agreement of the predicted class profile, not calibration.
  """
  cos = cosine_similarity_rows(logits_model, logits_retrain, eps)
  if cos.size == 0:
    raise ValueError('distance_to_retrain needs at least one row')
  return float(1.0 - np.mean(cos))
