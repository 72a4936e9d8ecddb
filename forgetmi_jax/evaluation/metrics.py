"""Classification metrics of REFERENCE 5: one-vs-rest AUC of the softmax and macro-F1 of argmax.

Everything takes numpy (or anything `np.asarray` accepts, e.g. jax arrays) and returns python
floats, so results drop straight into metrics.json. Computation is in float64 so that the
metrics do not depend on the accelerator's precision.

Forget sets are small (16 subjects at 3 %), so a severity class can be missing from them. Both
metrics therefore handle absent classes explicitly instead of letting sklearn raise or warn:
- AUC: a class absent from the labels (or the only one present) has no ROC curve; it is skipped
  and the AUC is the mean over the defined classes (nan only if none is defined).
- F1: a class absent from both the labels and the predictions is skipped (the model made no
  error on it); a class the model predicts but that is absent from the labels counts with F1 0
  (those predictions are all false positives). See `macro_f1`.
"""
import logging
import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

NUM_CLASSES = 4

log = logging.getLogger(__name__)


def _logits(logits):
  x = np.asarray(logits, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'logits must be [N, C], got shape {x.shape}')
  return x


def _labels(labels, n, num_classes):
  """Integer labels [N]; [N, 1] is flattened (the public code's label-shape bug, REFERENCE 8.6)."""
  y = np.asarray(labels)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or y.shape[0] != n:
    raise ValueError(f'labels must be [N]={n} integers, got shape {y.shape}')
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      raise ValueError('labels must be integer class ids')
  y = y.astype(np.int64)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]')
  return y


def _warn_nonfinite(fn, name, x, result):
  """Log that a diverged model's logits (nan/inf) make `result` nan; counts only, no values."""
  model = f'model {name!r}: ' if name is not None else ''
  bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
  log.warning('%s: %s%d of %d rows have non-finite logits; %s is nan', fn, model, bad,
              x.shape[0], result)


def log_softmax(logits):
  """Numerically stable log-softmax over the last axis (float64)."""
  x = np.asarray(logits, dtype=np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  z = x - m
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def softmax(logits):
  """Softmax over the last axis (float64), stable for large logits."""
  return np.exp(log_softmax(logits))


def per_sample_ce(logits, labels):
  """Per-sample cross-entropy [N] (float64): the MIA features and the Fig. 3 histograms."""
  x = _logits(logits)
  y = _labels(labels, x.shape[0], x.shape[1])
  return -log_softmax(x)[np.arange(x.shape[0]), y]


def _checked(logits, labels, num_classes):
  x = _logits(logits)
  if x.shape[1] != num_classes:
    raise ValueError(f'expected {num_classes} logit columns, got {x.shape[1]}')
  return x, _labels(labels, x.shape[0], num_classes)


def _auc(x, y, num_classes):
  """(auc, skipped classes); nan for non-finite logits."""
  skipped = [c for c in range(num_classes) if not (y == c).any() or (y == c).all()]
  if not np.all(np.isfinite(x)):
    return math.nan, skipped
  probs = softmax(x)
  per_class = [roc_auc_score((y == c).astype(np.int64), probs[:, c])
               for c in range(num_classes) if c not in skipped]
  return (float(np.mean(per_class)) if per_class else math.nan), skipped


def _f1(x, y, num_classes):
  """(f1, skipped classes); nan for an empty set or non-finite logits."""
  if y.size == 0 or not np.all(np.isfinite(x)):
    return math.nan, list(range(num_classes))
  pred = np.argmax(x, axis=1)
  present = set(y.tolist()) | set(pred.tolist())
  used = [c for c in range(num_classes) if c in present]
  skipped = [c for c in range(num_classes) if c not in present]
  return float(f1_score(y, pred, average='macro', labels=used, zero_division=0)), skipped


def auc_ovr(logits, labels, num_classes=NUM_CLASSES, return_details=False, name=None):
  """Unweighted mean of the per-class one-vs-rest ROC AUCs of softmax(logits).

  A class with no positives or no negatives among `labels` has no defined AUC: it is skipped
  and the mean runs over the remaining classes (nan if none remains, e.g. a single-class set).
  Non-finite logits (a diverged model) give nan and a logged warning naming `name` (the model)
  rather than an exception, so a long run still writes its report. With `return_details=True`
  returns `(auc, skipped_classes)`.
  """
  x, y = _checked(logits, labels, num_classes)
  if not np.all(np.isfinite(x)):
    _warn_nonfinite('auc_ovr', name, x, 'AUC')
  auc, skipped = _auc(x, y, num_classes)
  return (auc, skipped) if return_details else auc


def macro_f1(logits, labels, num_classes=NUM_CLASSES, return_details=False, name=None):
  """Macro-F1 of argmax(logits), averaged over the classes present in labels or predictions.

  Equals sklearn `f1_score(y, argmax, average='macro', labels=range(num_classes),
  zero_division=0)` whenever every class occurs in the labels or the predictions (the usual
  case). A class occurring in neither is *skipped*: counting it as 0 would cap a perfect model
  at 0.75 on a forget set without alveolar-edema cases, which says nothing about forgetting.
  (Skipping is also sklearn's default, used by the public code.) A class that is predicted but
  absent from the labels still counts, with F1 0. nan for an empty set, and for non-finite
  logits (with a logged warning naming `name`). With `return_details=True` returns
  `(f1, skipped_classes)`.
  """
  x, y = _checked(logits, labels, num_classes)
  if y.size and not np.all(np.isfinite(x)):
    _warn_nonfinite('macro_f1', name, x, 'F1')
  f1, skipped = _f1(x, y, num_classes)
  return (f1, skipped) if return_details else f1


def classification_metrics(logits, labels, num_classes=NUM_CLASSES, details=False, name=None):
  """`{'auc', 'f1'}` for one set; `details=True` adds the skipped-class lists.

  Non-finite logits give nan for both and one logged warning naming `name` (the model).
  """
  x, y = _checked(logits, labels, num_classes)
  if y.size and not np.all(np.isfinite(x)):
    _warn_nonfinite('classification_metrics', name, x, 'AUC and F1')
  auc, auc_skipped = _auc(x, y, num_classes)
  f1, f1_skipped = _f1(x, y, num_classes)
  out = {'auc': auc, 'f1': f1}
  if details:
    out['auc_skipped_classes'] = auc_skipped
    out['f1_skipped_classes'] = f1_skipped
  return out
