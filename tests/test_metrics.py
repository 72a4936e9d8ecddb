"""Metrics against sklearn computed independently on fixed arrays, incl. absent classes."""
import logging
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from forgetmi_jax.evaluation import metrics as M
from forgetmi_jax.evaluation.distance import distance_to_retrain


def _fixed(n=60, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 4
  logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[labels]
  return logits, labels


def _softmax_ref(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_softmax_and_ce_match_direct_formula_and_are_stable():
  logits, labels = _fixed()
  p = M.softmax(logits)
  np.testing.assert_allclose(p, _softmax_ref(logits), rtol=1e-12)
  np.testing.assert_allclose(p.sum(1), 1.0)
  ce = M.per_sample_ce(logits, labels)
  np.testing.assert_allclose(ce, -np.log(_softmax_ref(logits)[np.arange(60), labels]), rtol=1e-10)
  # Huge logits: naive exp overflows; ours stays finite and exact.
  big = np.array([[1000.0, 0.0, -1000.0, 5.0]])
  assert np.all(np.isfinite(M.softmax(big)))
  np.testing.assert_allclose(M.per_sample_ce(big, [0]), [math.log1p(math.exp(-995.0))], atol=1e-12)
  np.testing.assert_allclose(M.per_sample_ce(big, [1]), [1000.0], rtol=1e-12)
  # [N, 1] labels (the public code's shape) are accepted; out-of-range labels are not.
  np.testing.assert_allclose(M.per_sample_ce(logits, labels[:, None]), ce)
  with pytest.raises(ValueError):
    M.per_sample_ce(logits, labels + 4)


def test_auc_matches_sklearn_ovr_macro_when_all_classes_present():
  logits, labels = _fixed()
  expected = roc_auc_score(labels, _softmax_ref(logits), multi_class='ovr', average='macro')
  got, skipped = M.auc_ovr(logits, labels, return_details=True)
  assert isinstance(got, float)
  assert skipped == []
  assert got == pytest.approx(expected, abs=1e-12)


def test_auc_skips_absent_class_and_averages_the_rest():
  logits, labels = _fixed()
  keep = labels != 3  # class 3 absent from the labels, still a logit column
  lg, lb = logits[keep], labels[keep]
  probs = _softmax_ref(lg)
  expected = np.mean([roc_auc_score(lb == c, probs[:, c]) for c in range(3)])
  got, skipped = M.auc_ovr(lg, lb, return_details=True)
  assert skipped == [3]
  assert got == pytest.approx(expected, abs=1e-12)
  # The 4-class macro with the absent class in it is not what we return.
  assert not math.isnan(got)


def test_auc_nan_when_no_class_defined():
  logits, _ = _fixed()
  auc, skipped = M.auc_ovr(logits, np.full(60, 2), return_details=True)
  assert math.isnan(auc) and skipped == [0, 1, 2, 3]


def test_auc_perfect_and_inverted():
  labels = np.array([0, 1, 2, 3] * 5)
  logits = 10.0 * np.eye(4)[labels]
  assert M.auc_ovr(logits, labels) == pytest.approx(1.0)
  assert M.auc_ovr(-logits, labels) == pytest.approx(0.0)


def test_f1_matches_sklearn_when_all_classes_present():
  logits, labels = _fixed(seed=1)
  pred = _softmax_ref(logits).argmax(1)
  expected = f1_score(labels, pred, average='macro', labels=range(4), zero_division=0)
  assert M.macro_f1(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_f1_skips_class_absent_from_labels_and_predictions():
  labels = np.array([0, 0, 1, 1, 2, 2])
  logits = 5.0 * np.eye(4)[labels]  # perfect on classes 0..2, class 3 nowhere
  f1, skipped = M.macro_f1(logits, labels, return_details=True)
  assert skipped == [3]
  assert f1 == pytest.approx(1.0)
  # The labels=range(4) formula would have charged the absent class 0.
  assert f1_score(labels, labels, average='macro', labels=range(4),
                  zero_division=0) == pytest.approx(0.75)


def test_f1_counts_class_predicted_but_absent_from_labels():
  labels = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([0, 3, 1, 1, 2, 2])  # one false positive for the absent class 3
  logits = 5.0 * np.eye(4)[pred]
  f1, skipped = M.macro_f1(logits, labels, return_details=True)
  assert skipped == []
  expected = f1_score(labels, pred, average='macro', labels=range(4), zero_division=0)
  assert f1 == pytest.approx(expected)
  assert f1 < 0.75


def test_classification_metrics_keys_and_floats():
  logits, labels = _fixed()
  out = M.classification_metrics(logits, labels)
  assert set(out) == {'auc', 'f1'}
  assert all(isinstance(v, float) for v in out.values())
  assert out['auc'] == pytest.approx(M.auc_ovr(logits, labels))
  det = M.classification_metrics(logits[labels != 0], labels[labels != 0], details=True)
  assert det['auc_skipped_classes'] == [0]


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_give_nan_and_one_warning_naming_the_model(caplog, bad):
  logits, labels = _fixed()
  logits[3, 1] = bad
  logits[7, 0] = bad
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    out = M.classification_metrics(logits, labels, details=True, name='scrub')
  assert math.isnan(out['auc']) and math.isnan(out['f1'])
  assert out['auc_skipped_classes'] == []
  msgs = _warnings(caplog)
  assert len(msgs) == 1  # one record per set, not one per metric
  assert "'scrub'" in msgs[0] and '2 of 60 rows' in msgs[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    assert math.isnan(M.auc_ovr(logits, labels, name='scrub'))
    assert math.isnan(M.macro_f1(logits, labels, name='scrub'))
  msgs = _warnings(caplog)
  assert len(msgs) == 2 and msgs[0].startswith('auc_ovr') and msgs[1].startswith('macro_f1')
  assert all("'scrub'" in m for m in msgs)


def test_finite_logits_do_not_warn(caplog):
  logits, labels = _fixed()
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    M.classification_metrics(logits, labels, name='original')
    distance_to_retrain(logits, logits[::-1], name='original')
  assert _warnings(caplog) == []


@pytest.mark.parametrize('side', [0, 1])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_distance_to_retrain_nan_for_nonfinite_logits(caplog, side, bad):
  logits, _ = _fixed()
  pair = [logits.copy(), logits + 0.1]
  pair[side][5, 2] = bad
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    d = distance_to_retrain(*pair, name='cf_k')
  assert isinstance(d, float) and math.isnan(d)
  msgs = _warnings(caplog)
  assert len(msgs) == 1 and "'cf_k'" in msgs[0]
  assert ('retrained model' in msgs[0]) == (side == 1)
  # Without a name it still warns, and shape errors still raise.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    assert math.isnan(distance_to_retrain(*pair))
  assert len(_warnings(caplog)) == 1
  with pytest.raises(ValueError):
    distance_to_retrain(pair[0], pair[1][:3], name='cf_k')
