"""Retrain-distribution metrics: N unlearned models against N retrained models, per example.

One unlearned model matching one retrained model says little: two retrainings with different
seeds differ too. These metrics instead ask whether, for each example, the *distribution* of a
statistic over unlearning seeds matches its distribution over retraining seeds.

- `klom`: KL divergence of the binned margin distributions (KLoM, Georgiev et al., ICLR 2025;
  RoyRin/data-unlearning-bench `src/eval.py`). Good: near 0.
- `per_example_epsilon` / `forget_quality` / `competition_score`: the NeurIPS 2023 unlearning
  competition scorer (google-deepmind/unlearning_evaluation `metric.py`, `main.py`): an
  (epsilon, delta) estimate per example from threshold attacks, bucketed into a score H in
  [0, 1]. Good: epsilons small, H near 1.
- `ulira`: a per-example likelihood-ratio attack telling unlearned from retrained models
  (U-LiRA, Hayes et al., SaTML 2025). Good: AUC near 0.5.
- `patient_max`: a patient is as exposed as their most exposed image.

Inputs are plain arrays `[num models, num examples]` (model axis first), float64 inside, no JAX.
Undefined results (one model per side, non-finite inputs) are nan with a logged warning that
names counts and shapes only, never values; malformed shapes raise ValueError.
"""
import logging
import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

# Competition metric (metric.py): delta of the (epsilon, delta) estimate, the cap returned for
# perfectly separable or "peaky" examples, the range ratio below which an example is peaky,
# and the width of the forget-score buckets.
DELTA = 1e-5
EPSILON_CAP = 50.0
PEAKY_RATIO = 0.01
BUCKET_WIDTH = 0.5
# KLoM (data-unlearning-bench src/eval.py): bins over the combined per-example range, the floor
# put under empty retrained bins, the margin clip, and the reported percentile.
KLOM_BINS = 20
KLOM_EPS = 1e-5
KLOM_CLIP = (-100.0, 100.0)
KLOM_PERCENTILE = 95.0
# U-LiRA: floor on the per-example Gaussian standard deviations, in the statistic's units, so a
# side whose held-in models agree exactly still gives a finite (very large) log ratio.
ULIRA_MIN_STD = 1e-6
ULIRA_FPRS = (0.01, 0.05)
# Epsilon rules are evaluated on [thresholds^2, examples] blocks of about this many entries.
_EPS_BLOCK = 2_000_000

log = logging.getLogger(__name__)


def klom_max(eps=KLOM_EPS):
  """Largest value `klom` can give: log(1 + 1/eps) (11.5129... for the default eps).

  Reached when every unlearned sample falls in one bin that holds no retrained sample (e.g.
  a constant unlearned margin far from the retrained ones). Disjoint samples spread over j bins
  give log((1 + j eps) / eps) - H(p), below it.
  """
  return math.log1p(1.0 / eps)


# ---------------------------------------------------------------------------------------------
# Input checks.

def _stats(x, name):
  """[num models, num examples] float64; a shape error names the shape."""
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2 or a.shape[1] == 0:
    raise ValueError(f'{name} must be [num models, num examples], got shape {a.shape}')
  return a


def _pair(unlearned, retrained):
  u, r = _stats(unlearned, 'unlearned'), _stats(retrained, 'retrained')
  if u.shape[1] != r.shape[1]:
    raise ValueError(f'unlearned {u.shape} and retrained {r.shape} disagree on the number of '
                     'examples (axis 1)')
  return u, r


def _enough(fn, u, r, need):
  """False (after a warning) when a side has fewer than `need` models: no distribution."""
  if u.shape[0] >= need and r.shape[0] >= need:
    return True
  log.warning('%s: needs >= %d models per side, got %d unlearned and %d retrained; the result '
              'is nan (one seed has no distribution)', fn, need, u.shape[0], r.shape[0])
  return False


def _bad_examples(fn, u, r, whole=False):
  """Examples [n] with a non-finite statistic under any model, logged as a count."""
  bad = ~(np.isfinite(u).all(0) & np.isfinite(r).all(0))
  if bad.any():
    log.warning('%s: %d of %d examples have a nan or infinite statistic under some model; '
                '%s is nan', fn, int(bad.sum()), bad.size,
                'the result' if whole else 'their result')
  return bad


# ---------------------------------------------------------------------------------------------
# Margins.

def margins(logits, labels):
  """Margin [..., n] = logit of the true class - logsumexp of the other logits.

  KLoM's margin (data-unlearning-bench `get_margin`), which is also the competition's
  "logit-scaled confidence" log(p_y) - log(1 - p_y) and LiRA's statistic: it is computed from
  logits directly, so it neither saturates like p_y nor needs the competition's 1e-45 guard.
  Rows with a non-finite logit give nan (logged as a count).
  """
  z = np.asarray(logits, dtype=np.float64)
  y = np.asarray(labels)
  if z.ndim < 2:
    raise ValueError(f'logits must be [..., n, C], got shape {z.shape}')
  n, c = z.shape[-2:]
  if y.shape != (n,):
    raise ValueError(f'labels shape {y.shape} does not match logits shape {z.shape} '
                     f'(want ({n},))')
  if c < 2:
    raise ValueError(f'margins need >= 2 classes, logits shape {z.shape}')
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'labels must be integers, got dtype {y.dtype}')
  out_of_range = int(np.sum((y < 0) | (y >= c)))
  if out_of_range:
    raise ValueError(f'{out_of_range} of {n} labels are outside [0, {c})')
  idx = np.broadcast_to(y.astype(np.intp)[:, None], z.shape[:-1] + (1,))
  true = np.take_along_axis(z, idx, axis=-1)[..., 0]
  others = np.where(np.arange(c) == y[:, None], -np.inf, z)
  top = np.max(others, axis=-1, keepdims=True)
  finite = np.isfinite(z).all(-1)
  top = np.where(np.isfinite(top), top, 0.0)
  with np.errstate(invalid='ignore', over='ignore'):
    lse = top[..., 0] + np.log(np.sum(np.exp(others - top), axis=-1))
    m = true - lse
  if not finite.all():
    log.warning('margins: %d of %d rows have a nan or infinite logit; their margin is nan',
                int(np.sum(~finite)), finite.size)
  return np.where(finite, m, np.nan)


# ---------------------------------------------------------------------------------------------
# KLoM.

def klom(unlearned, retrained, bins=KLOM_BINS, eps=KLOM_EPS, clip=KLOM_CLIP):
  """Per-example binned KL(unlearned || retrained) [n], >= 0 (KLoM).

  As data-unlearning-bench `compute_binned_KL_div`: both samples clipped to `clip`; `bins`
  equal bins spanning the example's combined min..max (min..min+1 when all values agree);
  empty retrained bins where the unlearned histogram has mass are raised to `eps`, the
  retrained histogram is renormalised (scipy.stats.entropy does) and the KL is summed over
  the unlearned bins with mass. Identical samples give exactly 0; the largest value is
  `klom_max(eps)`. Deviation: the last bin is closed (np.histogram's rule); the reference's
  np.digitize drops samples equal to the combined max, which can turn a fully separated pair
  into KL 0. The two sample sizes may differ.
  """
  u, r = _pair(unlearned, retrained)
  n = u.shape[1]
  if not _enough('klom', u, r, 2):
    return np.full(n, np.nan)
  bad = _bad_examples('klom', u, r)
  u = np.clip(np.where(bad, 0.0, u), *clip)
  r = np.clip(np.where(bad, 0.0, r), *clip)
  lo = np.minimum(u.min(0), r.min(0))
  hi = np.maximum(u.max(0), r.max(0))
  hi = np.where(lo >= hi, lo + 1.0, hi)
  edges = np.linspace(lo, hi, bins + 1, axis=-1)  # [n, bins + 1]
  cu, cr = _bin_counts(u, edges), _bin_counts(r, edges)  # [n, bins]
  nu, nr = u.shape[0], r.shape[0]
  # The reference's q = max(q, eps) where p > 0, then renormalised, in counts: exact 0 for
  # identical samples (every ratio below is then exactly 1).
  q = np.where(cu > 0, np.maximum(cr, eps * nr), cr)
  total = q.sum(-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(cu > 0, (cu / nu) * np.log((cu * total) / (nu * q)), 0.0)
  kl = np.maximum(terms.sum(-1), 0.0)
  return np.where(bad, np.nan, kl)


def _bin_counts(x, edges):
  """Counts [n, bins] of the samples x [N, n] in each example's bins (last bin closed)."""
  idx = np.sum(x[:, :, None] >= edges[None, :, 1:-1], axis=-1)  # [N, n] in 0..bins-1
  nb = edges.shape[1] - 1
  return np.stack([np.sum(idx == k, axis=0) for k in range(nb)], axis=-1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Competition epsilon and forget score.

def per_example_epsilon(unlearned, retrained, delta=DELTA, cap=EPSILON_CAP):
  """Per-example epsilon [n] in [0, cap] of the NeurIPS 2023 competition metric.

  Any scalar statistic works (the competition used logit-scaled confidences, i.e. `margins`;
  per-example losses work too). Following metric.py `_get_epsilons`, per example:
  - if the smaller of the two samples' ranges is < 1% of the larger (a "peaky" unlearned or
    retrained distribution), epsilon = cap;
  - else two rule families are tried: "c >= t" calling the side with the larger median
    positive (the unlearned side on a tie of medians), and "l <= c <= r" calling the side
    with the smaller range positive (on a tie of ranges the smaller-median side, as the
    reference swaps the larger-median side out when its range is >= the other's);
  - each rule's FPR/FNR give epsilon = max(log(1 - delta - FPR) - log FNR,
    log(1 - delta - FNR) - log FPR), floored at 0; a rule with FPR = FNR = 0 gives cap
    (perfect separation); a rule with exactly one of them 0 is discarded (too few samples);
  - epsilon is the maximum over the rules, capped at `cap`.
  Deviation: the rules are enumerated exactly at every sample value (all distinct FPR/FNR
  pairs) instead of on the reference's grid of 100 thresholds per unit with interval widths
  within +-2 units of the smaller range. This is scale-free and never misses a rule, so it
  is >= the grid's value. Where no rule survives (both samples the same constant, on which
  the reference asserts) epsilon = 0: nothing tells the two apart.
  """
  u, r = _pair(unlearned, retrained)
  n = u.shape[1]
  if not _enough('per_example_epsilon', u, r, 2):
    return np.full(n, np.nan)
  bad = _bad_examples('per_example_epsilon', u, r)
  u, r = np.where(bad, 0.0, u), np.where(bad, 0.0, r)
  m = u.shape[0] + r.shape[0]
  step = max(1, _EPS_BLOCK // (m * m))
  out = np.concatenate([_epsilon_block(u[:, i:i + step], r[:, i:i + step], delta, cap)
                        for i in range(0, n, step)])
  return np.where(bad, np.nan, out)


def _rule_epsilons(fp, n_neg, fn, n_pos, delta):
  """Epsilon per rule from counts: inf = perfect separation, nan = discarded."""
  fpr, fnr = fp / n_neg, fn / n_pos
  with np.errstate(divide='ignore', invalid='ignore'):
    a = np.where(1 - delta - fpr > 0, np.log(1 - delta - fpr) - np.log(fnr), np.nan)
    b = np.where(1 - delta - fnr > 0, np.log(1 - delta - fnr) - np.log(fpr), np.nan)
  e = np.maximum(np.fmax(a, b), 0.0)  # nan only where both terms are undefined
  e = np.where((fp == 0) & (fn == 0), np.inf, e)
  return np.where((fp * fn == 0) & ~((fp == 0) & (fn == 0)), np.nan, e)


def _epsilon_block(u, r, delta, cap):
  """`per_example_epsilon` on a block of examples u [Nu, k], r [Nr, k] (finite)."""
  nu, nr = u.shape[0], r.shape[0]
  z = np.sort(np.concatenate([u, r]), axis=0)  # [m, k] candidate thresholds
  ge_u = np.sum(u[None] >= z[:, None], axis=1)  # [m, k]: samples >= z_a
  ge_r = np.sum(r[None] >= z[:, None], axis=1)
  le_u = np.sum(u[None] <= z[:, None], axis=1)  # [m, k]: samples <= z_b
  le_r = np.sum(r[None] <= z[:, None], axis=1)
  r_pos = np.median(r, 0) > np.median(u, 0)  # [k] larger median = positive (ties: unlearned)

  # Single threshold: predict positive iff c >= z_a.
  tp = np.where(r_pos, ge_r, ge_u)
  fp = np.where(r_pos, ge_u, ge_r)
  n_pos, n_neg = np.where(r_pos, nr, nu), np.where(r_pos, nu, nr)
  single = _rule_epsilons(fp, n_neg, n_pos - tp, n_pos, delta)  # [m, k]

  # Double threshold: predict "peaky" iff z_a <= c <= z_b (a <= b).
  range_u, range_r = np.ptp(u, 0), np.ptp(r, 0)
  range_pos = np.where(r_pos, range_r, range_u)
  range_neg = np.where(r_pos, range_u, range_r)
  peaky_r = np.where(range_pos >= range_neg, ~r_pos, r_pos)  # reference's swap
  in_u = le_u[None, :, :] - nu + ge_u[:, None, :]  # [m(a), m(b), k]
  in_r = le_r[None, :, :] - nr + ge_r[:, None, :]
  tp2 = np.where(peaky_r, in_r, in_u)
  fp2 = np.where(peaky_r, in_u, in_r)
  n_pk, n_ot = np.where(peaky_r, nr, nu), np.where(peaky_r, nu, nr)
  double = _rule_epsilons(fp2, n_ot, n_pk - tp2, n_pk, delta)
  upper = np.triu(np.ones((z.shape[0],) * 2, dtype=bool))[:, :, None]
  double = np.where(upper, double, np.nan)

  rules = np.concatenate([single, double.reshape(-1, z.shape[1])], axis=0)
  kept = ~np.isnan(rules)
  eps = np.where(kept.any(0), np.max(np.where(kept, rules, -np.inf), axis=0), 0.0)
  small, large = np.minimum(range_u, range_r), np.maximum(range_u, range_r)
  with np.errstate(divide='ignore', invalid='ignore'):
    peaky = (large > 0) & (small / large < PEAKY_RATIO)
  return np.clip(np.where(peaky, cap, eps), 0.0, cap)


def forget_quality(epsilons, num_models):
  """The competition's forget score H in [0, 1] from per-example epsilons.

  Buckets of width 0.5 from 0 up to ceil(log(num_models - 1)); an epsilon in bucket k earns
  2**-k points, one beyond the last bucket earns 0; H is the mean over examples (metric.py
  `compute_forget_score_from_confs`, num_models = the number of unlearned models). Deviation:
  with num_models <= 2 there is no bucket (the reference then returns 0 for any model); here
  the result is nan with a warning, as it is for any non-finite epsilon.
  """
  e = np.asarray(epsilons, dtype=np.float64).reshape(-1)
  if e.size == 0:
    raise ValueError('forget_quality: no epsilons')
  if num_models < 3:
    log.warning('forget_quality: %d models give no epsilon bucket (needs >= 3, the scale is '
                'ceil(log(num_models - 1))); the result is nan', num_models)
    return float('nan')
  bad = int(np.sum(~np.isfinite(e)))
  if bad:
    log.warning('forget_quality: %d of %d epsilons are nan or infinite; the result is nan',
                bad, e.size)
    return float('nan')
  max_eps = math.ceil(math.log(num_models - 1))
  n_buckets = int(round(max_eps / BUCKET_WIDTH))
  k = np.maximum(np.floor(e / BUCKET_WIDTH), 0.0)  # exact: BUCKET_WIDTH is a power of two
  points = np.where(k < n_buckets, 0.5 ** np.minimum(k, n_buckets), 0.0)
  return float(np.mean(points))


def competition_score(epsilons, retain_acc, retain_acc_retrain, test_acc, test_acc_retrain,
                      num_models):
  """H * (RA / RA_retrain) * (TA / TA_retrain), the competition's final score (main.py).

  Each accuracy may be one number or one per model (then its mean is used, as main.py does).
  The ratios are not capped. A zero or non-finite retrained accuracy gives nan (warned).
  """
  h = forget_quality(epsilons, num_models)
  accs = [float(np.mean(np.asarray(a, dtype=np.float64))) for a in
          (retain_acc, retain_acc_retrain, test_acc, test_acc_retrain)]
  ra, ra_r, ta, ta_r = accs
  if not all(math.isfinite(a) for a in accs) or ra_r == 0 or ta_r == 0:
    log.warning('competition_score: an accuracy is nan/infinite or a retrained accuracy is 0; '
                'the result is nan')
    return float('nan')
  return h * (ra / ra_r) * (ta / ta_r)


# ---------------------------------------------------------------------------------------------
# Patient aggregation.

def patient_max(values, groups):
  """(sorted unique group ids [G], per-group max [..., G]) of values [..., n].

  A patient is as exposed as their most exposed image. nan in a group gives nan for it.
  """
  v = np.asarray(values, dtype=np.float64)
  g = np.asarray(groups)
  if v.ndim < 1 or g.shape != v.shape[-1:]:
    raise ValueError(f'groups shape {g.shape} does not match values shape {v.shape} '
                     '(want the last axis)')
  if g.size == 0:
    raise ValueError('patient_max: no examples')
  ids, inv = np.unique(g, return_inverse=True)
  order = np.argsort(inv.reshape(-1), kind='stable')
  starts = np.searchsorted(inv.reshape(-1)[order], np.arange(ids.size))
  return ids, np.maximum.reduceat(v[..., order], starts, axis=-1)


# ---------------------------------------------------------------------------------------------
# U-LiRA.

def _fpr_key(f):
  return f'tpr_at_{100 * f:g}pct_fpr'


def _log_normal(x, mu, sd):
  """Gaussian log density without the constant (it cancels in a ratio)."""
  return -0.5 * np.square((x - mu) / sd) - np.log(sd)


def ulira_scores(unlearned, retrained, min_std=ULIRA_MIN_STD):
  """Held-out log likelihood ratios: (positives [Nu, n], negatives [Nr, n]).

  Score of a target model on an example = log N(s; unlearned fit) - log N(s; retrained fit),
  with Gaussians (mean, MLE std as scipy.stats.norm.fit, floored at `min_std`) fit per example.
  Each model is a target in turn, excluded from the fit of its own side; to keep both fits the
  same size, one model of the other side is held out with it (unlearned target i with retrained
  model i mod Nr, retrained target j with unlearned model j mod Nu). Equal N gives N folds
  "seed i of both sides held out", scored with the same two fits. Deviation from a plain
  leave-one-out: fitting the target's side on N - 1 models and the other on N biases every
  target toward the other side (the smaller fit predicts worse), i.e. AUC < 0.5 under the null.
  Needs >= 3 models per side (callers check).
  """
  u, r = _pair(unlearned, retrained)
  nu, nr = u.shape[0], r.shape[0]
  fits = {}

  def fit(side, drop):
    if (side, drop) not in fits:
      a = np.delete(u if side == 'u' else r, drop, axis=0)
      fits[side, drop] = (a.mean(0), np.maximum(a.std(0), min_std))
    return fits[side, drop]

  def score(x, drop_u, drop_r):
    (mu_u, sd_u), (mu_r, sd_r) = fit('u', drop_u), fit('r', drop_r)
    return _log_normal(x, mu_u, sd_u) - _log_normal(x, mu_r, sd_r)

  pos = np.stack([score(u[i], i, i % nr) for i in range(nu)])
  neg = np.stack([score(r[j], j % nu, j) for j in range(nr)])
  return pos, neg


def ulira(unlearned, retrained, fprs=ULIRA_FPRS, groups=None, min_std=ULIRA_MIN_STD):
  """U-LiRA: can a per-example likelihood-ratio attack tell unlearned from retrained models?

  Positives are (unlearned target, example) pairs, negatives (retrained target, example) pairs,
  scored by `ulira_scores` (leave-out fits, see there). With `groups` ([n] patient ids) a
  target's score for a patient is the max over the patient's examples and pairs are
  (target, patient). Returns {'auc', 'tpr_at_<100f>pct_fpr' per f in fprs, 'n_targets'
  (models scored), 'n_pairs', 'n_units' (examples or patients)}. AUC is sklearn's
  roc_auc_score (ties count half); TPR at FPR f is the conservative step: the best TPR of a
  threshold whose FPR is <= f (no interpolation; with few negatives only FPR 0 may qualify).
  0.5 / f are chance; 1.0 is a perfect attack. nan (warned) with < 3 models per side or a
  non-finite statistic.
  """
  u, r = _pair(unlearned, retrained)
  n = u.shape[1]
  if groups is not None and np.asarray(groups).shape != (n,):
    raise ValueError(f'groups shape {np.asarray(groups).shape} does not match {n} examples')
  out = {'auc': float('nan'), **{_fpr_key(f): float('nan') for f in fprs},
         'n_targets': int(u.shape[0] + r.shape[0]), 'n_pairs': 0,
         'n_units': int(n if groups is None else np.unique(groups).size)}
  if not _enough('ulira', u, r, 3) or _bad_examples('ulira', u, r, whole=True).any():
    return out
  pos, neg = ulira_scores(u, r, min_std)
  if groups is not None:
    pos, neg = patient_max(pos, groups)[1], patient_max(neg, groups)[1]
  y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
  s = np.concatenate([pos.reshape(-1), neg.reshape(-1)])
  fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
  out['auc'] = float(roc_auc_score(y, s))
  for f in fprs:
    out[_fpr_key(f)] = float(np.max(tpr[fpr <= f]))
  out['n_pairs'] = int(y.size)
  return out


# ---------------------------------------------------------------------------------------------
# The flat summary for comparison.json.

def _pct(values, q):
  return float(np.percentile(values, q))  # nan in -> nan out (already warned)


def summarize(unlearned_margins_by_set, retrained_margins_by_set, forget_groups=None, *,
              retain_acc=None, retain_acc_retrain=None, test_acc=None, test_acc_retrain=None,
              delta=DELTA, fprs=ULIRA_FPRS, percentile=KLOM_PERCENTILE, klom_bins=KLOM_BINS,
              klom_eps=KLOM_EPS, klom_clip=KLOM_CLIP):
  """Flat dict of the distributional metrics of one method, for comparison.json.

  unlearned_margins_by_set / retrained_margins_by_set: {set name: [N, n_set] margins} (model
  axis first, example order the same on both sides); 'forget' is required, 'retain' and
  'test' (and any other set present on both sides) get a KLoM. forget_groups: [n_forget]
  patient ids (optional) for the `_patient` twins. The four accuracies (each a number or one
  per model) are all given or all omitted; with them `eps_score` = competition score.

  Keys (None where the input was not given, nan where undefined, e.g. one seed):
    klom_p95_<set>             95th percentile over examples of per-example KLoM (-> 0)
    eps_p95_forget             95th percentile of per-example epsilon (-> 0)
    forget_quality             H in [0, 1] over forget examples (-> 1)
    eps_score                  H * RA/RA_r * TA/TA_r (-> 1; None without accuracies)
    ulira_auc, ulira_tpr_at_1pct_fpr, ulira_tpr_at_5pct_fpr  (-> 0.5, 0.01, 0.05)
    <each forget key above>_patient: per-patient max over the patient's images first
      (klom_p95_forget_patient, eps_p95_forget_patient, forget_quality_patient,
      eps_score_patient, ulira_auc_patient, ulira_tpr_at_1pct_fpr_patient, ...)
    n_unlearned, n_retrained, n_forget, n_forget_patients
  """
  ul, rt = unlearned_margins_by_set, retrained_margins_by_set
  if 'forget' not in ul or 'forget' not in rt:
    raise ValueError(f"summarize needs a 'forget' set on both sides, got unlearned "
                     f"{sorted(ul)} and retrained {sorted(rt)}")
  accs = (retain_acc, retain_acc_retrain, test_acc, test_acc_retrain)
  if any(a is None for a in accs) and not all(a is None for a in accs):
    raise ValueError('summarize: give all four accuracies (retain_acc, retain_acc_retrain, '
                     'test_acc, test_acc_retrain) or none')
  uf, rf = _pair(ul['forget'], rt['forget'])
  nu = uf.shape[0]
  if forget_groups is not None and np.asarray(forget_groups).shape != (uf.shape[1],):
    raise ValueError(f'forget_groups shape {np.asarray(forget_groups).shape} does not match '
                     f'{uf.shape[1]} forget examples')
  kw = dict(bins=klom_bins, eps=klom_eps, clip=klom_clip)
  k_f = klom(uf, rf, **kw)
  out = {'klom_p95_forget': _pct(k_f, percentile)}
  extra = sorted(set(ul) & set(rt) - {'forget', 'retain', 'test'})
  for name in ['retain', 'test'] + extra:
    both = name in ul and name in rt
    out[f'klom_p95_{name}'] = (_pct(klom(ul[name], rt[name], **kw), percentile) if both
                               else None)
  e_f = per_example_epsilon(uf, rf, delta=delta)
  score = (lambda e: competition_score(e, *accs, num_models=nu)) if accs[0] is not None else (
      lambda e: None)
  out['eps_p95_forget'] = _pct(e_f, percentile)
  out['forget_quality'] = forget_quality(e_f, nu)
  out['eps_score'] = score(e_f)
  u_res = ulira(uf, rf, fprs=fprs)
  out.update({f'ulira_{k}': u_res[k] for k in ['auc'] + [_fpr_key(f) for f in fprs]})
  patient_keys = ['klom_p95_forget', 'eps_p95_forget', 'forget_quality', 'eps_score',
                  'ulira_auc'] + [f'ulira_{_fpr_key(f)}' for f in fprs]
  if forget_groups is None:
    out.update({f'{k}_patient': None for k in patient_keys})
  else:
    e_p = patient_max(e_f, forget_groups)[1]
    out['klom_p95_forget_patient'] = _pct(patient_max(k_f, forget_groups)[1], percentile)
    out['eps_p95_forget_patient'] = _pct(e_p, percentile)
    out['forget_quality_patient'] = forget_quality(e_p, nu)
    out['eps_score_patient'] = score(e_p)
    p_res = ulira(uf, rf, fprs=fprs, groups=forget_groups)
    out.update({f'ulira_{k}_patient': p_res[k] for k in ['auc'] + [_fpr_key(f) for f in fprs]})
  out['n_unlearned'], out['n_retrained'] = nu, int(rf.shape[0])
  out['n_forget'] = int(uf.shape[1])
  out['n_forget_patients'] = (None if forget_groups is None
                              else int(np.unique(forget_groups).size))
  return out
