"""Forgetting a patient means their data too: remove what a cache holds of them.

- their rows of every preprocessed MIMIC-CXR build (data/purge.py);
- every cached original or retrained model that was trained on them (its COMPLETE file lists
  the patients it saw; an entry without that list is removed too: its provenance is unknown);
- tokenizer vocabularies trained on the cohort's reports, and token caches.
Run folders (unlearned models, per-example losses) are the user's and are not touched; the
summary says so. Counts only are logged, never ids or content.
"""
import dataclasses
import glob
import logging
import os
import shutil

import pandas as pd

from forgetmi_jax.data.purge import purge_subjects
from forgetmi_jax.train import cache as cache_lib

log = logging.getLogger('forgetmi_jax')
_MODEL_KINDS = ('original-', 'retrain-')


@dataclasses.dataclass(frozen=True)
class CachePurge:
  data: str  # the data purge's summary line
  models_removed: int
  models_kept: int
  tokenizers_removed: int
  token_caches_removed: int
  dry_run: bool

  def __str__(self):
    verb = 'would remove' if self.dry_run else 'removed'
    return (f'{self.data}; {verb} {self.models_removed} cached model(s) that saw them '
            f'({self.models_kept} kept), {self.tokenizers_removed} tokenizer(s), '
            f'{self.token_caches_removed} token cache(s). Run folders are not touched: delete '
            'any unlearned model there that was not unlearned for these patients.')


def read_subjects(csv_path):
  """The `subject_id` column of a CSV, as ints (error naming the file otherwise)."""
  table = pd.read_csv(csv_path, dtype=str)
  if 'subject_id' not in table.columns:
    raise ValueError(f'{csv_path}: no subject_id column')
  try:
    return sorted({int(float(s)) for s in table['subject_id'].dropna()})
  except ValueError:
    raise ValueError(f'{csv_path}: subject_id holds a non-numeric value') from None


def purge_cache(cache_dir, subject_ids, dry_run=False) -> CachePurge:
  subjects = {int(s) for s in subject_ids}
  if not os.path.isdir(cache_dir):
    raise FileNotFoundError(f'cache folder {cache_dir} does not exist')
  data = purge_subjects(cache_dir, subjects, dry_run=dry_run)
  removed = kept = 0
  for entry in sorted(glob.glob(os.path.join(cache_dir, '*'))):
    name = os.path.basename(entry)
    if not os.path.isdir(entry) or not name.startswith(_MODEL_KINDS):
      continue
    saw = None
    if cache_lib.is_complete(entry):
      saw = cache_lib.read_meta(entry).get('subjects')
    if saw is not None and not subjects.intersection(saw):
      kept += 1
      continue
    removed += 1
    if not dry_run:
      with cache_lib.lock(entry):
        shutil.rmtree(entry, ignore_errors=True)
  tokenizers = [p for p in glob.glob(os.path.join(cache_dir, 'tokenizer-*')) if os.path.isdir(p)]
  tokens = glob.glob(os.path.join(cache_dir, '**', 'tokens-*.npz'), recursive=True)
  if not dry_run:
    for p in tokenizers:
      shutil.rmtree(p, ignore_errors=True)
    for p in tokens:
      os.remove(p)
  summary = CachePurge(str(data), removed, kept, len(tokenizers), len(tokens), dry_run)
  log.info('%s', summary)
  return summary
