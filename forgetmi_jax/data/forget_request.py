"""A forget request: a CSV of patients to forget, checked against the cohort before any training.

Why: a real request ("forget these patients") comes as a spreadsheet export, with ids as text,
stray whitespace, duplicate rows and extra columns (names, notes). Everything that can be
wrong with it must fail here, in one error that names the file and every offending id or row,
not an hour into unlearning; and what it did (duplicates merged, patients without images) must
be on record in the summary, never silently dropped.

The forget split itself is `forget_sets.make_forget_split`'s (every image of every study of
each patient; retain = the other non-TEST images; test = TEST), so a request and a forget
list give identical splits. Nothing here reads report text or pixels, and errors never echo
cell contents: a non-numeric "id" may be a name, so only its row number is given.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import NamedTuple

import numpy as np
import pandas as pd

from forgetmi_jax.data.cohort import NUM_CLASSES, TEST_FOLD, read_split_csv
from forgetmi_jax.data.forget_sets import ForgetSplit, make_forget_split

log = logging.getLogger('forgetmi_jax')

SUBJECT_COLUMN = 'subject_id'
# Ids listed in an error message; the exception's attributes hold all of them.
MAX_IDS_SHOWN = 20


class ForgetRequestError(ValueError):
  """Why a request was refused; the attributes list every offending id / data row."""

  def __init__(self, path, problems, non_numeric_rows=(), unknown_ids=(), test_ids=()):
    self.path = path
    self.non_numeric_rows = list(non_numeric_rows)
    self.unknown_ids = list(unknown_ids)
    self.test_ids = list(test_ids)
    super().__init__(f'forget request {path}: ' + '; '.join(problems))


class ForgetRequest(NamedTuple):
  """`split` as `make_forget_split` returns it; `summary` holds counts and ids only."""
  split: ForgetSplit
  summary: dict


def _shown(ids):
  ids = list(ids)
  more = f' ... ({len(ids)} in all)' if len(ids) > MAX_IDS_SHOWN else ''
  return f'{ids[:MAX_IDS_SHOWN]}{more}'


def parse_forget_request(path) -> dict:
  """Read the request's subject ids: {'ids' (first-seen order, unique), 'duplicates', ...}.

  The `subject_id` column (matched case-insensitively, whitespace stripped) is read as text;
  an id is 1 to 18 digits, optionally with a '.0' tail (a spreadsheet's float export). Rows
  whose cells are all empty are ignored (data row numbers still count them); other columns
  are ignored and never read into the result. Raises ForgetRequestError for a missing column,
  an empty request or non-numeric ids (all their 1-based data row numbers, the header being
  row 0).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'forget request not found: {path}')
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  try:
    df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                     encoding='utf-8-sig')
  except pd.errors.EmptyDataError:
    raise ForgetRequestError(path, ['the file is empty (no header, no ids)']) from None
  except (pd.errors.ParserError, UnicodeDecodeError) as e:
    raise ForgetRequestError(path, [f'cannot be parsed as CSV ({type(e).__name__})']) from None
  columns = [str(c).strip() for c in df.columns]
  matches = [i for i, c in enumerate(columns) if c.lower() == SUBJECT_COLUMN]
  if len(matches) != 1:
    what = 'no' if not matches else f'{len(matches)}'
    raise ForgetRequestError(path, [f'{what} {SUBJECT_COLUMN!r} column(s) among its '
                                    f'{len(columns)} column(s)'])
  cells = df.apply(lambda col: col.astype(str).str.strip())
  blank = (cells == '').all(axis=1).to_numpy()
  raw = cells.iloc[:, matches[0]].to_numpy()
  rows = np.flatnonzero(~blank) + 1  # 1-based data rows
  values = raw[~blank]
  if values.size == 0:
    raise ForgetRequestError(path, ['the request lists no subject ids'])
  ok = pd.Series(values, dtype=str).str.fullmatch(r'\d{1,18}(\.0*)?').to_numpy()
  if not ok.all():
    bad = rows[~ok].tolist()
    raise ForgetRequestError(path, [f'{len(bad)} subject id(s) are not integers, data row(s) '
                                    f'{_shown(bad)}'], non_numeric_rows=bad)
  ids = np.asarray([int(v.split('.')[0]) for v in values], np.int64)
  unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
  order = np.argsort(first, kind='stable')
  return {
      'path': path,
      'sha256': digest,
      'n_rows': int(ids.size),
      'ids': unique[order],
      'duplicates': unique[counts > 1].tolist(),
      'n_duplicate_rows': int((counts - 1).sum()),
      'n_other_columns': len(columns) - 1,
  }


def _split_table(split_df):
  if split_df is None:
    return None
  if isinstance(split_df, (str, os.PathLike)):
    return read_split_csv(split_df)
  return split_df


def _split_for_subjects(cohort, subjects) -> ForgetSplit:
  """`make_forget_split` on exactly these (validated) subjects.

  forget_sets builds a split from subjects only through a forget-list file, so the ids (and
  nothing else) go through a private temporary CSV: the split logic stays in one place.
  """
  with tempfile.TemporaryDirectory(prefix='forget-request-') as tmp:
    path = os.path.join(tmp, 'subjects.csv')
    pd.DataFrame({SUBJECT_COLUMN: np.asarray(subjects, np.int64)}).to_csv(path, index=False)
    return make_forget_split(cohort, fraction=0.0, forget_csv=path)


def load_forget_request(path, cohort, split_df=None) -> ForgetRequest:
  """Validate a request CSV against `cohort` and return its forget split and a summary.

  split_df: optional split table (DataFrame or split CSV path) of the full cohort. A subject
    it knows but the cohort has no image of (e.g. images not downloaded) is reported in
    `summary['without_images']` rather than called unknown; without it every id must have
    images in the cohort (a Cohort is one row per image, so it knows no image-less subject).
  Raises ForgetRequestError (a ValueError) naming the file and all offending ids for ids
  unknown to the cohort (and split table), TEST-fold ids, and when no listed subject has any
  image; see `parse_forget_request` for the file-level errors.

  summary: n_rows, n_listed, n_subjects, n_studies, n_images (what is forgotten), subject_ids,
  duplicates, n_duplicate_rows, without_images, n_retain, n_test, labels (image counts per
  class in the forget set), per_subject [{subject_id, n_studies, n_images}], request_sha256
  (of the file's bytes), n_other_columns, warnings (messages with counts and ids only). The
  file's name is left out: it may name a person.
  """
  req = parse_forget_request(path)
  path = req['path']
  ids = req['ids']
  table = _split_table(split_df)
  cohort_subjects = set(np.unique(cohort.subject_id).tolist())
  test_subjects = set(np.unique(cohort.subject_id[cohort.fold == TEST_FOLD]).tolist())
  known = set(cohort_subjects)
  if table is not None:
    split_subjects = pd.to_numeric(table['subject_id']).astype(np.int64).to_numpy()
    split_fold = table['fold'].astype(str).to_numpy()
    known |= set(split_subjects.tolist())
    test_subjects |= set(np.unique(split_subjects[split_fold == TEST_FOLD]).tolist())
  unknown = sorted(int(s) for s in ids if s not in known)
  test = sorted(int(s) for s in ids if s in test_subjects)
  problems = []
  if unknown:
    where = 'the cohort or the split file' if table is not None else 'the cohort'
    problems.append(f'{len(unknown)} subject id(s) unknown to {where}: {_shown(unknown)}')
  if test:
    problems.append(f'{len(test)} subject id(s) are in the TEST fold, which is never '
                    f'forgotten (it measures generalisation): {_shown(test)}')
  if problems:
    raise ForgetRequestError(path, problems, unknown_ids=unknown, test_ids=test)
  without = sorted(int(s) for s in ids if s not in cohort_subjects)
  with_images = np.sort(np.asarray([s for s in ids if s in cohort_subjects], np.int64))
  if with_images.size == 0:
    raise ForgetRequestError(path, [f'none of the {len(ids)} listed subject(s) has an image '
                                    f'in the cohort: {_shown(without)}'])
  split = _split_for_subjects(cohort, with_images)
  if not np.array_equal(split.forget_subjects, with_images):
    raise AssertionError('make_forget_split returned other subjects than requested')

  fidx = split.forget_idx
  frame = pd.DataFrame({'subject_id': cohort.subject_id[fidx],
                        'study_id': cohort.study_id[fidx]})
  per = frame.groupby('subject_id').agg(n_studies=('study_id', 'nunique'),
                                        n_images=('study_id', 'size'))
  warnings = []
  if req['duplicates']:
    warnings.append(f'{len(req["duplicates"])} subject id(s) listed more than once '
                    f'({req["n_duplicate_rows"]} extra row(s)) were de-duplicated: '
                    f'{_shown(req["duplicates"])}')
  if without:
    warnings.append(f'{len(without)} listed subject(s) have no image in the cohort and '
                    f'nothing of theirs is trained on: {_shown(without)}')
  for w in warnings:
    log.warning('forget request %s: %s', path, w)
  labels = np.bincount(np.asarray(cohort.labels)[fidx], minlength=NUM_CLASSES)
  summary = {
      'request_sha256': req['sha256'],
      'n_rows': req['n_rows'],
      'n_listed': int(len(ids)),
      'n_subjects': int(with_images.size),
      'n_studies': int(np.unique(cohort.study_id[fidx]).size),
      'n_images': int(fidx.size),
      'subject_ids': with_images.tolist(),
      'duplicates': req['duplicates'],
      'n_duplicate_rows': req['n_duplicate_rows'],
      'without_images': without,
      'n_retain': int(split.retain_idx.size),
      'n_test': int(split.test_idx.size),
      'labels': labels.astype(int).tolist(),
      'per_subject': [{'subject_id': int(s), 'n_studies': int(r.n_studies),
                       'n_images': int(r.n_images)} for s, r in per.iterrows()],
      'n_other_columns': req['n_other_columns'],
      'warnings': warnings,
  }
  return ForgetRequest(split=split, summary=summary)
