"""Write nested 3 / 6 / 10 % forget sets (by patient, never TEST) from a split file.

  python experiments/make_forget_sets.py --split_csv PATH --out DIR [--seed 0]

Writes forget_3pct.csv, forget_6pct.csv, forget_10pct.csv (the split file's rows of the chosen
subjects, same columns) and prints a summary against the whole cohort.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.data.cohort import read_split_csv  # noqa: E402
from forgetmi_jax.data.forget_sets import (PAPER_FRACTIONS, bin_labels,  # noqa: E402
                                           select_forget_subjects, summarize)

_SPLIT = flags.DEFINE_string('split_csv', None, 'the edema split file')
_OUT = flags.DEFINE_string('out', None, 'output folder')
_SEED = flags.DEFINE_integer('seed', 0, 'selection seed')


def _atomic_csv(frame, path):
  atomic_write(path, lambda f: frame.to_csv(f, index=False), binary=False)


def summary_table(split, sets) -> str:
  """Rows: whole cohort, non-TEST cohort, each forget set."""
  rows = [('cohort', summarize(split, split['subject_id'].unique())),
          ('non-TEST', summarize(split, split.loc[split['fold'] != 'TEST',
                                                  'subject_id'].unique()))]
  rows += [(f'forget {round(f * 100)}%', summarize(split, s)) for f, s in sets.items()]
  bins = bin_labels()
  head = (f'{"set":<11}{"images":>7}{"subj":>6}{"studies":>8}{"st/subj":>8}  '
          f'{"labels 0/1/2/3":<20}' + ''.join(f'{b:>7}' for b in bins))
  lines = [head, '-' * len(head)]
  for name, s in rows:
    labels = '/'.join(map(str, s['labels']))
    shares = ''.join(f'{100 * v:6.1f}%' for v in s['bin_shares'])
    lines.append(f'{name:<11}{s["images"]:>7}{s["subjects"]:>6}{s["studies"]:>8}'
                 f'{s["mean_studies_per_subject"]:>8.2f}  {labels:<20}{shares}')
  lines.append('columns after labels: share of subjects by studies per subject')
  return '\n'.join(lines)


def main(argv):
  del argv
  if not _SPLIT.value or not _OUT.value:
    raise app.UsageError('--split_csv and --out are required')
  import pandas as pd
  split_csv, out, seed = _SPLIT.value, _OUT.value, _SEED.value
  split = read_split_csv(split_csv)  # validates; raw rows are written back unchanged
  raw = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
  raw.columns = [c.strip() for c in raw.columns]
  sets = select_forget_subjects(split, PAPER_FRACTIONS, seed=seed)
  os.makedirs(out, exist_ok=True)
  subject = raw['subject_id'].str.strip().astype('int64')
  for f, subjects in sets.items():
    path = os.path.join(out, f'forget_{round(f * 100)}pct.csv')
    _atomic_csv(raw[subject.isin(subjects)], path)
    print(f'wrote {path}')
  print(summary_table(split, sets))


if __name__ == '__main__':
  app.run(main)
