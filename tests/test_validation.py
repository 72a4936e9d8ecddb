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
  model = {'member_auc': 0.7, 'forget_auc': 0.9, 'forget_f1': 0.8, 'val_auc': 0.65,
           'val_f1': 0.4}
  reference = {'val_auc': 0.7, 'val_f1': 0.5}
  g = V.validation_gap(model, reference)
  assert g['gap_member_auc'] == pytest.approx(0.2)
  assert g['gap_forget_auc'] == pytest.approx(0.2)
  assert g['gap_forget_f1'] == pytest.approx(0.3)
  assert g['gap_val_auc'] == pytest.approx(0.05)
  assert g['gap_val_f1'] == pytest.approx(0.1)
  assert g['val_gap'] == pytest.approx((0.2 + 0.2 + 0.3 + 0.05 + 0.1) / 5)
  assert V.validation_gap(dict(model, forget_f1=math.nan), reference)['val_gap'] == math.inf


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


def test_monitor_reads_only_forget_and_validation(tmp_path):
  prep = run_setup.prepare(tiny_config(tmp_path))
  variables = prep.init_variables(0)
  monitor = run_setup.validation_monitor(prep, variables)
  scores = monitor(variables)
  # the reference itself: every utility gap is 0, and the gap is the mean of the other three
  assert scores['gap_val_auc'] == 0 and scores['gap_val_f1'] == 0
  assert scores['val_gap'] == pytest.approx(
      (scores['gap_member_auc'] + scores['gap_forget_auc'] + scores['gap_forget_f1']) / 5)
  # labels outside the forget and validation sets do not matter
  labels = np.asarray(prep.cohort.labels).copy()
  others = np.setdiff1d(np.arange(len(labels)), np.r_[prep.split.forget_idx, prep.split.val_idx])
  labels[others] = np.random.default_rng(1).permutation(labels[others])
  shuffled = V.ValidationMonitor(prep.model.apply, prep.source, prep.split, labels)
  shuffled.set_reference(variables)
  assert shuffled(variables) == scores
  with pytest.raises(ValueError, match='val_fraction'):
    V.ValidationMonitor(prep.model.apply, prep.source,
                        _Split(prep.split.forget_idx, np.zeros(0, np.int64)), labels)
