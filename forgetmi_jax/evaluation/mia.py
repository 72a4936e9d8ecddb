"""Black-box membership-inference attacks on per-sample losses (REFERENCE 5 and 8.5).

`svc_mia` is the paper's metric, exactly: an RBF SVC (C=3, gamma='auto') learns "member" from
retain losses and "non-member" from test losses, and the score is the fraction of forget samples
it calls members. Lower = more forgotten; the retrained model's score is the target.

The SVC score is coarse (it is a fraction thresholded by an imbalanced classifier: ~6,000
retain vs 531 test losses), so `logreg_mia` adds a stronger, calibrated view: a class-balanced
logistic regression with cross-validated attack AUC and the AUC separating forget from test.
"""
import logging
import math

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

# Above this many retain losses, `svc_mia(max_train=None)` subsamples the retain set (seeded):
# libsvm fits in O(n^2) and the paper's largest retain set (6,010) is far below it.
DEFAULT_MAX_TRAIN = 20000
# +inf losses (a probability of exactly 0) are clipped here so the kernels stay finite.
LOSS_CLIP = 1e6
LOG_EPS = 1e-12

log = logging.getLogger(__name__)


def _losses(x, name):
  """Float64 losses [N]; empty is an error (a wiring bug), nan is not (a diverged model)."""
  a = np.asarray(x, dtype=np.float64).reshape(-1)
  if a.size == 0:
    raise ValueError(f'{name} losses are empty')
  return a


def _invalid(fn, name, sets):
  """True (after a logged warning) when a loss set holds nan or -inf: a diverged model.

  CE is >= 0, so -inf is as meaningless as nan. +inf stays valid (a probability of exactly 0)
  and is clipped to LOSS_CLIP by the attacks. Only counts are logged, never values.
  """
  bad = {k: int(np.sum(np.isnan(a) | (a == -np.inf))) for k, a in sets.items()}
  bad = {k: v for k, v in bad.items() if v}
  if not bad:
    return False
  counts = ', '.join(f'{v} of {sets[k].size} {k}' for k, v in bad.items())
  model = f'model {name!r}: ' if name is not None else ''
  log.warning('%s: %slosses are nan or -inf (%s); the attack result is nan', fn, model, counts)
  return True


def batch_mean_losses(losses, batch_size=32, drop_last=False):
  """One mean loss per consecutive batch, in the given order (REFERENCE 8.5).

  The public code feeds the MIA one batch-mean loss per batch of 32 instead of per-sample
  losses. The last, partial batch is kept by default (a torch DataLoader's drop_last=False).
  """
  a = np.asarray(losses, dtype=np.float64).reshape(-1)
  if batch_size < 1:
    raise ValueError('batch_size must be >= 1')
  n_full = a.size // batch_size
  means = [a[i * batch_size:(i + 1) * batch_size].mean() for i in range(n_full)]
  if not drop_last and a.size % batch_size:
    means.append(a[n_full * batch_size:].mean())
  return np.asarray(means, dtype=np.float64)


def svc_mia(retain_losses, test_losses, forget_losses, seed=0, max_train=None,
            per_batch_mean=False, batch_size=32, return_details=False, name=None,
            retain_weight=None):
  """Fraction of forget samples an SVC trained on retain (member) vs test (non-member) calls member.

  Features are the losses as a column vector; `SVC(C=3, kernel='rbf', gamma='auto')` as in
  REFERENCE 5. The fit itself is deterministic; the only randomness is the optional retain
  subsample: `max_train` caps the number of retain losses used to fit (drawn without
  replacement by `np.random.default_rng(seed)`); None means "all of them unless there are more
  than DEFAULT_MAX_TRAIN". Subsampling shifts the member/non-member ratio, which moves the
  SVC's threshold, so it is reported in the details.

  `retain_weight` (beyond the paper): every retain loss counts this many times in the SVC's
  objective (libsvm's per-sample C), so a retain sample stands in for a larger retain set
  and keeps the member : non-member balance that sets the SVC's threshold.

  `per_batch_mean=True` reproduces the public code's quirk (REFERENCE 8.5): each of the three
  sets is first reduced to one mean loss per consecutive batch of `batch_size`.

  A diverged model (nan or -inf losses in any set) gives nan, and a logged warning naming
  `name` (the model), instead of an exception, so a long run still writes its report.

  Returns a float, or with `return_details=True` a dict: `forget_member_rate` (= `score`, the
  float) and the attack's member rates on its own training data (`retain_member_rate`,
  `test_member_rate`): the score only means something relative to those; and the set sizes
  the attack used (`n_retain`, `n_test`, `n_forget`; `n_retain_total` before subsampling).
  """
  retain = _losses(retain_losses, 'retain')
  test = _losses(test_losses, 'test')
  forget = _losses(forget_losses, 'forget')
  limit = DEFAULT_MAX_TRAIN if max_train is None else int(max_train)
  if limit < 1:
    raise ValueError('max_train must be >= 1')
  if _invalid('svc_mia', name, {'retain': retain, 'test': test, 'forget': forget}):
    rates = dict.fromkeys(('score', 'forget_member_rate', 'retain_member_rate',
                           'test_member_rate'), math.nan)
    if per_batch_mean:
      retain, test, forget = (batch_mean_losses(a, batch_size) for a in (retain, test, forget))
    sizes = {'n_retain': int(min(retain.size, limit)), 'n_retain_total': int(retain.size),
             'n_test': int(test.size), 'n_forget': int(forget.size)}
    return dict(rates, **sizes, per_batch_mean=bool(per_batch_mean)) if return_details else math.nan
  retain, test, forget = (np.clip(a, -LOSS_CLIP, LOSS_CLIP) for a in (retain, test, forget))
  if per_batch_mean:
    retain, test, forget = (batch_mean_losses(a, batch_size) for a in (retain, test, forget))
  n_retain_total = retain.size
  if retain.size > limit:
    rng = np.random.default_rng(seed)
    retain = retain[np.sort(rng.choice(retain.size, size=limit, replace=False))]
  x = np.concatenate([retain, test])[:, None]
  y = np.concatenate([np.ones(retain.size), np.zeros(test.size)]).astype(np.int64)
  clf = SVC(C=3, kernel='rbf', gamma='auto', random_state=seed)
  weight = None
  if retain_weight is not None:
    weight = np.r_[np.full(retain.size, float(retain_weight)), np.ones(test.size)]
  clf.fit(x, y, sample_weight=weight)
  score = float(np.mean(clf.predict(forget[:, None]) == 1))
  if not return_details:
    return score
  return {
      'score': score,
      'forget_member_rate': score,
      'retain_member_rate': float(np.mean(clf.predict(retain[:, None]) == 1)),
      'test_member_rate': float(np.mean(clf.predict(test[:, None]) == 1)),
      'n_retain': int(retain.size),
      'n_retain_total': int(n_retain_total),
      'n_test': int(test.size),
      'n_forget': int(forget.size),
      'per_batch_mean': bool(per_batch_mean),
  }


def _features(losses):
  """[loss, log loss]: the log spreads the near-zero losses of memorised samples apart."""
  return np.stack([losses, np.log(np.maximum(losses, LOG_EPS))], axis=1)


def _auc(pos_scores, neg_scores):
  if pos_scores.size == 0 or neg_scores.size == 0:
    return math.nan
  y = np.concatenate([np.ones(pos_scores.size), np.zeros(neg_scores.size)])
  return float(roc_auc_score(y, np.concatenate([pos_scores, neg_scores])))


def logreg_mia(retain_losses, test_losses, forget_losses, seed=0, n_splits=5, name=None):
  """A stronger loss attack: balanced logistic regression on [loss, log loss].

  Stratified k-fold (shuffled with `seed`) over retain (1) vs test (0) gives out-of-fold
  scores, hence an honest `attack_auc` / `attack_balanced_accuracy` of how well the model's
  losses reveal membership at all. Forget samples are scored by every fold's model (averaged
  log-odds) and compared with the test samples' out-of-fold scores, so no score comes from a
  model that saw that sample:
  - `forget_member_rate`: fraction of forget samples with log-odds > 0 (balanced prior);
  - `forget_vs_test_auc`: AUC separating forget (positive) from test (negative); 0.5 = the
    forget set looks like unseen data, 1.0 = it still looks like training data.
  Nan or -inf losses (a diverged model) give nan rates and AUCs and a logged warning naming
  `name`, not an exception.
  """
  retain = _losses(retain_losses, 'retain')
  test = _losses(test_losses, 'test')
  forget = _losses(forget_losses, 'forget')
  k = min(int(n_splits), retain.size, test.size)
  if k < 2:
    raise ValueError('logreg_mia needs at least 2 retain and 2 test losses')
  sizes = {'n_splits': int(k), 'n_retain': int(retain.size), 'n_test': int(test.size),
           'n_forget': int(forget.size)}
  if _invalid('logreg_mia', name, {'retain': retain, 'test': test, 'forget': forget}):
    return dict(dict.fromkeys(('attack_auc', 'attack_balanced_accuracy', 'forget_member_rate',
                               'forget_vs_test_auc'), math.nan), **sizes)
  retain, test, forget = (np.clip(a, -LOSS_CLIP, LOSS_CLIP) for a in (retain, test, forget))
  x = _features(np.concatenate([retain, test]))
  y = np.concatenate([np.ones(retain.size), np.zeros(test.size)]).astype(np.int64)
  xf = _features(forget)
  oof = np.empty(y.size, dtype=np.float64)
  forget_scores = np.zeros(forget.size, dtype=np.float64)
  folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
  for train_idx, val_idx in folds.split(x, y):
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight='balanced', max_iter=1000, random_state=seed))
    clf.fit(x[train_idx], y[train_idx])
    oof[val_idx] = clf.decision_function(x[val_idx])
    forget_scores += clf.decision_function(xf) / k
  test_scores = oof[y == 0]
  return {
      'attack_auc': float(roc_auc_score(y, oof)),
      'attack_balanced_accuracy': float(balanced_accuracy_score(y, (oof > 0).astype(np.int64))),
      'forget_member_rate': float(np.mean(forget_scores > 0)),
      'forget_vs_test_auc': _auc(forget_scores, test_scores),
      **sizes,
  }
