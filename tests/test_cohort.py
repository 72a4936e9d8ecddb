"""Cohort schema and split-file validation."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forgetmi_jax.data.cohort import Cohort, SPLIT_COLUMNS, read_split_csv

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mimic_cxr_edema'
SPLIT = SHARED / 'mimic-cxr-sub-img-edema-split-manualtest.csv'
need_split = pytest.mark.skipif(not SPLIT.exists(), reason=f'shared split file absent: {SPLIT}')

HEADER = 'subject_id,study_id,dicom_id,edeme_severity,fold\n'
GOOD = ['10000980,54577367,aa,0,1', '10000980,54980801,bb,3,1', '10011938,50109051,cc,1,TEST']


def _write(tmp_path, lines, header=HEADER, name='split.csv'):
  p = tmp_path / name
  p.write_text(header + '\n'.join(lines) + '\n')
  return p


@need_split
def test_real_split_schema():
  df = read_split_csv(SPLIT)
  assert tuple(df.columns) == SPLIT_COLUMNS
  assert len(df) == 6742
  assert df['subject_id'].nunique() == 1663 and df['study_id'].nunique() == 6084
  assert df['edeme_severity'].value_counts().sort_index().tolist() == [2883, 1511, 1709, 639]
  assert (df['fold'] == 'TEST').sum() == 531
  assert set(df['fold']) == {'1', '2', '3', '4', '5', 'TEST'}
  assert df['subject_id'].dtype == np.int64


def test_accepts_both_label_spellings(tmp_path):
  a = read_split_csv(_write(tmp_path, GOOD))
  b = read_split_csv(_write(tmp_path, GOOD, header=HEADER.replace('edeme', 'edema'), name='b.csv'))
  pd.testing.assert_frame_equal(a, b)
  assert a['edeme_severity'].tolist() == [0, 3, 1]
  assert a['fold'].tolist() == ['1', '1', 'TEST']


@pytest.mark.parametrize('row, col', [
    ('10000980,x12,dd,0,1', 'study_id'),
    ('10000981,54577368,dd,4,1', 'edeme_severity'),
    ('10000981,54577368,dd,1,7', 'fold'),
    ('10000981,54577368,,1,1', 'dicom_id'),
    ('10000981,54577368,aa,1,1', 'dicom_id'),  # duplicate
])
def test_bad_values_name_file_row_column(tmp_path, row, col):
  p = _write(tmp_path, GOOD + [row])
  with pytest.raises(ValueError) as err:
    read_split_csv(p)
  msg = str(err.value)
  assert str(p) in msg and 'data row 4' in msg and f"column '{col}'" in msg


def test_inconsistent_study_label_and_missing_column(tmp_path):
  p = _write(tmp_path, GOOD + ['10000980,54577367,dd,2,1'])
  with pytest.raises(ValueError, match='study_id 54577367 has more than one edeme_severity'):
    read_split_csv(p)
  p = _write(tmp_path, ['1,2,a,1'], header='subject_id,study_id,dicom_id,fold\n', name='c.csv')
  with pytest.raises(ValueError, match='missing column'):
    read_split_csv(p)
  with pytest.raises(FileNotFoundError):
    read_split_csv(tmp_path / 'nope.csv')


def _cohort(images):
  return Cohort(images=images, reports=['r0', 'r0', 'r1'], labels=[0, 0, 3],
                subject_id=[1, 1, 2], study_id=[10, 10, 11], dicom_id=['a', 'b', 'c'],
                fold=['1', '1', 'TEST'])


class _Lazy:
  def __init__(self, arr):
    self.arr, self.calls = arr, 0

  def __len__(self):
    return len(self.arr)

  def __getitem__(self, idx):
    self.calls += 1
    return self.arr[np.asarray(idx)]


def test_cohort_dense_and_lazy():
  arr = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
  dense, lazy = _cohort(arr), _cohort(_Lazy(arr))
  for c in (dense, lazy):
    assert len(c) == 3 and c.image_size == 8
    np.testing.assert_array_equal(c.get_images([2, 0]), arr[[2, 0]])
    assert c.get_images([1]).dtype == np.float32
    np.testing.assert_array_equal(c.is_test, [False, False, True])
  assert lazy.images.calls >= 1
  f = dense.to_frame()
  assert tuple(f.columns) == SPLIT_COLUMNS
  assert f['edeme_severity'].tolist() == [0, 0, 3] and f['fold'].tolist() == ['1', '1', 'TEST']


def test_cohort_rejects_inconsistent_columns():
  arr = np.zeros((3, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match='reports'):
    Cohort(images=arr, reports=['a'], labels=[0, 0, 0], subject_id=[1, 1, 1],
           study_id=[1, 1, 1], dicom_id=['a', 'b', 'c'], fold=['1', '1', '1'])
  with pytest.raises(ValueError, match='labels must lie'):
    Cohort(images=arr, reports=['a'] * 3, labels=[0, 5, 0], subject_id=[1, 1, 1],
           study_id=[1, 1, 1], dicom_id=['a', 'b', 'c'], fold=['1', '1', '1'])
  with pytest.raises(ValueError, match='fold'):
    Cohort(images=arr, reports=['a'] * 3, labels=[0, 1, 0], subject_id=[1, 1, 1],
           study_id=[1, 1, 1], dicom_id=['a', 'b', 'c'], fold=['1', '9', '1'])
