"""Forget requests: parsing, validation against the cohort, the split and the summary."""
import logging

import numpy as np
import pandas as pd
import pytest

from forgetmi_jax.data.cohort import TEST_FOLD
from forgetmi_jax.data.forget_request import (ForgetRequestError, load_forget_request,
                                              parse_forget_request)
from forgetmi_jax.data.forget_sets import make_forget_split
from forgetmi_jax.data.synthetic import make_synthetic_cohort

CANARY = 'Zyxwquartz'


@pytest.fixture(scope='module')
def cohort():
  return make_synthetic_cohort(seed=0, image_size=16, num_subjects=40)


@pytest.fixture(scope='module')
def ids(cohort):
  """Three non-TEST subjects with different study counts, one TEST subject."""
  train = np.unique(cohort.subject_id[cohort.fold != TEST_FOLD])
  test = np.unique(cohort.subject_id[cohort.fold == TEST_FOLD])
  return {'train': [int(s) for s in train[[0, 5, 11]]], 'test': int(test[0])}


def write(tmp_path, text, name='request.csv'):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


def test_clean_request_gives_the_forget_sets_split(tmp_path, cohort, ids):
  a, b, c = ids['train']
  path = write(tmp_path, f'name, subject_id ,note\nAlice,{a} , {CANARY}\n,,\nBob, {b}.0,x\n'
                         f'Carol,{c},\n')
  split, summary = load_forget_request(path, cohort)
  # Independently: every image of the three subjects; retain = the rest of the non-TEST.
  want = np.flatnonzero(np.isin(cohort.subject_id, [a, b, c]))
  np.testing.assert_array_equal(split.forget_idx, want)
  np.testing.assert_array_equal(
      split.retain_idx, np.flatnonzero(~np.isin(cohort.subject_id, [a, b, c]) & ~cohort.is_test))
  np.testing.assert_array_equal(split.test_idx, np.flatnonzero(cohort.is_test))
  np.testing.assert_array_equal(split.forget_subjects, sorted([a, b, c]))
  # Same split as forget_sets' own forget-list path.
  listed = write(tmp_path, f'subject_id\n{a}\n{b}\n{c}\n', 'list.csv')
  ref = make_forget_split(cohort, 0.0, forget_csv=listed)
  for field in ('forget_idx', 'retain_idx', 'test_idx', 'forget_subjects'):
    np.testing.assert_array_equal(getattr(split, field), getattr(ref, field))

  frame = cohort.to_frame().iloc[want]
  assert summary['n_rows'] == 3 and summary['n_listed'] == 3 and summary['n_subjects'] == 3
  assert summary['n_images'] == len(want)
  assert summary['n_studies'] == frame['study_id'].nunique()
  assert summary['subject_ids'] == sorted([a, b, c])
  assert summary['duplicates'] == [] and summary['without_images'] == []
  assert summary['warnings'] == []
  assert summary['n_other_columns'] == 2
  assert summary['labels'] == np.bincount(cohort.labels[want], minlength=4).tolist()
  assert summary['n_retain'] == len(split.retain_idx) and summary['n_test'] == len(split.test_idx)
  per = {p['subject_id']: p for p in summary['per_subject']}
  for s in (a, b, c):
    rows = frame[frame['subject_id'] == s]
    assert per[s] == {'subject_id': s, 'n_studies': rows['study_id'].nunique(),
                      'n_images': len(rows)}
  assert len(summary['request_sha256']) == 64
  assert CANARY not in repr(summary) and 'Alice' not in repr(summary)


def test_duplicates_are_merged_and_noted(tmp_path, cohort, ids, caplog):
  a, b, _ = ids['train']
  path = write(tmp_path, f'subject_id\n{b}\n{a}\n{b}\n {b} \n{a}.0\n')
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax'):
    split, summary = load_forget_request(path, cohort)
  np.testing.assert_array_equal(split.forget_subjects, sorted([a, b]))
  assert summary['n_rows'] == 5 and summary['n_listed'] == 2
  assert summary['duplicates'] == sorted([a, b]) and summary['n_duplicate_rows'] == 3
  assert len(summary['warnings']) == 1 and str(b) in summary['warnings'][0]
  assert 'de-duplicated' in caplog.text
  # parse order is first-seen order
  assert parse_forget_request(path)['ids'].tolist() == [b, a]


def test_unknown_and_test_ids_fail_together(tmp_path, cohort, ids):
  a = ids['train'][0]
  path = write(tmp_path, f'subject_id\n{a}\n{ids["test"]}\n99999999\n12\n')
  with pytest.raises(ValueError) as e:
    load_forget_request(path, cohort)
  msg = str(e.value)
  assert path in msg and '99999999' in msg and '12' in msg and str(ids['test']) in msg
  assert 'TEST' in msg and str(a) not in msg
  assert isinstance(e.value, ForgetRequestError)
  assert e.value.unknown_ids == [12, 99999999] and e.value.test_ids == [ids['test']]


@pytest.mark.parametrize('text, match', [
    ('patient\n1\n', "no 'subject_id' column"),
    ('subject_id,Subject_ID\n1,1\n', "2 'subject_id' column"),
    ('subject_id\n', 'lists no subject ids'),
    ('subject_id,other\n,\n\n', 'lists no subject ids'),
    ('', 'file is empty'),
])
def test_file_level_errors(tmp_path, cohort, text, match):
  path = write(tmp_path, text)
  with pytest.raises(ValueError, match=match) as e:
    load_forget_request(path, cohort)
  assert path in str(e.value)


def test_non_numeric_ids_name_rows_not_values(tmp_path, cohort, ids):
  a = ids['train'][0]
  path = write(tmp_path, f'subject_id\n{a}\n{CANARY} Smith\n\n-5\n1e5\n{a}\n')
  with pytest.raises(ForgetRequestError) as e:
    load_forget_request(path, cohort)
  msg = str(e.value)
  assert e.value.non_numeric_rows == [2, 4, 5]  # row 3 is blank, 6 is fine
  assert '[2, 4, 5]' in msg and path in msg
  assert CANARY not in msg and 'Smith' not in msg and '1e5' not in msg


def test_subjects_without_images_are_reported(tmp_path, cohort, ids):
  a, b, _ = ids['train']
  frame = cohort.to_frame()
  ghost = pd.DataFrame({'subject_id': [77777777] * 2, 'study_id': [55555555, 55555556],
                        'dicom_id': ['ghost-1', 'ghost-2'], 'edeme_severity': [0, 1],
                        'fold': ['2', '2']})
  split_csv = tmp_path / 'split.csv'
  pd.concat([frame, ghost]).to_csv(split_csv, index=False)
  path = write(tmp_path, f'subject_id\n{a}\n77777777\n{b}\n')
  with pytest.raises(ForgetRequestError, match='unknown to the cohort: \\[77777777\\]'):
    load_forget_request(path, cohort)
  for table in (str(split_csv), pd.concat([frame, ghost])):
    split, summary = load_forget_request(path, cohort, split_df=table)
    np.testing.assert_array_equal(split.forget_subjects, sorted([a, b]))
    assert summary['without_images'] == [77777777]
    assert summary['n_listed'] == 3 and summary['n_subjects'] == 2
    assert any('77777777' in w and 'no image' in w for w in summary['warnings'])
  only = write(tmp_path, 'subject_id\n77777777\n', 'only.csv')
  with pytest.raises(ForgetRequestError, match='none of the 1 listed'):
    load_forget_request(only, cohort, split_df=str(split_csv))


def test_split_file_test_fold_counts(tmp_path, cohort):
  """A subject with no image rows but TEST in the split file is refused as TEST."""
  frame = cohort.to_frame()
  ghost = pd.DataFrame({'subject_id': [88888888], 'study_id': [55555557],
                        'dicom_id': ['ghost-3'], 'edeme_severity': [2], 'fold': ['TEST']})
  path = write(tmp_path, 'subject_id\n88888888\n')
  with pytest.raises(ForgetRequestError, match='TEST fold') as e:
    load_forget_request(path, cohort, split_df=pd.concat([frame, ghost]))
  assert e.value.test_ids == [88888888] and e.value.unknown_ids == []


def test_missing_file(tmp_path, cohort):
  with pytest.raises(FileNotFoundError, match='forget request not found'):
    load_forget_request(tmp_path / 'nope.csv', cohort)
