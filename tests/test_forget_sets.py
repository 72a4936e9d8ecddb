"""Forget sets by patient: sizes, nesting, no TEST, distribution, lists, retain sampling."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forgetmi_jax.data.cohort import read_split_csv
from forgetmi_jax.data.forget_sets import (PAPER_FRACTIONS, RetainSampler, make_forget_split,
                                           read_forget_list, select_forget_subjects, summarize)
from forgetmi_jax.data.synthetic import make_synthetic_cohort

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mimic_cxr_edema'
SPLIT = SHARED / 'mimic-cxr-sub-img-edema-split-manualtest.csv'
need_shared = pytest.mark.skipif(not SPLIT.exists(), reason=f'shared split file absent: {SPLIT}')
PAPER_SIZES = {0.03: 201, 0.06: 401, 0.10: 674}


@pytest.fixture(scope='module')
def split():
  return read_split_csv(SPLIT)


@pytest.fixture(scope='module')
def selected(split):
  return select_forget_subjects(split, PAPER_FRACTIONS, seed=0)


@pytest.fixture(scope='module')
def cohort():
  return make_synthetic_cohort(seed=0, image_size=16, num_subjects=120, lazy_images=True)


@need_shared
def test_sizes_nesting_no_test(split, selected):
  test_subjects = set(split.loc[split['fold'] == 'TEST', 'subject_id'])
  prev = set()
  for f in PAPER_FRACTIONS:
    subs = selected[f]
    n = int(split['subject_id'].isin(subs).sum())
    assert abs(n - PAPER_SIZES[f]) <= 0.01 * PAPER_SIZES[f], (f, n)
    assert not set(subs.tolist()) & test_subjects
    assert prev <= set(subs.tolist())
    prev = set(subs.tolist())


@need_shared
def test_studies_per_subject_distribution_preserved(split, selected):
  cohort = summarize(split, split.loc[split['fold'] != 'TEST', 'subject_id'].unique())
  for f, tol_mean in ((0.03, 0.5), (0.06, 0.35), (0.10, 0.3)):
    s = summarize(split, selected[f])
    assert abs(s['mean_studies_per_subject'] - cohort['mean_studies_per_subject']) < tol_mean
    np.testing.assert_allclose(s['bin_shares'], cohort['bin_shares'], atol=0.05 if f > 0.05 else 0.08)
  # Unlike the paper's released lists, which favour many-study patients (REFERENCE 2).
  paper = summarize(split, read_forget_list(SHARED / 'forget_set_10per.csv', split))
  assert paper['mean_studies_per_subject'] > 2 * cohort['mean_studies_per_subject']


@need_shared
def test_selection_deterministic_from_seed(split, selected):
  again = select_forget_subjects(split, PAPER_FRACTIONS, seed=0)
  other = select_forget_subjects(split, PAPER_FRACTIONS, seed=1)
  for f in PAPER_FRACTIONS:
    np.testing.assert_array_equal(again[f], selected[f])
  assert not np.array_equal(other[0.10], selected[0.10])


@need_shared
def test_paper_lists_read(split):
  for name, n_sub, n_img in (('3', 16, 201), ('6', 32, 401), ('10', 60, 674)):
    ids = read_forget_list(SHARED / f'forget_set_{name}per.csv', split)
    assert len(ids) == n_sub and int(split['subject_id'].isin(ids).sum()) == n_img


def test_forget_list_errors_name_file_and_ids(tmp_path, cohort):
  frame = cohort.to_frame()
  test_sub = int(frame.loc[frame['fold'] == 'TEST', 'subject_id'].iloc[0])
  ok_sub = int(frame.loc[frame['fold'] != 'TEST', 'subject_id'].iloc[0])
  p = tmp_path / 'forget.csv'
  pd.DataFrame({'subject_id': [ok_sub, 123, 456]}).to_csv(p, index=False)
  with pytest.raises(ValueError) as err:
    read_forget_list(p, frame)
  assert str(p) in str(err.value) and '[123, 456]' in str(err.value)
  pd.DataFrame({'subject_id': [ok_sub, test_sub]}).to_csv(p, index=False)
  with pytest.raises(ValueError, match=rf'TEST fold.*{test_sub}'):
    read_forget_list(p, frame)
  pd.DataFrame({'study_id': [1]}).to_csv(p, index=False)
  with pytest.raises(ValueError, match='no subject_id column'):
    read_forget_list(p, frame)


def test_forget_split_partitions_by_patient(cohort):
  split = make_forget_split(cohort, 0.10, seed=0)
  n = len(cohort)
  all_idx = np.concatenate([split.forget_idx, split.retain_idx, split.test_idx])
  assert len(all_idx) == n and len(np.unique(all_idx)) == n
  assert set(cohort.subject_id[split.forget_idx]) == set(split.forget_subjects.tolist())
  assert (cohort.fold[split.test_idx] == 'TEST').all()
  assert (cohort.fold[split.forget_idx] != 'TEST').all()
  assert not np.isin(cohort.subject_id[split.retain_idx], split.forget_subjects).any()
  assert abs(len(split.forget_idx) - 0.1 * n) <= 0.01 * n + 1
  # Same subjects as the nested ladder's 10 % set; 3 % inside it.
  ladder = select_forget_subjects(cohort.to_frame(), PAPER_FRACTIONS, seed=0)
  np.testing.assert_array_equal(split.forget_subjects, ladder[0.10])
  small = make_forget_split(cohort, 0.03, seed=0)
  assert set(small.forget_subjects.tolist()) <= set(split.forget_subjects.tolist())


def test_forget_split_from_csv(tmp_path, cohort):
  frame = cohort.to_frame()
  subs = frame.loc[frame['fold'] == '2', 'subject_id'].unique()[:3]
  p = tmp_path / 'mine.csv'
  frame[frame['subject_id'].isin(subs)].to_csv(p, index=False)
  split = make_forget_split(cohort, 0.5, forget_csv=str(p))
  np.testing.assert_array_equal(split.forget_subjects, np.sort(subs))
  assert len(split.forget_idx) == int(frame['subject_id'].isin(subs).sum())


def test_retain_sampler_walks_one_permutation(cohort):
  split = make_forget_split(cohort, 0.10, seed=0)
  s = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=5)
  n = 37
  walk = np.concatenate([s.epoch(e, n) for e in range(12)])
  expected = np.resize(s.order, len(walk))  # the permutation, repeated
  np.testing.assert_array_equal(walk, expected)
  assert sorted(s.order.tolist()) == sorted(split.retain_idx.tolist())
  np.testing.assert_array_equal(s.epoch(3, n), walk[3 * n:4 * n])  # stateless
  assert not np.isin(cohort.subject_id[walk], split.forget_subjects).any()
  t = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=5)
  u = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=6)
  np.testing.assert_array_equal(t.epoch(1, n), s.epoch(1, n))
  assert not np.array_equal(u.epoch(1, n), s.epoch(1, n))


def test_retain_sampler_refuses_forget_subjects(cohort):
  split = make_forget_split(cohort, 0.10, seed=0)
  leaky = np.concatenate([split.retain_idx, split.forget_idx[:1]])
  with pytest.raises(AssertionError, match='forget subjects'):
    RetainSampler(cohort.subject_id, leaky, split.forget_subjects, seed=0)


@need_shared
def test_make_forget_sets_script(tmp_path, split):
  import subprocess
  import sys
  root = Path(__file__).resolve().parents[1]
  out = tmp_path / 'sets'
  res = subprocess.run([sys.executable, str(root / 'experiments' / 'make_forget_sets.py'),
                        '--split_csv', str(SPLIT), '--out', str(out), '--seed', '0'],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert sorted(os.listdir(out)) == ['forget_10pct.csv', 'forget_3pct.csv', 'forget_6pct.csv']
  header = SPLIT.read_text().splitlines()[0]
  prev = set()
  for name, f in (('3', 0.03), ('6', 0.06), ('10', 0.10)):
    text = (out / f'forget_{name}pct.csv').read_text()
    assert text.splitlines()[0] == header
    frame = read_split_csv(out / f'forget_{name}pct.csv')
    assert abs(len(frame) - PAPER_SIZES[f]) <= 0.01 * PAPER_SIZES[f]
    assert (frame['fold'] != 'TEST').all()
    subs = set(frame['subject_id'].tolist())
    assert prev <= subs
    prev = subs
  assert 'forget 10%' in res.stdout and 'non-TEST' in res.stdout


def test_validation_split_holds_out_non_members(cohort):
  """Whole non-TEST patients outside every paper forget set, about the asked share of all
  images, one set for 3, 6 and 10 % (so one original), out of the retain set (so out of the
  original's and the retrained model's training), and forget sets unchanged by it."""
  splits = {f: make_forget_split(cohort, f, val_fraction=0.1, val_seed=0)
            for f in PAPER_FRACTIONS}
  sid, test = cohort.subject_id, cohort.fold == 'TEST'
  val = splits[0.10].val_idx
  assert 0.07 * len(cohort) <= len(val) <= 0.1 * len(cohort)
  for f, s in splits.items():
    np.testing.assert_array_equal(s.val_idx, val)
    np.testing.assert_array_equal(s.val_subjects, np.unique(sid[val]))
    assert not test[val].any()
    assert not set(sid[val]) & set(sid[s.forget_idx])
    assert not set(sid[val]) & set(sid[s.retain_idx])  # whole patients
    assert not set(val) & set(s.retain_idx)
    parts = np.concatenate([s.forget_idx, s.retain_idx, s.val_idx, s.test_idx])
    np.testing.assert_array_equal(np.sort(parts), np.arange(len(cohort)))
    np.testing.assert_array_equal(s.forget_idx, make_forget_split(cohort, f).forget_idx)
  assert len(make_forget_split(cohort, 0.10).val_idx) == 0  # off by default in the library
  other = make_forget_split(cohort, 0.10, val_fraction=0.1, val_seed=1).val_idx
  assert not np.array_equal(other, val)
  with pytest.raises(ValueError, match='val_fraction'):
    make_forget_split(cohort, 0.10, val_fraction=1.5)


def test_validation_split_avoids_a_given_forget_list(tmp_path, cohort):
  default = make_forget_split(cohort, 0.10, val_fraction=0.1)
  listed = np.unique(cohort.subject_id[default.val_idx])[:3]  # forget some would-be validation
  path = tmp_path / 'forget.csv'
  pd.DataFrame({'subject_id': listed}).to_csv(path, index=False)
  s = make_forget_split(cohort, 0.0, forget_csv=str(path), val_fraction=0.1)
  assert not set(cohort.subject_id[s.val_idx]) & set(listed.tolist())
  assert set(cohort.subject_id[s.forget_idx]) == set(listed.tolist())
