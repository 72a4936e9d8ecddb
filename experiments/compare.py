"""Compare original, retrain and every unlearning method on one forget set.

  python experiments/compare.py --config configs/compare_10pct.py [--workdir DIR]
  python experiments/compare.py --config configs/compare.py:pct=3,smoke

Writes comparison.json and comparison.md in the workdir (default runs/<config name>); the
original and retrained models come from (or go to) the shared cache.
"""
import os

from absl import app

import _flags  # noqa: F401  (defines --config/--workdir, puts the repo on sys.path)
from forgetmi_jax.runs import compare


def main(argv):
  del argv
  _flags.setup_logging()
  payload = compare.run_comparison(_flags.resolved_config(), _flags.config_name())
  with open(os.path.join(payload['config']['workdir'], 'comparison.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=_flags.parse_flags)
