"""MIA on constructed cases whose answers are known, and against sklearn's SVC directly."""
import logging
import math

import numpy as np
import pytest
from sklearn.svm import SVC

from forgetmi_jax.evaluation import mia


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_separable_losses_forget_like_retain_scores_one():
  r = _rng()
  retain = r.uniform(0.0, 0.05, 800)
  test = r.uniform(2.0, 4.0, 300)
  forget = r.uniform(0.0, 0.05, 100)
  assert mia.svc_mia(retain, test, forget) == pytest.approx(1.0)


def test_separable_losses_forget_like_test_scores_zero():
  r = _rng(1)
  retain = r.uniform(0.0, 0.05, 800)
  test = r.uniform(2.0, 4.0, 300)
  forget = r.uniform(2.0, 4.0, 100)
  assert mia.svc_mia(retain, test, forget) == pytest.approx(0.0)


def test_identical_distributions_give_the_attack_base_rate():
  r = _rng(2)
  draw = lambda n: r.exponential(1.0, n)
  retain, test = draw(400), draw(400)
  # Base rate: how often the fitted attack calls fresh samples of the same law "member".
  base = mia.svc_mia(retain, test, draw(20000))
  score = mia.svc_mia(retain, test, draw(400))
  assert 0.2 < base < 0.8  # balanced, uninformative: no strong side
  assert abs(score - base) < 0.1
  # With the paper's imbalance (many more retain than test losses) the same uninformative
  # attack calls nearly everything "member": the SVC score has a high floor.
  d = mia.svc_mia(draw(4000), draw(200), draw(400), return_details=True)
  assert d['score'] > 0.9 and d['test_member_rate'] > 0.9


def test_details_report_member_rates_and_sizes():
  r = _rng(3)
  retain, test, forget = r.uniform(0, .05, 500), r.uniform(2, 4, 200), r.uniform(0, .05, 50)
  d = mia.svc_mia(retain, test, forget, return_details=True)
  assert {'forget_member_rate', 'retain_member_rate', 'test_member_rate', 'n_retain', 'n_test',
          'n_forget'} <= set(d)
  assert d['forget_member_rate'] == d['score'] == pytest.approx(1.0)
  assert d['retain_member_rate'] == pytest.approx(1.0)
  assert d['test_member_rate'] == pytest.approx(0.0)
  assert (d['n_retain'], d['n_test'], d['n_forget']) == (500, 200, 50)
  # The default return is still the plain float, equal to the details' score.
  plain = mia.svc_mia(retain, test, forget)
  assert isinstance(plain, float) and plain == d['score']


def _paper_sized_losses(seed=8):
  """About the paper's 10 % split: 5,500 retain vs 526 test losses from overlapping laws
  (members have smaller losses), and a forget set that is a mixture of both."""
  r = _rng(seed)
  retain = r.gamma(2.0, 0.25, 5500)
  test = r.gamma(2.0, 0.6, 526)
  forget = np.concatenate([r.gamma(2.0, 0.25, 300), r.gamma(2.0, 0.6, 374)])
  return retain, test, forget


def test_svc_mia_equals_direct_sklearn_svc_at_paper_imbalance():
  retain, test, forget = _paper_sized_losses()
  d = mia.svc_mia(retain, test, forget, return_details=True)
  # REFERENCE 5 written out directly: members 1 (retain), non-members 0 (test).
  clf = SVC(C=3, kernel='rbf', gamma='auto')
  clf.fit(np.concatenate([retain, test])[:, None],
          np.concatenate([np.ones(retain.size), np.zeros(test.size)]))
  member = lambda a: float(np.mean(clf.predict(a[:, None]) == 1))
  assert d['score'] == member(forget)
  assert d['retain_member_rate'] == member(retain)
  assert d['test_member_rate'] == member(test)
  assert (d['n_retain'], d['n_test'], d['n_forget']) == (5500, 526, 674)
  # A non-degenerate case (neither all nor no members), so equality means something, and the
  # imbalance pushes the attack towards "member": it calls most test losses members too.
  assert 0.05 < d['score'] < 0.95
  assert d['retain_member_rate'] > d['score'] > d['test_member_rate'] > 0.3


def test_batch_mean_losses():
  x = np.arange(70, dtype=float)
  m = mia.batch_mean_losses(x, 32)
  np.testing.assert_allclose(m, [15.5, 47.5, 66.5])  # last partial batch (64..69) kept
  np.testing.assert_allclose(mia.batch_mean_losses(x, 32, drop_last=True), [15.5, 47.5])
  assert mia.batch_mean_losses(x[:32], 32).shape == (1,)


def test_per_batch_variant_uses_batch_means():
  r = _rng(4)
  retain = r.exponential(0.3, 3200)
  test = r.exponential(1.0, 640)
  # Forget: mostly like test, but a few near-zero losses; per-sample the attack sees each
  # sample, per batch the means wash the mixture out.
  forget = np.concatenate([r.exponential(1.0, 300), r.uniform(0, 0.01, 20)])
  d = mia.svc_mia(retain, test, forget, per_batch_mean=True, return_details=True)
  assert (d['n_retain'], d['n_test'], d['n_forget']) == (100, 20, 10)
  assert d['per_batch_mean']
  # Equal to running the per-sample attack on the batch means by hand.
  by_hand = mia.svc_mia(mia.batch_mean_losses(retain), mia.batch_mean_losses(test),
                        mia.batch_mean_losses(forget))
  assert d['score'] == by_hand
  per_sample = mia.svc_mia(retain, test, forget)
  # Averaging 32 losses concentrates them around each set's mean: the batch-mean attack
  # separates retain from test perfectly, the per-sample one cannot.
  assert d['retain_member_rate'] == 1.0 and d['test_member_rate'] == 0.0
  # So test-like forget batches are called non-members (only the batch holding the near-zero
  # losses, and chance, make members), while per sample the 5:1 imbalance pushes most
  # ambiguous forget samples to "member".
  assert d['score'] <= 0.3
  assert per_sample > 0.6


def test_max_train_subsamples_retain_deterministically():
  r = _rng(5)
  retain, test, forget = r.exponential(0.5, 3000), r.exponential(1.0, 300), r.exponential(0.7, 200)
  a = mia.svc_mia(retain, test, forget, seed=3, max_train=500, return_details=True)
  b = mia.svc_mia(retain, test, forget, seed=3, max_train=500, return_details=True)
  assert a == b
  assert a['n_retain'] == 500 and a['n_retain_total'] == 3000
  # Other seeds draw other subsets (so the fitted attack changes); None keeps everything.
  rates = {mia.svc_mia(retain, test, forget, seed=s, max_train=500,
                       return_details=True)['retain_member_rate'] for s in range(4)}
  assert len(rates) > 1
  full = mia.svc_mia(retain, test, forget, return_details=True)
  assert full['n_retain'] == 3000


def test_invalid_inputs():
  with pytest.raises(ValueError):
    mia.svc_mia([], [1.0, 2.0], [1.0])
  with pytest.raises(ValueError):
    mia.svc_mia([0.1, 0.2], [1.0, 2.0], [1.0], max_train=0)
  # +inf losses (probability 0) are clipped, not fatal.
  assert mia.svc_mia([0.01] * 20, [3.0] * 20 + [np.inf], [np.inf]) == 0.0


@pytest.mark.parametrize('where', ['retain', 'test', 'forget'])
@pytest.mark.parametrize('bad', [np.nan, -np.inf])
def test_diverged_losses_give_nan_and_a_warning_naming_the_model(caplog, where, bad):
  r = _rng(9)
  sets = {'retain': r.uniform(0, .05, 60), 'test': r.uniform(2, 4, 30),
          'forget': r.uniform(0, .05, 10)}
  sets[where][3] = bad
  args = (sets['retain'], sets['test'], sets['forget'])
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    score = mia.svc_mia(*args, name='neggrad_plus')
    d = mia.svc_mia(*args, return_details=True, name='neggrad_plus')
    lr = mia.logreg_mia(*args, name='neggrad_plus')
  assert isinstance(score, float) and math.isnan(score)
  for k in ('score', 'forget_member_rate', 'retain_member_rate', 'test_member_rate'):
    assert math.isnan(d[k]), k
  assert (d['n_retain'], d['n_test'], d['n_forget']) == (60, 30, 10)
  for k in ('attack_auc', 'attack_balanced_accuracy', 'forget_member_rate',
            'forget_vs_test_auc'):
    assert math.isnan(lr[k]), k
  assert (lr['n_retain'], lr['n_test'], lr['n_forget'], lr['n_splits']) == (60, 30, 10, 5)
  records = [x for x in caplog.records if x.levelno == logging.WARNING]
  assert len(records) == 3
  for rec, fn in zip(records, ('svc_mia', 'svc_mia', 'logreg_mia')):
    msg = rec.getMessage()
    assert msg.startswith(fn) and "'neggrad_plus'" in msg
    assert f'1 of {sets[where].size} {where}' in msg


def test_diverged_losses_without_a_name_still_warn(caplog):
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    d = mia.svc_mia([0.1, np.nan, 0.2], [1.0, 2.0], [np.nan], per_batch_mean=True,
                    batch_size=2, return_details=True)
  assert math.isnan(d['score']) and d['per_batch_mean']
  assert (d['n_retain'], d['n_test'], d['n_forget']) == (2, 1, 1)  # batch means
  assert len(caplog.records) == 1 and 'model' not in caplog.records[0].getMessage()


def test_logreg_mia_separable_and_uninformative():
  r = _rng(6)
  retain = r.exponential(0.05, 1000)
  test = r.exponential(2.0, 300)
  strong = mia.logreg_mia(retain, test, r.exponential(0.05, 200), seed=0)
  assert strong['attack_auc'] > 0.9
  assert strong['forget_vs_test_auc'] > 0.9
  assert strong['forget_member_rate'] > 0.8
  forgotten = mia.logreg_mia(retain, test, r.exponential(2.0, 200), seed=0)
  assert abs(forgotten['forget_vs_test_auc'] - 0.5) < 0.1
  assert forgotten['forget_member_rate'] < 0.3
  same = mia.logreg_mia(r.exponential(1.0, 1000), r.exponential(1.0, 300),
                        r.exponential(1.0, 200), seed=0)
  assert abs(same['attack_auc'] - 0.5) < 0.1
  assert abs(same['forget_vs_test_auc'] - 0.5) < 0.1


def test_logreg_mia_is_deterministic_under_seed():
  r = _rng(7)
  args = (r.exponential(0.5, 600), r.exponential(1.0, 200), r.exponential(0.7, 100))
  assert mia.logreg_mia(*args, seed=11) == mia.logreg_mia(*args, seed=11)
  assert mia.logreg_mia(*args, seed=11)['n_splits'] == 5
  assert mia.logreg_mia(args[0], args[1][:3], args[2])['n_splits'] == 3
  with pytest.raises(ValueError):
    mia.logreg_mia(args[0], args[1][:1], args[2])


def test_retain_weight_is_replication():
  # libsvm's per-sample C: a retain loss of weight 3 is the same objective as 3 copies of it
  rng = np.random.default_rng(0)
  retain = np.round(rng.exponential(0.2, 60), 2)
  test = np.round(rng.exponential(1.0, 40), 2)
  forget = np.linspace(0.0, 3.0, 61)
  weighted = mia.svc_mia(retain, test, forget, retain_weight=3, return_details=True)
  copied = mia.svc_mia(np.repeat(retain, 3), test, forget, return_details=True)
  for k in ('score', 'test_member_rate'):
    assert weighted[k] == pytest.approx(copied[k], abs=1 / 61)
  plain = mia.svc_mia(retain, test, forget)
  assert weighted['score'] > plain  # more member weight: more of the forget set called member
