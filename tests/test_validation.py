"""The no-oracle yardstick: the member attack, the validation gap and the chance band against
hand-worked cases and simulation; the monitor reads only the forget and validation sets."""
import dataclasses
import math

import numpy as np
import pytest

from forgetmi_jax.evaluation import validation as V
from forgetmi_jax.runs import setup as run_setup
from tests.helpers import tiny_config


def test_member_auc_by_hand():
  # forget losses [0.1, 0.4], validation [0.2, 0.3, 0.5]: a lower loss = more member-like.
  # Pairs (forget lower than validation): 0.1 beats all 3, 0.4 beats only 0.5 -> 4 of 6.
  assert V.member_auc([0.1, 0.4], [0.2, 0.3, 0.5]) == pytest.approx(4 / 6)
  assert V.member_auc([1.0, 1.0], [1.0, 1.0]) == 0.5  # ties count half
  assert V.member_auc([0.0, 0.1], [5.0, 6.0]) == 1.0
  assert math.isnan(V.member_auc([], [1.0]))
  assert math.isnan(V.member_auc([np.nan], [1.0]))


def test_validation_gap_by_hand():
  model = {'member_auc': 0.7, 'svc_forget': 0.9, 'forget_auc': 0.9, 'forget_f1': 0.8,
           'val_auc': 0.65, 'val_f1': 0.4}
  reference = {'val_auc': 0.7, 'val_f1': 0.5, 'svc_val': 0.45}
  g = V.validation_gap(model, reference)  # the default: the paper's SVC attack
  assert g['gap_svc'] == pytest.approx(0.45)
  assert g['gap_member_auc'] == pytest.approx(0.2)  # reported (the chance test), not averaged
  assert g['gap_forget_auc'] == pytest.approx(0.2)
  assert g['gap_forget_f1'] == pytest.approx(0.3)
  assert g['gap_val_auc'] == pytest.approx(0.05)
  assert g['gap_val_f1'] == pytest.approx(0.1)
  assert g['val_gap'] == pytest.approx((0.45 + 0.2 + 0.3 + 0.05 + 0.1) / 5)
  auc = V.validation_gap(model, reference, attack='auc')
  assert 'gap_svc' not in auc
  assert auc['val_gap'] == pytest.approx((0.2 + 0.2 + 0.3 + 0.05 + 0.1) / 5)
  assert V.validation_gap(dict(model, forget_f1=math.nan), reference)['val_gap'] == math.inf
  assert V.validation_gap(dict(model, svc_forget=math.nan), reference)['val_gap'] == math.inf
  with pytest.raises(ValueError, match='stop.attack'):
    V.validation_gap(model, reference, attack='lira')


def test_rate_band_matches_the_simulated_null():
  rng = np.random.default_rng(0)
  p, n1, n2 = 0.4, 120, 90
  diffs = rng.binomial(n1, p, 4000) / n1 - rng.binomial(n2, p, 4000) / n2
  shrunk = (p * n2 + 1) / (n2 + 2)  # the band's p (a rate of 0 or 1 keeps a band)
  assert V.rate_band(p, n1, n2, z=1.0) == pytest.approx(
      math.sqrt(shrunk * (1 - shrunk) * (1 / n1 + 1 / n2)))
  assert V.rate_band(0.0, n1, n2) > 0
  assert np.std(diffs) == pytest.approx(V.rate_band(p, n1, n2, z=1.0), rel=0.05)
  inside = np.mean(np.abs(diffs) <= V.rate_band(p, n1, n2))
  assert 0.93 <= inside <= 0.97


def test_retain_sample_is_fixed_and_within_retain():
  retain = np.arange(100, 600, 2)
  a, b = V.retain_sample(retain, 50, seed=3), V.retain_sample(retain, 50, seed=3)
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a)) == 50 and np.all(np.isin(a, retain)) and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, V.retain_sample(retain, 50, seed=4))
  np.testing.assert_array_equal(V.retain_sample(retain, 1000), retain)  # fewer: all of them


def test_chance_band_matches_the_simulated_null():
  rng = np.random.default_rng(0)
  n1, n2 = 40, 25
  aucs = [V.member_auc(rng.normal(size=n1), rng.normal(size=n2)) for _ in range(3000)]
  assert np.std(aucs) == pytest.approx(V.chance_band(n1, n2, z=1.0), rel=0.06)
  inside = np.mean(np.abs(np.asarray(aucs) - 0.5) <= V.chance_band(n1, n2))
  assert 0.93 <= inside <= 0.97


@dataclasses.dataclass
class _Split:
  forget_idx: np.ndarray
  val_idx: np.ndarray
  retain_idx: np.ndarray
  test_idx: np.ndarray


def test_monitor_reads_only_forget_validation_and_its_retain_sample(tmp_path):
  prep = run_setup.prepare(tiny_config(tmp_path, **{'stop.retain_images': 20}))
  variables = prep.init_variables(0)
  monitor = run_setup.validation_monitor(prep, variables)
  scores = monitor(variables)
  sample = monitor.sets['retain']
  assert len(sample) == 20 and np.all(np.isin(sample, prep.split.retain_idx))
  # the reference itself: every utility gap is 0, the SVC calls forget images members as
  # often as validation ones only by chance, and the gap is the mean of the five terms
  assert scores['gap_val_auc'] == 0 and scores['gap_val_f1'] == 0
  assert scores['gap_svc'] == pytest.approx(abs(scores['svc_forget'] - scores['svc_val']))
  assert scores['val_gap'] == pytest.approx(
      (scores['gap_svc'] + scores['gap_forget_auc'] + scores['gap_forget_f1']) / 5)
  # the weight makes the 20 retain images count as the whole retain set against the test set
  n = {k: len(getattr(prep.split, f'{k}_idx')) for k in ('retain', 'test', 'val')}
  assert monitor.retain_weight * 20 / n['val'] == pytest.approx(n['retain'] / n['test'])
  # labels outside the forget set, the validation set and the retain sample do not matter
  # (the test set's among them)
  labels = np.asarray(prep.cohort.labels).copy()
  others = np.setdiff1d(np.arange(len(labels)),
                        np.r_[prep.split.forget_idx, prep.split.val_idx, sample])
  assert np.all(np.isin(prep.split.test_idx, others))
  labels[others] = np.random.default_rng(1).permutation(labels[others])
  shuffled = V.ValidationMonitor(prep.model.apply, prep.source, prep.split, labels,
                                 retain_images=20)
  shuffled.set_reference(variables)
  assert shuffled(variables) == scores
  # ...while a retain image's label does (the SVC learns "member" from their losses)
  labels = np.asarray(prep.cohort.labels).copy()
  labels[sample] = (labels[sample] + 1) % 4
  moved = V.ValidationMonitor(prep.model.apply, prep.source, prep.split, labels,
                              retain_images=20)
  assert moved.measure(variables)['retain_acc'] != monitor.measure(variables)['retain_acc']
  empty = np.zeros(0, np.int64)
  with pytest.raises(ValueError, match='val_fraction'):
    V.ValidationMonitor(prep.model.apply, prep.source,
                        _Split(prep.split.forget_idx, empty, prep.split.retain_idx, empty), labels)
  with pytest.raises(ValueError, match='retain_images'):
    V.ValidationMonitor(prep.model.apply, prep.source, prep.split, labels, retain_images=0)
  auc = V.ValidationMonitor(prep.model.apply, prep.source, prep.split, prep.cohort.labels,
                            attack='auc')
  auc.set_reference(variables)
  assert 'retain' not in auc.sets and 'svc_forget' not in auc(variables)


def test_at_chance_needs_both_attacks_with_svc(tmp_path):
  prep = run_setup.prepare(tiny_config(tmp_path))
  monitor = run_setup.validation_monitor(prep, prep.init_variables(0))
  n1, n2 = len(prep.split.forget_idx), len(prep.split.val_idx)
  monitor.reference = dict(monitor.reference, svc_val=0.4)
  band = V.rate_band(0.4, n1, n2)
  ok = {'gap_member_auc': 0.0, 'gap_svc': 0.0}
  assert monitor.at_chance(ok)
  assert not monitor.at_chance(dict(ok, gap_svc=band + 1e-6))
  assert not monitor.at_chance(dict(ok, gap_member_auc=V.chance_band(n1, n2) + 1e-6))
