"""Forgetting a patient means their data too: purge subjects from the preprocessed MIMIC builds.

Why: unlearning a patient from the model is not enough while the cache still holds their
preprocessed images and report text. `purge_subjects` rewrites every MIMIC-CXR array_record
build under a folder without the listed subjects' rows (read through the build's own tfds
reader, written by the same tfds builder under a locked `.incomplete-*` folder, then swapped
in), and removes leftover partial builds, which may hold the same data. The row order of the
others is kept and their `index` renumbered 0..n-1; their images, reports, labels and ids are
unchanged byte for byte. Summaries and logs carry counts only, never subject ids or content.

Not covered here: the raw MIMIC files and the split CSV (a later build from them brings the
rows back), token caches, a tokenizer trained on the reports, and models that saw the
patients (the lead's purge of model caches). Deleted files are unlinked, not overwritten:
use encrypted storage where residue on disk matters.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np

from forgetmi_jax.data import mimic_cxr as M
from forgetmi_jax.data.mimic_cxr import restrict_permissions

log = logging.getLogger('forgetmi_jax')

__all__ = ['PurgeSummary', 'find_builds', 'purge_subjects', 'restrict_permissions']


@dataclasses.dataclass(frozen=True)
class PurgeSummary:
  """Counts only. `subjects_found`: requested subjects present in at least one build."""
  subjects_requested: int
  subjects_found: int
  builds_scanned: int
  builds_rewritten: int
  rows_removed: int
  rows_kept: int
  stale_removed: int
  dry_run: bool

  def __str__(self):
    verb = 'would remove' if self.dry_run else 'removed'
    return (f'purge: {self.subjects_found} of {self.subjects_requested} subject(s) found; '
            f'{verb} {self.rows_removed} row(s) from {self.builds_rewritten} of '
            f'{self.builds_scanned} build(s) ({self.rows_kept} row(s) kept), {verb} '
            f'{self.stale_removed} leftover partial build folder(s)')


def _subject_set(subject_ids) -> set:
  out = set()
  for k, s in enumerate(np.asarray(list(subject_ids), dtype=object).reshape(-1)):
    try:
      v = int(str(s).strip().lstrip('pP'))
    except ValueError:
      raise ValueError(f'subject_ids entry {k} is not an integer subject id') from None
    out.add(v)
  return out


def find_builds(root) -> list[str]:
  """Complete MIMIC builds (`.../mimic_cxr_edema/<name>/<version>/` with the row metadata)
  anywhere under `root` (a tfds data_dir, a run cache folder, or one build folder)."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'folder not found: {root}')
  if M.is_complete(root):
    return [root]
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))  # partial builds: not rows
    if M.META_FILE in files and \
        os.path.basename(os.path.dirname(os.path.dirname(folder))) == M.DATASET_NAME:
      found.append(folder)
      dirs[:] = []
  return found


def _data_dirs(root, builds) -> list[str]:
  """Folders that hold builds or leftover `.incomplete-*` build folders."""
  dirs = {os.path.dirname(os.path.dirname(os.path.dirname(b))) for b in builds}
  for folder, sub, _ in os.walk(os.path.abspath(os.fspath(root))):
    if any(M.tmp_build_name(d) for d in sub):
      dirs.add(folder)
    sub[:] = [d for d in sub if not d.startswith('.')]
  return sorted(dirs)


def _rewrite(final, keep, meta):
  """Write the build again with rows `keep` only, then swap it in (caller holds the lock)."""
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(final)))
  name = os.path.basename(os.path.dirname(final))
  source = M.open_source(final)
  if len(source) != meta['num_examples']:
    raise M.MimicDataError(f'{final}: {len(source)} records but {meta["num_examples"]} rows in '
                           f'{M.META_FILE}; delete the folder instead')

  def examples():
    for new, old in enumerate(keep):
      rec = source[int(old)]
      if int(rec['index']) != int(old):
        raise M.MimicDataError(f'{final}: record {old} is out of row order')
      yield new, {'image': np.asarray(rec['image']), 'report': M.record_text(rec['report']),
                  'label': int(rec['label']), 'subject_id': int(rec['subject_id']),
                  'study_id': int(rec['study_id']),
                  'dicom_id': M.record_text(rec['dicom_id']),
                  'fold': M.record_text(rec['fold']), 'index': new}

  tmp = tempfile.mkdtemp(prefix=f'{M.TMP_PREFIX}{name}-', dir=data_dir)
  aside = tempfile.mkdtemp(prefix=f'{M.TMP_PREFIX}{name}-', dir=data_dir)
  try:
    _, built = M.write_build(tmp, name, int(meta['image_size']), examples=examples)
    new_meta = dict(meta)
    for k in ('subject_id', 'study_id', 'dicom_id', 'label', 'fold', 'report'):
      new_meta[k] = [meta[k][int(i)] for i in keep]
    new_meta['num_examples'] = len(keep)
    new_meta['purged_rows'] = int(meta.get('purged_rows', 0)) + meta['num_examples'] - len(keep)
    with open(os.path.join(built, M.META_FILE), 'w', encoding='utf-8') as f:
      json.dump(new_meta, f)
    restrict_permissions(built)
    os.replace(final, aside)  # both renames within data_dir; a crash in between leaves the
    os.replace(built, final)  # old rows in a stale `.incomplete-*` folder, removed next time
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)


def purge_subjects(data_dir_or_cache_dir, subject_ids: Iterable, *, dry_run: bool = False
                   ) -> PurgeSummary:
  """Remove every row of `subject_ids` from all MIMIC builds under `data_dir_or_cache_dir`.

  Each affected build is rewritten without those rows and swapped in under its build lock
  (a concurrent build or purge of the same build waits); leftover partial builds are removed.
  `dry_run`: count only, change nothing. Returns counts (also logged at INFO).
  Loading with unchanged inputs afterwards reuses the purged build (its key is unchanged).
  """
  subjects = _subject_set(subject_ids)
  root = os.fspath(data_dir_or_cache_dir)
  builds = find_builds(root)
  found, rewritten, removed, kept, stale = set(), 0, 0, 0, 0
  for d in _data_dirs(root, builds):
    stale += M.clean_stale_builds(d, dry_run=dry_run)
  for final in builds:
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(final)))
    name = os.path.basename(os.path.dirname(final))
    with M.build_lock(data_dir, name):
      if not M.is_complete(final):
        continue  # replaced or removed meanwhile
      meta = M.read_meta(final)
      sub = np.asarray(meta['subject_id'], np.int64)
      hit = np.isin(sub, np.fromiter(subjects, np.int64, len(subjects)))
      found.update(int(s) for s in np.unique(sub[hit]))
      kept += int((~hit).sum())
      if not hit.any():
        continue
      removed += int(hit.sum())
      rewritten += 1
      if not dry_run:
        _rewrite(final, np.flatnonzero(~hit), meta)
  summary = PurgeSummary(subjects_requested=len(subjects), subjects_found=len(found),
                         builds_scanned=len(builds), builds_rewritten=rewritten,
                         rows_removed=removed, rows_kept=kept, stale_removed=stale,
                         dry_run=bool(dry_run))
  log.info('%s', summary)
  return summary
