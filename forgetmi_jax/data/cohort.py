"""The cohort schema every other module reads: one row per image, numpy columns, lazy images.

A `Cohort` is the single in-memory description of a data set (synthetic or MIMIC-CXR): ids,
labels, folds, one report per image (images of one study share their study's report) and the
images themselves, either as a dense float32 array or as any lazy object that can be indexed
with an integer array (the MIMIC loader reads them from an array_record data source).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

NUM_CLASSES = 4
FOLDS = ('1', '2', '3', '4', '5', 'TEST')
TEST_FOLD = 'TEST'
# Column names of the reference split file (`edeme_severity` is misspelled in the original).
SPLIT_COLUMNS = ('subject_id', 'study_id', 'dicom_id', 'edeme_severity', 'fold')
LABEL_COLUMN = 'edeme_severity'
LABEL_ALIASES = ('edeme_severity', 'edema_severity')


@dataclasses.dataclass
class Cohort:
  """One row per image. `images[i]` belongs to `dicom_id[i]` of `study_id[i]` of `subject_id[i]`.

  images: float32 [N, H, W, 1] in [0, 1], or a lazy object with `__len__` and
    `__getitem__(int ndarray) -> [b, H, W, 1]`.
  reports: one string per image (shared by the images of a study).
  labels: int32 [N] in 0..3; fold: str [N] in '1'..'5' or 'TEST'.
  """
  images: Any
  reports: Sequence[str]
  labels: np.ndarray
  subject_id: np.ndarray
  study_id: np.ndarray
  dicom_id: np.ndarray
  fold: np.ndarray

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)
    self.subject_id = np.asarray(self.subject_id, np.int64)
    self.study_id = np.asarray(self.study_id, np.int64)
    self.dicom_id = np.asarray(self.dicom_id).astype(str)
    self.fold = np.asarray(self.fold).astype(str)
    n = len(self.labels)
    for name in ('subject_id', 'study_id', 'dicom_id', 'fold'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'Cohort.{name} has {len(getattr(self, name))} rows, labels has {n}')
    if len(self.reports) != n:
      raise ValueError(f'Cohort.reports has {len(self.reports)} rows, labels has {n}')
    if len(self.images) != n:
      raise ValueError(f'Cohort.images has {len(self.images)} rows, labels has {n}')
    if n and (self.labels.min() < 0 or self.labels.max() >= NUM_CLASSES):
      raise ValueError(f'Cohort.labels must lie in 0..{NUM_CLASSES - 1}')
    bad = sorted(set(np.unique(self.fold)) - set(FOLDS))
    if bad:
      raise ValueError(f'Cohort.fold has unknown values {bad[:5]} (expected {FOLDS})')

  def __len__(self) -> int:
    return len(self.labels)

  def get_images(self, idx) -> np.ndarray:
    """float32 [b, H, W, 1] for an integer index array (works for dense and lazy images)."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    out = self.images[idx]
    return np.asarray(out, np.float32)

  @property
  def image_size(self) -> int:
    shape = getattr(self.images, 'shape', None)
    if shape is None:
      shape = self.get_images(np.zeros(1, np.int64)).shape
    return int(shape[1])

  @property
  def is_test(self) -> np.ndarray:
    return self.fold == TEST_FOLD

  def to_frame(self) -> pd.DataFrame:
    """The cohort as a split-file table (columns of REFERENCE 1, `edeme_severity` sic)."""
    return pd.DataFrame({
        'subject_id': self.subject_id.astype(np.int64),
        'study_id': self.study_id.astype(np.int64),
        'dicom_id': self.dicom_id.astype(object),
        LABEL_COLUMN: self.labels.astype(np.int64),
        'fold': self.fold.astype(object),
    })


def _fail(path, row, column, msg):
  where = f'{path}'
  if row is not None:
    where += f', data row {row}'  # 1-based data row (the header is row 0)
  if column is not None:
    where += f', column {column!r}'
  raise ValueError(f'{where}: {msg}')


def read_split_csv(path) -> pd.DataFrame:
  """Read and validate a split file; returns the canonical columns (label as `edeme_severity`).

  Accepts `edeme_severity` (the original's spelling) or `edema_severity`. Errors name the file,
  the first offending data row (1-based) and the column; they never print report text.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'split file not found: {path}')
  try:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: cannot be parsed as CSV ({type(e).__name__})') from None
  df.columns = [c.strip() for c in df.columns]
  return validate_split_frame(df, path)


def validate_split_frame(df: pd.DataFrame, path='<frame>') -> pd.DataFrame:
  """Validate a split table (strings or numbers) and return it with canonical dtypes."""
  cols = list(df.columns)
  label_col = next((c for c in LABEL_ALIASES if c in cols), None)
  missing = [c for c in ('subject_id', 'study_id', 'dicom_id', 'fold') if c not in cols]
  if label_col is None:
    missing.append(' or '.join(LABEL_ALIASES))
  if missing:
    _fail(path, None, None, f'missing column(s) {missing}; found {cols}')
  if len(df) == 0:
    _fail(path, None, None, 'has no data rows')

  out = {}
  for col in ('subject_id', 'study_id'):
    s = df[col].astype(str).str.strip()
    ok = s.str.fullmatch(r'\d+')
    if not ok.all():
      row = int(np.flatnonzero(~ok.to_numpy())[0])
      _fail(path, row + 1, col, 'expected a positive integer id')
    out[col] = s.astype(np.int64).to_numpy()
  d = df['dicom_id'].astype(str).str.strip()
  empty = (d == '') | (d.str.lower() == 'nan')
  if empty.any():
    _fail(path, int(np.flatnonzero(empty.to_numpy())[0]) + 1, 'dicom_id', 'empty dicom id')
  dup = d.duplicated()
  if dup.any():
    _fail(path, int(np.flatnonzero(dup.to_numpy())[0]) + 1, 'dicom_id', 'duplicate dicom id')
  out['dicom_id'] = d.to_numpy(dtype=object)
  lab = df[label_col].astype(str).str.strip()
  ok = lab.isin([str(k) for k in range(NUM_CLASSES)]) | lab.str.fullmatch(r'[0-3]\.0')
  if not ok.all():
    _fail(path, int(np.flatnonzero(~ok.to_numpy())[0]) + 1, label_col,
          f'expected a severity label in 0..{NUM_CLASSES - 1}')
  out[LABEL_COLUMN] = lab.astype(float).astype(np.int64).to_numpy()
  fold = df['fold'].astype(str).str.strip().str.replace(r'\.0$', '', regex=True)
  fold = fold.where(fold.str.upper() != 'TEST', TEST_FOLD)
  ok = fold.isin(FOLDS)
  if not ok.all():
    _fail(path, int(np.flatnonzero(~ok.to_numpy())[0]) + 1, 'fold',
          f'expected one of {list(FOLDS)}')
  out['fold'] = fold.to_numpy(dtype=object)
  frame = pd.DataFrame(out)
  # A study has one label and one subject; a subject lives in one fold.
  for key, col in (('study_id', LABEL_COLUMN), ('study_id', 'subject_id'), ('subject_id', 'fold')):
    n = frame.groupby(key)[col].nunique()
    if (n > 1).any():
      bad = int(n.index[np.flatnonzero((n > 1).to_numpy())[0]])
      row = int(np.flatnonzero(frame[key].to_numpy() == bad)[0]) + 1
      _fail(path, row, col, f'{key} {bad} has more than one {col}')
  return frame
