"""Unlearn a forget set: cohort -> original -> retrained -> method -> evaluation.

  python experiments/unlearn.py --config configs/forgetmi_10pct.py [--workdir DIR]
  python experiments/unlearn.py --config configs/forgetmi_10pct.py:smoke --config.unlearn.lr=1e-5
"""
import os

from absl import app

import _flags  # noqa: F401  (defines --config/--workdir, puts the repo on sys.path)
from forgetmi_jax import pipeline


def main(argv):
  del argv
  _flags.setup_logging()
  payload = pipeline.run(_flags.resolved_config(), _flags.config_name())
  with open(os.path.join(payload['config']['workdir'], 'report.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main)
