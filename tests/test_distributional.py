"""Distributional metrics on constructed cases with known answers, and against independent
computations (scipy, np.histogram, brute-force loops, a hand-worked example)."""
import itertools
import logging
import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from forgetmi_jax.evaluation import distributional as d

LOGGER = 'forgetmi_jax.evaluation.distributional'


def _rng(seed=0):
  return np.random.default_rng(seed)


# --- margins ---------------------------------------------------------------------------------

def test_margins_match_scipy_logsumexp_of_the_other_classes():
  r = _rng()
  logits = r.normal(0, 5, size=(3, 7, 4))
  labels = r.integers(0, 4, size=7)
  got = d.margins(logits, labels)
  assert got.shape == (3, 7)
  for m in range(3):
    for i in range(7):
      others = np.delete(logits[m, i], labels[i])
      want = logits[m, i, labels[i]] - logsumexp(others)
      assert got[m, i] == pytest.approx(want, abs=1e-12)
  # The competition's logit-scaled confidence log p_y - log(1 - p_y) is the same number.
  p = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
  py = np.take_along_axis(p, np.broadcast_to(labels[:, None], (3, 7, 1)), -1)[..., 0]
  np.testing.assert_allclose(got, np.log(py) - np.log1p(-py), atol=1e-9)


def test_margins_nonfinite_rows_are_nan_and_bad_shapes_raise(caplog):
  logits = np.zeros((3, 2))
  logits[1, 0] = np.nan
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    m = d.margins(logits, np.array([0, 1, 0]))
  assert np.isnan(m[1]) and np.isfinite(m[[0, 2]]).all()
  assert '1 of 3 rows' in caplog.text
  with pytest.raises(ValueError, match=r'\(4,\)'):
    d.margins(np.zeros((3, 2)), np.zeros(4, dtype=int))
  with pytest.raises(ValueError, match='outside'):
    d.margins(np.zeros((3, 2)), np.array([0, 2, 1]))


# --- KLoM ------------------------------------------------------------------------------------

def _reference_klom(p, q, bins=20, eps=1e-5, lo=-100.0, hi=100.0):
  """One example, written from the reference's steps with np.histogram + scipy entropy."""
  p, q = np.clip(p, lo, hi), np.clip(q, lo, hi)
  a, b = min(p.min(), q.min()), max(p.max(), q.max())
  if a >= b:
    b = a + 1
  edges = np.linspace(a, b, bins + 1)
  pp = np.histogram(p, edges)[0] / p.size
  qq = np.histogram(q, edges)[0] / q.size
  qs = np.where(pp > 0, np.maximum(qq, eps), qq)
  return stats.entropy(pp, qs)


def test_klom_identical_samples_are_exactly_zero():
  x = _rng(1).normal(size=(6, 50))
  np.testing.assert_array_equal(d.klom(x, x.copy()), np.zeros(50))


def test_klom_disjoint_samples_give_the_maximum():
  r = _rng(2)
  u = r.uniform(0.0, 0.1, size=(5, 4))  # all in the first bin of [0, 11]
  rt = r.uniform(10.0, 11.0, size=(5, 4))
  np.testing.assert_allclose(d.klom(u, rt), d.klom_max(), rtol=1e-12)
  assert d.klom_max() == pytest.approx(math.log(1 + 1e5))
  # Constant against constant: the reference's digitize would drop the max sample (KL 0).
  np.testing.assert_allclose(d.klom(np.zeros((3, 1)), np.full((3, 1), 5.0)), d.klom_max())
  # Disjoint but spread over several bins: large, below the maximum.
  spread = d.klom(r.uniform(0, 5, size=(8, 4)), r.uniform(6, 11, size=(8, 4)))
  assert (spread > 8).all() and (spread < d.klom_max()).all()


def test_klom_matches_the_reference_formula_per_example():
  r = _rng(3)
  u = r.normal(0, 2, size=(7, 30))
  rt = r.normal(0.7, 1, size=(9, 30))
  u[:, 0] = 300.0  # clipped to 100
  rt[:3, 1] = u[0, 1]  # ties with an unlearned sample
  got = d.klom(u, rt)
  want = [_reference_klom(u[:, i], rt[:, i]) for i in range(30)]
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_klom_gaussian_sanity_against_analytic_kl():
  # KL(N(0,1) || N(mu, s^2)) = log s + (1 + mu^2) / (2 s^2) - 1/2. With 20,000 samples and
  # 20 bins the binned estimate is within 0.03 (binning bias + sampling noise, seeded).
  r = _rng(4)
  for mu, s in [(0.5, 1.0), (1.0, 1.0), (0.0, 2.0)]:
    u = r.normal(0, 1, size=(20000, 2))
    rt = r.normal(mu, s, size=(20000, 2))
    exact = math.log(s) + (1 + mu ** 2) / (2 * s ** 2) - 0.5
    np.testing.assert_allclose(d.klom(u, rt), exact, atol=0.03)


# --- competition epsilon ---------------------------------------------------------------------

def test_epsilon_hand_worked_four_vs_four():
  # Unlearned {0,1,2,3}, retrained {2,3,4,5}: ranges 3 and 3 (not peaky); retrained has the
  # larger median. Rule "c >= 3": TPR = 3/4 (3,4,5), FNR = 1/4, FPR = 1/4 (unlearned 3), so
  # eps = log(1 - delta - 1/4) - log(1/4) = log(3 - 4 delta). Interval [0, 2] calling the
  # (tie -> smaller-median) unlearned side positive: FNR 1/4, FPR 1/4 (retrained 2): the same.
  # Rules with both rates > 0 have both >= 1/4 here, so nothing beats log(3 - 4 delta); "c >= 4"
  # (FPR 0, FNR 1/2) is discarded, not infinite.
  u = np.array([[0.0], [1.0], [2.0], [3.0]])
  rt = np.array([[2.0], [3.0], [4.0], [5.0]])
  delta = 1e-5
  assert d.per_example_epsilon(u, rt, delta=delta)[0] == pytest.approx(math.log(3 - 4 * delta),
                                                                        rel=1e-12)
  assert d.per_example_epsilon(rt, u, delta=delta)[0] == pytest.approx(math.log(3 - 4 * delta))
  # delta = 0.1: log(0.65) - log(0.25) = log(2.6).
  assert d.per_example_epsilon(u, rt, delta=0.1)[0] == pytest.approx(math.log(2.6))


def test_epsilon_special_cases():
  x = _rng(5).normal(size=(6, 3))
  np.testing.assert_array_equal(d.per_example_epsilon(x, x.copy()), 0.0)  # identical
  np.testing.assert_array_equal(d.per_example_epsilon(x, x + 100.0), d.EPSILON_CAP)  # separated
  peaky = np.full((6, 3), 0.5) + np.linspace(0, 0.001, 6)[:, None]  # range 0.001 vs ~2
  np.testing.assert_array_equal(d.per_example_epsilon(peaky, x), d.EPSILON_CAP)
  same_const = d.per_example_epsilon(np.ones((3, 2)), np.ones((4, 2)))
  np.testing.assert_array_equal(same_const, 0.0)  # the reference asserts here; nothing differs


def _brute_epsilon(u, r, delta=1e-5, cap=50.0):
  """Pure-python twin: every real threshold / interval, via midpoints between sample values."""
  pos_r = np.median(r) > np.median(u)
  pos, neg = (r, u) if pos_r else (u, r)
  rp, rn = np.ptp(pos), np.ptp(neg)
  small, large = min(rp, rn), max(rp, rn)
  if large > 0 and small / large < 0.01:
    return cap
  vals = np.unique(np.concatenate([u, r]))
  cuts = np.concatenate([[vals[0] - 1], (vals[:-1] + vals[1:]) / 2, [vals[-1] + 1]])
  rules = []
  for t in cuts:  # c >= t, larger median positive
    rules.append((np.mean(neg >= t), np.mean(pos < t)))
  pk, ot = (neg, pos) if rp >= rn else (pos, neg)
  for lo, hi in itertools.combinations(cuts, 2):  # lo < c < hi, peakier positive
    inside = lambda a: (a > lo) & (a < hi)
    rules.append((np.mean(inside(ot)), np.mean(~inside(pk))))
  best = None
  for fpr, fnr in rules:
    if fpr == 0 and fnr == 0:
      return cap
    if fpr == 0 or fnr == 0:
      continue
    cands = [math.log(1 - delta - a) - math.log(b) for a, b in [(fpr, fnr), (fnr, fpr)]
             if 1 - delta - a > 0]
    if cands:
      e = max(0.0, max(cands))
      best = e if best is None else max(best, e)
  return 0.0 if best is None else min(best, cap)


def test_epsilon_matches_a_brute_force_enumeration():
  r = _rng(6)
  u = np.round(r.normal(0, 1, size=(4, 40)), 1)  # rounding makes ties
  rt = np.round(r.normal(0.8, 1.3, size=(5, 40)), 1)
  got = d.per_example_epsilon(u, rt)
  want = [_brute_epsilon(u[:, i], rt[:, i]) for i in range(40)]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_forget_quality_buckets_and_competition_score(caplog):
  # 10 models: max epsilon ceil(log 9) = 3, six buckets of 0.5: 1, 1/2, 1/4, ..., 1/32.
  eps = [0.0, 0.49, 0.5, 1.2, 2.99, 3.0, 50.0]
  want = (1 + 1 + 0.5 + 0.25 + 1 / 32 + 0 + 0) / 7
  assert d.forget_quality(eps, 10) == pytest.approx(want)
  # 3 models: ceil(log 2) = 1, two buckets.
  assert d.forget_quality([0.4, 0.7, 1.0], 3) == pytest.approx((1 + 0.5 + 0) / 3)
  score = d.competition_score(eps, 0.9, 0.95, [0.7, 0.8], 0.8, 10)
  assert score == pytest.approx(want * (0.9 / 0.95) * (0.75 / 0.8))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert math.isnan(d.forget_quality([0.1], 2))
    assert math.isnan(d.forget_quality([0.1, np.nan], 10))
  assert 'no epsilon bucket' in caplog.text and '1 of 2 epsilons' in caplog.text


# --- U-LiRA ----------------------------------------------------------------------------------

def _brute_scores(u, r):
  """Independent scores: scipy norm.fit / logpdf, paired hold-out, explicit loops."""
  nu, nr = len(u), len(r)
  pos, neg = [], []
  for i in range(nu):
    a, b = np.delete(u, i, 0), np.delete(r, i % nr, 0)
    pos.append([stats.norm.logpdf(u[i, k], *stats.norm.fit(a[:, k]))
                - stats.norm.logpdf(u[i, k], *stats.norm.fit(b[:, k]))
                for k in range(u.shape[1])])
  for j in range(nr):
    a, b = np.delete(u, j % nu, 0), np.delete(r, j, 0)
    neg.append([stats.norm.logpdf(r[j, k], *stats.norm.fit(a[:, k]))
                - stats.norm.logpdf(r[j, k], *stats.norm.fit(b[:, k]))
                for k in range(u.shape[1])])
  return np.array(pos), np.array(neg)


def _mann_whitney(pos, neg):
  pos, neg = np.ravel(pos), np.ravel(neg)
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  return wins / (pos.size * neg.size)


def _tpr_at(pos, neg, f):
  pos, neg = np.ravel(pos), np.ravel(neg)
  best = 0.0
  for t in np.concatenate([pos, neg, [np.inf]]):
    if np.mean(neg >= t) <= f:
      best = max(best, np.mean(pos >= t))
  return best


def test_ulira_identical_arrays_give_exactly_one_half():
  x = _rng(7).normal(size=(4, 25))
  res = d.ulira(x, x.copy())
  assert res['auc'] == 0.5
  assert res['tpr_at_1pct_fpr'] == 0.0  # all scores tie: no threshold below 1% FPR finds any
  assert res['n_targets'] == 8 and res['n_pairs'] == 200 and res['n_units'] == 25


def test_ulira_disjoint_distributions_are_perfectly_attacked():
  r = _rng(8)
  res = d.ulira(r.normal(0, 1, size=(4, 30)), r.normal(20, 1, size=(5, 30)))
  assert res['auc'] == 1.0 and res['tpr_at_1pct_fpr'] == 1.0 and res['tpr_at_5pct_fpr'] == 1.0


def test_ulira_matches_brute_force_scores_and_mann_whitney():
  r = _rng(9)
  u = r.normal(0.3, 1, size=(4, 12))
  rt = r.normal(0, 1.2, size=(5, 12))
  pos, neg = d.ulira_scores(u, rt)
  bp, bn = _brute_scores(u, rt)
  np.testing.assert_allclose(pos, bp, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(neg, bn, rtol=1e-9, atol=1e-9)
  res = d.ulira(u, rt, fprs=(0.01, 0.05, 0.2))
  assert res['auc'] == pytest.approx(_mann_whitney(bp, bn), abs=1e-12)
  for f in (0.01, 0.05, 0.2):
    assert res[f'tpr_at_{100 * f:g}pct_fpr'] == pytest.approx(_tpr_at(bp, bn, f))


def test_ulira_patient_level_takes_each_patients_max():
  r = _rng(10)
  u = r.normal(0.5, 1, size=(3, 9))
  rt = r.normal(0, 1, size=(3, 9))
  groups = np.array([7, 7, 3, 3, 3, 9, 1, 1, 1])
  res = d.ulira(u, rt, groups=groups)
  bp, bn = _brute_scores(u, rt)
  ids = [1, 3, 7, 9]
  pp = np.array([[bp[t, groups == g].max() for g in ids] for t in range(3)])
  pn = np.array([[bn[t, groups == g].max() for g in ids] for t in range(3)])
  assert res['n_units'] == 4 and res['n_pairs'] == 24
  assert res['auc'] == pytest.approx(_mann_whitney(pp, pn))


def test_ulira_paired_holdout_is_unbiased_where_plain_leave_one_out_is_not():
  # Same law on both sides: the paired hold-out is at chance; fitting the target's side on
  # N - 1 models and the other on N (plain leave-one-out) is biased below 0.5.
  r = _rng(11)
  u, rt = r.normal(size=(4, 3000)), r.normal(size=(4, 3000))
  assert abs(d.ulira(u, rt)['auc'] - 0.5) < 0.015

  def lp(x, a):
    return stats.norm.logpdf(x, a.mean(0), a.std(0))
  pos = [lp(u[i], np.delete(u, i, 0)) - lp(u[i], rt) for i in range(4)]
  neg = [lp(rt[j], u) - lp(rt[j], np.delete(rt, j, 0)) for j in range(4)]
  y = np.r_[np.ones(4 * 3000), np.zeros(4 * 3000)]
  assert roc_auc_score(y, np.r_[np.ravel(pos), np.ravel(neg)]) < 0.45


# --- patients, guards, summary ---------------------------------------------------------------

def test_patient_max_hand_example():
  ids, mx = d.patient_max([0.2, 0.9, 0.1, 0.5, 0.3], ['b', 'a', 'b', 'c', 'a'])
  assert list(ids) == ['a', 'b', 'c']
  np.testing.assert_array_equal(mx, [0.9, 0.2, 0.5])
  ids, mx = d.patient_max(np.array([[1, 2, 3], [6, 5, 4]]), [2, 1, 2])
  np.testing.assert_array_equal(ids, [1, 2])
  np.testing.assert_array_equal(mx, [[2, 3], [5, 6]])
  with pytest.raises(ValueError, match=r'\(2,\)'):
    d.patient_max([1.0, 2.0, 3.0], [1, 2])


def test_one_model_per_side_gives_nan_with_a_warning(caplog):
  x = _rng(12).normal(size=(1, 5))
  y = _rng(13).normal(size=(4, 5))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert np.isnan(d.klom(x, y)).all()
    assert np.isnan(d.per_example_epsilon(x, y)).all()
    assert math.isnan(d.ulira(x, y)['auc'])
  assert caplog.text.count('one seed has no distribution') == 3
  assert 'got 1 unlearned and 4 retrained' in caplog.text


def test_nonfinite_inputs_are_nan_and_warned_by_count_only(caplog):
  r = _rng(14)
  u, rt = r.normal(size=(4, 6)), r.normal(size=(4, 6))
  u[2, 1] = np.nan
  rt[0, 4] = np.inf
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    k = d.klom(u, rt)
    e = d.per_example_epsilon(u, rt)
    res = d.ulira(u, rt)
  assert np.isnan(k[[1, 4]]).all() and np.isfinite(k[[0, 2, 3, 5]]).all()
  assert np.isnan(e[[1, 4]]).all() and np.isfinite(e[[0, 2, 3, 5]]).all()
  assert math.isnan(res['auc'])
  assert '2 of 6 examples' in caplog.text
  assert f'{u[0, 0]:.3f}' not in caplog.text  # no values in the logs


def test_shape_mismatches_raise_naming_the_shapes():
  with pytest.raises(ValueError, match=r'\(3, 4\).*\(3, 5\)'):
    d.klom(np.zeros((3, 4)), np.zeros((3, 5)))
  with pytest.raises(ValueError, match=r'\(4,\)'):
    d.per_example_epsilon(np.zeros(4), np.zeros((3, 4)))
  with pytest.raises(ValueError, match='groups shape'):
    d.ulira(np.zeros((3, 4)), np.zeros((3, 4)), groups=[1, 2])


def test_summarize_agrees_with_the_parts():
  r = _rng(15)
  uf, rf = r.normal(0.4, 1, size=(4, 12)), r.normal(0, 1, size=(4, 12))
  ur, rr = r.normal(size=(4, 20)), r.normal(size=(4, 20))
  groups = np.repeat([5, 6, 7, 8], 3)
  out = d.summarize({'forget': uf, 'retain': ur}, {'forget': rf, 'retain': rr}, groups,
                    retain_acc=0.9, retain_acc_retrain=0.8, test_acc=0.7, test_acc_retrain=0.7)
  e = d.per_example_epsilon(uf, rf)
  assert out['klom_p95_forget'] == pytest.approx(np.percentile(d.klom(uf, rf), 95))
  assert out['klom_p95_retain'] == pytest.approx(np.percentile(d.klom(ur, rr), 95))
  assert out['klom_p95_test'] is None
  assert out['forget_quality'] == pytest.approx(d.forget_quality(e, 4))
  assert out['eps_score'] == pytest.approx(out['forget_quality'] * 0.9 / 0.8)
  e_p = d.patient_max(e, groups)[1]
  assert out['forget_quality_patient'] == pytest.approx(d.forget_quality(e_p, 4))
  assert out['eps_score_patient'] == pytest.approx(out['forget_quality_patient'] * 0.9 / 0.8)
  assert out['ulira_auc'] == d.ulira(uf, rf)['auc']
  assert out['ulira_auc_patient'] == d.ulira(uf, rf, groups=groups)['auc']
  for k in ('klom_p95_forget_patient', 'eps_p95_forget_patient',
            'ulira_tpr_at_1pct_fpr_patient', 'ulira_tpr_at_5pct_fpr_patient',
            'ulira_tpr_at_1pct_fpr', 'ulira_tpr_at_5pct_fpr'):
    assert math.isfinite(out[k])
  assert (out['n_unlearned'], out['n_forget'], out['n_forget_patients']) == (4, 12, 4)
  bare = d.summarize({'forget': uf}, {'forget': rf})
  assert bare['eps_score'] is None and bare['ulira_auc_patient'] is None
  with pytest.raises(ValueError, match='all four accuracies'):
    d.summarize({'forget': uf}, {'forget': rf}, retain_acc=0.9)
