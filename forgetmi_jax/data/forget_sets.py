"""Forget / retain / test sets by patient (REFERENCE 2).

Forget sets hold every image of the chosen subjects, never TEST subjects, are nested
(3 % within 6 % within 10 %), are sized as a fraction of ALL images, and keep the cohort's
studies-per-subject distribution (the paper's stated intent; its released lists favour
many-study patients, and `read_forget_list` accepts such lists as given).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

from forgetmi_jax.data.cohort import TEST_FOLD, validate_split_frame

PAPER_FRACTIONS = (0.03, 0.06, 0.10)
# Bins of studies per subject used for stratification (upper bounds, inclusive).
STUDY_BINS = (1, 2, 3, 5, 8, 12, 10**9)
VALIDATION_STREAM = 20251  # the validation draw's own random stream (the forget ladder: 20250)


def study_bin(n_studies) -> np.ndarray:
  return np.searchsorted(np.asarray(STUDY_BINS), np.asarray(n_studies), side='left')


def _subject_table(split_df: pd.DataFrame) -> pd.DataFrame:
  g = split_df.groupby('subject_id', sort=True)
  t = pd.DataFrame({'images': g.size(), 'studies': g['study_id'].nunique(),
                    'test': g['fold'].agg(lambda f: (f.astype(str) == TEST_FOLD).any())})
  t['bin'] = study_bin(t['studies'].to_numpy())
  return t


def stratified_order(split_df: pd.DataFrame, seed: int = 0, stream: int = 20250) -> np.ndarray:
  """Non-TEST subject ids in an order whose every prefix is stratified by studies per subject.

  Within each bin the subjects are permuted (seeded); each gets the position key
  (rank + u) / bin size with u ~ U(0, 1), and all are sorted by it (systematic sampling), so
  any prefix holds each bin in proportion to its share of subjects.
  """
  t = _subject_table(split_df)
  t = t[~t['test']]
  rng = np.random.default_rng([int(seed), int(stream)])
  ids, keys = [], []
  for b in sorted(t['bin'].unique()):
    members = rng.permutation(t.index[t['bin'] == b].to_numpy())
    keys.append((np.arange(len(members)) + rng.uniform(size=len(members))) / len(members))
    ids.append(members)
  ids, keys = np.concatenate(ids), np.concatenate(keys)
  return ids[np.argsort(keys, kind='stable')]


def select_forget_subjects(split_df: pd.DataFrame, fractions=PAPER_FRACTIONS, seed: int = 0,
                           tolerance: float = 0.005) -> dict[float, np.ndarray]:
  """Nested forget subject sets {fraction: sorted subject ids}, sized to fraction * all images.

  Walks `stratified_order` once for all fractions (ascending): a subject is taken when the
  running image count stays <= target = fraction * all images, and a fraction is complete once
  the count reaches target * (1 - tolerance); subjects skipped for overshooting stay first in
  line for the next fraction. Larger fractions therefore contain the smaller ones.
  """
  split_df = validate_split_frame(split_df)
  fractions = sorted(float(f) for f in fractions)
  if not fractions or fractions[0] <= 0 or fractions[-1] >= 1:
    raise ValueError(f'fractions must lie in (0, 1), got {fractions}')
  t = _subject_table(split_df)
  total = int(t['images'].sum())
  available = int(t.loc[~t['test'], 'images'].sum())
  order = list(stratified_order(split_df, seed))
  images = t['images'].to_dict()
  chosen, count, out = [], 0, {}
  pending = order
  for f in fractions:
    target = f * total
    if target > available:
      raise ValueError(f'forget fraction {f} needs {target:.0f} images; only {available} '
                       f'non-TEST images exist')
    skipped = []
    for pos, s in enumerate(pending):
      if count >= target * (1 - tolerance):
        skipped.extend(pending[pos:])
        break
      if count + images[s] <= target:
        chosen.append(s)
        count += images[s]
      else:
        skipped.append(s)
    pending = skipped
    out[f] = np.sort(np.asarray(chosen, np.int64))
  return out


def read_forget_list(path, split_df: pd.DataFrame) -> np.ndarray:
  """Subject ids of a forget list CSV (a `subject_id` column, e.g. the paper's forget_set_*.csv).

  Unknown subjects and TEST subjects are errors that name the file and the offending ids.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'forget list not found: {path}')
  df = pd.read_csv(path, dtype=str, keep_default_na=False)
  df.columns = [c.strip() for c in df.columns]
  if 'subject_id' not in df.columns:
    raise ValueError(f'{path}: no subject_id column (found {list(df.columns)})')
  raw = df['subject_id'].astype(str).str.strip()
  ok = raw.str.fullmatch(r'\d+')
  if not ok.all():
    row = int(np.flatnonzero(~ok.to_numpy())[0]) + 1
    raise ValueError(f'{path}, data row {row}, column subject_id: expected an integer id')
  ids = pd.unique(raw.astype(np.int64).to_numpy())
  t = _subject_table(split_df)
  unknown = sorted(set(ids.tolist()) - set(t.index.tolist()))
  if unknown:
    raise ValueError(f'{path}: {len(unknown)} subject id(s) not in the split file: '
                     f'{unknown[:10]}{" ..." if len(unknown) > 10 else ""}')
  test = sorted(int(s) for s in ids if t.loc[s, 'test'])
  if test:
    raise ValueError(f'{path}: {len(test)} subject id(s) are in the TEST fold and cannot be '
                     f'forgotten: {test[:10]}{" ..." if len(test) > 10 else ""}')
  return np.sort(ids.astype(np.int64))


@dataclasses.dataclass
class ForgetSplit:
  """Image indices into the cohort (int64, sorted).

  `val_idx`: the validation non-members, whole non-TEST patients held out of the original's
  and the retrained model's training (never forget patients). Every tuning and stopping
  choice reads them instead of the test set or the retrained model; empty = no such split.
  """
  forget_idx: np.ndarray
  retain_idx: np.ndarray
  test_idx: np.ndarray
  forget_subjects: np.ndarray
  val_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  val_subjects: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def select_validation_subjects(split_df: pd.DataFrame, fraction: float, exclude,
                               seed: int = 0) -> np.ndarray:
  """Sorted non-TEST subject ids outside `exclude`, about `fraction` of ALL images, stratified
  by studies per subject (a prefix of `stratified_order` under its own seed stream)."""
  fraction = float(fraction)
  if not 0 <= fraction < 1:
    raise ValueError(f'data.val_fraction must lie in [0, 1), got {fraction}')
  if fraction == 0:
    return np.zeros(0, np.int64)
  t = _subject_table(validate_split_frame(split_df))
  target, count, chosen = fraction * float(t['images'].sum()), 0, []
  excluded = set(np.asarray(exclude, np.int64).tolist())
  for s in stratified_order(split_df, seed=int(seed), stream=VALIDATION_STREAM):
    if count >= target * (1 - 0.005):
      break
    if int(s) in excluded or count + t.loc[s, 'images'] > target:
      continue
    chosen.append(int(s))
    count += int(t.loc[s, 'images'])
  if not chosen:
    raise ValueError(f'data.val_fraction={fraction} selects no patient (too small, or every '
                     'non-TEST patient is a forget patient)')
  return np.sort(np.asarray(chosen, np.int64))


def make_forget_split(cohort, fraction: float, seed: int = 0, forget_csv=None,
                      val_fraction: float = 0.0, val_seed: int = 0) -> ForgetSplit:
  """Forget = all images of the selected subjects; validation = held-out non-members; retain
  = the other non-TEST images; test = TEST.

  With `forget_csv` its subjects are used. Otherwise the subjects come from the nested ladder
  of the paper's fractions plus `fraction`, so the 3/6/10 % sets are identical whether asked
  for alone or together. The validation patients never come from that ladder's largest set
  (nor a given list's patients), so one validation set, hence one original model, serves
  3, 6 and 10 %.
  """
  frame = cohort.to_frame()
  if forget_csv:
    subjects = exclude = read_forget_list(forget_csv, frame)
  else:
    ladder = sorted(set(PAPER_FRACTIONS) | {float(fraction)})
    nested = select_forget_subjects(frame, ladder, seed=seed)
    subjects, exclude = nested[float(fraction)], nested[ladder[-1]]
  val_subjects = select_validation_subjects(frame, val_fraction, exclude, seed=val_seed)
  test = cohort.fold == TEST_FOLD
  forget = np.isin(cohort.subject_id, subjects)
  val = np.isin(cohort.subject_id, val_subjects)
  return ForgetSplit(forget_idx=np.flatnonzero(forget),
                     retain_idx=np.flatnonzero(~forget & ~test & ~val),
                     test_idx=np.flatnonzero(test), forget_subjects=np.asarray(subjects, np.int64),
                     val_idx=np.flatnonzero(val), val_subjects=val_subjects)


class RetainSampler:
  """Retain examples for unlearning epochs: one seeded permutation, walked sequentially.

  `epoch(e, n)` returns positions [e*n, (e+1)*n) of the permutation, wrapping around, i.e.
  the slice after epoch e-1's (for a constant n). Stateless, so resumed runs replay exactly.
  Raises if any retain index belongs to a forget subject.
  """

  def __init__(self, cohort_subject_ids, retain_idx, forget_subjects, seed: int = 0):
    self.subject_ids = np.asarray(cohort_subject_ids, np.int64)
    self.retain_idx = np.asarray(retain_idx, np.int64)
    self.forget_subjects = np.asarray(forget_subjects, np.int64)
    if len(self.retain_idx) == 0:
      raise ValueError('RetainSampler needs a non-empty retain set')
    self._check(self.retain_idx)
    self.order = np.random.default_rng([int(seed), 31337]).permutation(self.retain_idx)

  def _check(self, idx):
    leak = np.isin(self.subject_ids[idx], self.forget_subjects)
    if leak.any():
      bad = np.unique(self.subject_ids[idx][leak])
      raise AssertionError(f'{int(leak.sum())} retain index(es) belong to forget subjects '
                           f'{bad[:5].tolist()}')

  def __len__(self):
    return len(self.order)

  def epoch(self, epoch: int, n: int) -> np.ndarray:
    pos = (int(epoch) * int(n) + np.arange(int(n))) % len(self.order)
    out = self.order[pos]
    self._check(out)
    return out


def summarize(split_df: pd.DataFrame, subjects) -> dict:
  """Images, subjects, studies, label counts and studies-per-subject shares of a subject set."""
  sub = split_df[split_df['subject_id'].isin(np.asarray(subjects))]
  t = _subject_table(sub) if len(sub) else _subject_table(split_df).iloc[:0]
  label_col = 'edeme_severity' if 'edeme_severity' in sub else 'edema_severity'
  return {
      'images': int(len(sub)), 'subjects': int(sub['subject_id'].nunique()),
      'studies': int(sub['study_id'].nunique()),
      'labels': [int((sub[label_col] == k).sum()) for k in range(4)],
      'mean_studies_per_subject': float(t['studies'].mean()) if len(t) else 0.0,
      'bin_shares': [float((t['bin'] == b).mean()) if len(t) else 0.0
                     for b in range(len(STUDY_BINS))],
  }


def bin_labels() -> list[str]:
  lo, out = 1, []
  for hi in STUDY_BINS:
    out.append(f'{lo}' if hi == lo else (f'{lo}+' if hi > 10**8 else f'{lo}-{hi}'))
    lo = hi + 1
  return out
