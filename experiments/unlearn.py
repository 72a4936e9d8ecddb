"""Unlearn a forget set: cohort -> original -> retrained -> method -> evaluation.

  python experiments/unlearn.py --config configs/forgetmi_10pct.py [--workdir DIR]
  python experiments/unlearn.py --config configs/forgetmi_10pct.py:smoke --config.forgetmi.lr=1e-5
  python experiments/unlearn.py --config configs/unlearn.py:method=scrub,pct=3
"""
import os

from absl import app

import _flags  # noqa: F401  (defines --config/--workdir, puts the repo on sys.path)
from forgetmi_jax.runs import unlearn


def main(argv):
  del argv
  _flags.setup_logging()
  payload = unlearn.run(_flags.resolved_config(), _flags.config_name())
  with open(os.path.join(payload['config']['workdir'], 'report.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=_flags.parse_flags)
