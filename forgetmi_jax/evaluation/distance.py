"""Distance to the retrained model ("D_r", REFERENCE 5): how far an unlearned model's outputs
are from those of the model that never saw the forget set (lower = closer)."""
import logging
import math

import numpy as np

EPS = 1e-8

log = logging.getLogger(__name__)


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


def distance_to_retrain(logits_model, logits_retrain, eps=EPS, name=None):
  """1 - mean cosine similarity between two models' image logits, row by row.

  The caller passes the rows to compare (the retain set in the paper). 0 = same directions,
  1 = orthogonal on average, 2 = opposite. Cosine ignores logit scale, so this measures
  agreement of the predicted class profile, not calibration. Non-finite logits on either side
  (a diverged model) give nan and a logged warning naming `name` (the model), not an exception.
  """
  a = np.atleast_2d(np.asarray(logits_model, dtype=np.float64))
  b = np.atleast_2d(np.asarray(logits_retrain, dtype=np.float64))
  with np.errstate(invalid='ignore', over='ignore'):  # non-finite rows are reported below
    cos = cosine_similarity_rows(a, b, eps)
  if cos.size == 0:
    raise ValueError('distance_to_retrain needs at least one row')
  bad = {side: int(np.sum(~np.all(np.isfinite(x), axis=1)))
         for side, x in (('model', a), ('retrained model', b))}
  bad = {k: v for k, v in bad.items() if v}
  if bad:
    model = f'model {name!r}: ' if name is not None else ''
    counts = ', '.join(f'{v} of {cos.size} rows of the {k}' for k, v in bad.items())
    log.warning('distance_to_retrain: %snon-finite logits (%s); the distance is nan', model,
                counts)
    return math.nan
  return float(1.0 - np.mean(cos))
