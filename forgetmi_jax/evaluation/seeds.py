"""Results over seeds: mean and 95 % confidence interval of every metric, gaps taken against the
mean of N retrained models, and the retrain row's noise floor.

A single seed's number is mostly noise on this problem (the same commit and seed moved the MIA
by 0.13 between two machines), so every table reports `mean +- CI` over seeds. The interval is
Student's t (scipy.stats.t.interval) on the N per-seed values: with 5 seeds it is 2.78 standard
errors wide each side, honest about how little 5 runs pin down.

Gaps: a run's metric gap is |run - mean over the retrained models|. The retrained models
themselves vary with their seed, so no method can be expected to do better than the retrain
row's own gap, where each retrained model is held against the mean of the *others* (the noise
floor; needs N >= 2).
"""
import math

import numpy as np
from scipy import stats

from forgetmi_jax.evaluation import distance
from forgetmi_jax.evaluation.gaps import METRIC_KEYS, retrain_gaps

SUMMARY_KEYS = METRIC_KEYS + ('distance_to_retrain', 'avg_gap')
CONFIDENCE = 0.95


def interval(values, confidence=CONFIDENCE):
  """{'mean', 'ci95': [lo, hi], 'values'} of the finite `values`; a t interval.

  One value (or none finite) has no spread to estimate: its interval is None, never a fake
  zero-width one. Equal values give a zero-width interval (their spread is zero).
  """
  values = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
  finite = np.asarray([v for v in values if v is not None], np.float64)
  out = {'mean': float(finite.mean()) if finite.size else None, 'ci95': None, 'values': values}
  if finite.size >= 2:
    sem = stats.sem(finite)
    if sem == 0:
      out['ci95'] = [out['mean'], out['mean']]
    else:
      lo, hi = stats.t.interval(confidence, finite.size - 1, loc=finite.mean(), scale=sem)
      out['ci95'] = [float(lo), float(hi)]
  return out


def mean_metrics(runs):
  """The per-metric mean of a list of metric dicts (METRIC_KEYS; None where none is finite)."""
  out = {}
  for k in METRIC_KEYS:
    vals = [float(r[k]) for r in runs if r.get(k) is not None and math.isfinite(float(r[k]))]
    out[k] = float(np.mean(vals)) if vals else None
  return out


def mean_distance(logits, others):
  """Mean over `others` of distance_to_retrain(logits, other) (retain-set logits)."""
  if not others:
    return None
  return float(np.mean([distance.distance_to_retrain(logits, o) for o in others]))


def summarize(per_seed, retain_logits, retrain_key='retrain'):
  """{model: {metric: interval}} over seeds, for SUMMARY_KEYS plus any other scalar field.

  `per_seed`: {model: [metrics dict per seed]} (the original has one entry);
  `retain_logits`: {model: [retain-set logits per seed]}, for the distance to the retrained
  models. Gaps and distances of run i are taken against all retrained models (their mean, for
  the gaps); the retrained model i against the others only (the noise floor).
  """
  retrains = per_seed.get(retrain_key, [])
  retrain_logits = retain_logits.get(retrain_key, [])
  summary = {}
  for name, runs in per_seed.items():
    rows = []
    for i, m in enumerate(runs):
      if name == retrain_key:
        others = [r for j, r in enumerate(retrains) if j != i]
        other_logits = [lg for j, lg in enumerate(retrain_logits) if j != i]
      else:
        others, other_logits = retrains, retrain_logits
      row = dict(m)
      if others:
        row.update({f'gap_{k}': v for k, v in retrain_gaps(m, mean_metrics(others)).items()
                    if k != 'avg_gap'})
        row['avg_gap'] = retrain_gaps(m, mean_metrics(others))['avg_gap']
        row['distance_to_retrain'] = mean_distance(retain_logits[name][i], other_logits)
      else:  # one retrained model: it has no others to be held against
        row['avg_gap'] = row['distance_to_retrain'] = None
      rows.append(row)
    keys = [k for k in rows[0] if all(_scalar(r.get(k)) for r in rows)]
    summary[name] = {k: interval([r.get(k) for r in rows]) for k in
                     dict.fromkeys(list(SUMMARY_KEYS) + keys)}
  return summary


def _scalar(v):
  return v is None or (isinstance(v, (int, float, np.floating, np.integer))
                       and not isinstance(v, bool))


def format_interval(s, digits=3):
  """'0.812 ± 0.041' (half-width of the CI), the mean alone for one seed, '—' if missing."""
  if not s or s.get('mean') is None:
    return '—'
  if s.get('ci95') is None:
    return f"{s['mean']:.{digits}f}"
  half = (s['ci95'][1] - s['ci95'][0]) / 2
  return f"{s['mean']:.{digits}f} ± {half:.{digits}f}"
