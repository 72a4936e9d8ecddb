"""Gaps to the retrained model: the paper's "Avg. Gap" summary (REFERENCE 5-6).

Exact unlearning (retraining without the forget set) is the target, so every metric is judged
by its distance |model - retrain|, not by being low or high.
"""
import math
import numbers

METRIC_KEYS = ('mia', 'forget_auc', 'forget_f1', 'test_auc', 'test_f1')


def _value(x):
  """A finite float, or None for missing / None / nan / inf / non-numeric."""
  if x is None or isinstance(x, bool) or not isinstance(x, numbers.Real):
    try:  # numpy scalars and 0-d arrays
      x = float(x)
    except (TypeError, ValueError):
      return None
  x = float(x)
  return x if math.isfinite(x) else None


def retrain_gaps(model_metrics, retrain_metrics):
  """`{key: |model - retrain| for key in METRIC_KEYS, 'avg_gap': ...}`.

  Rule for missing values: a metric that is absent, None or non-finite on either side has gap
  None and is left out of `avg_gap`, which is the mean over the metrics defined on both sides
  (None if there are none). A skipped metric is visible as a None gap, never silently zero.
  """
  out = {}
  for k in METRIC_KEYS:
    a, b = _value(model_metrics.get(k)), _value(retrain_metrics.get(k))
    out[k] = None if a is None or b is None else abs(a - b)
  defined = [g for g in out.values() if g is not None]
  out['avg_gap'] = sum(defined) / len(defined) if defined else None
  return out


def add_gaps(models, retrain_key='retrain'):
  """Copy of `models` (name -> metrics) with `gap_<key>` and `avg_gap` added to every model.

  The input is not modified. Without a `retrain_key` entry there is no target: every gap
  field is set to None (so reports show '—') rather than raising after a long run.
  """
  retrain = models.get(retrain_key)
  out = {}
  for name, m in models.items():
    m = dict(m)
    if retrain is None:
      gaps = {k: None for k in METRIC_KEYS}
      gaps['avg_gap'] = None
    else:
      gaps = retrain_gaps(m, retrain)
    for k in METRIC_KEYS:
      m[f'gap_{k}'] = gaps[k]
    m['avg_gap'] = gaps['avg_gap']
    out[name] = m
  return out
