import math

import numpy as np
import pytest

from forgetmi_jax.evaluation.gaps import METRIC_KEYS, add_gaps, retrain_gaps

RETRAIN = dict(mia=0.19, forget_auc=0.588, forget_f1=0.342, test_auc=0.629, test_f1=0.382)
FORGETMI = dict(mia=0.81, forget_auc=0.656, forget_f1=0.313, test_auc=0.565, test_f1=0.252)


def test_retrain_gaps_hand_worked():
  g = retrain_gaps(FORGETMI, RETRAIN)
  expected = [0.62, 0.068, 0.029, 0.064, 0.13]
  for k, e in zip(METRIC_KEYS, expected):
    assert g[k] == pytest.approx(e)
  assert g['avg_gap'] == pytest.approx(sum(expected) / 5)


def test_missing_values_are_left_out_of_the_average():
  m = dict(FORGETMI, mia=None, test_f1=float('nan'))
  del m['forget_f1']
  g = retrain_gaps(m, RETRAIN)
  assert g['mia'] is None and g['test_f1'] is None and g['forget_f1'] is None
  assert g['avg_gap'] == pytest.approx((0.068 + 0.064) / 2)
  none = retrain_gaps({}, RETRAIN)
  assert none['avg_gap'] is None
  # numpy scalars count as numbers
  assert retrain_gaps({'mia': np.float32(0.5)}, {'mia': 0.25})['avg_gap'] == pytest.approx(0.25)


def test_add_gaps_adds_fields_without_mutating():
  models = {'original': dict(RETRAIN, mia=1.0, seconds=3.0), 'retrain': dict(RETRAIN),
            'forgetmi': dict(FORGETMI)}
  out = add_gaps(models)
  assert 'avg_gap' not in models['forgetmi']
  assert out['retrain']['avg_gap'] == 0.0
  assert out['original']['gap_mia'] == pytest.approx(0.81)
  assert out['original']['avg_gap'] == pytest.approx(0.81 / 5)
  assert out['original']['seconds'] == 3.0
  assert out['forgetmi']['avg_gap'] == pytest.approx(retrain_gaps(FORGETMI, RETRAIN)['avg_gap'])
  assert all(f'gap_{k}' in out['forgetmi'] for k in METRIC_KEYS)


def test_add_gaps_without_retrain_sets_none():
  out = add_gaps({'original': dict(FORGETMI)})
  assert out['original']['avg_gap'] is None and out['original']['gap_mia'] is None
  assert not math.isnan(out['original']['mia'])
