"""Remove forgotten patients' data and the cached models that saw them from a cache folder.

  python experiments/purge.py --subjects_csv request.csv --cache_dir runs/cache [--dry_run]
"""
from absl import app, flags

import _flags  # noqa: F401  (puts the repo on sys.path)
from forgetmi_jax.runs import purge

SUBJECTS = flags.DEFINE_string('subjects_csv', None, 'CSV with a subject_id column.',
                               required=True)
CACHE = flags.DEFINE_string('cache_dir', None, 'The cache folder (runs/cache by default).',
                            required=True)
DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Only say what would be removed.')


def main(argv):
  del argv
  _flags.setup_logging()
  print(purge.purge_cache(CACHE.value, purge.read_subjects(SUBJECTS.value), DRY_RUN.value))


if __name__ == '__main__':
  app.run(main)
