"""Forget the patients of a request and write the unlearned model and an audit report.

  python experiments/forget.py --config configs/forget_request.py[:smoke] \
    --config.request.subjects_csv=request.csv [--config.request.original=PATH] [--workdir DIR]
"""
import os

from absl import app

import _flags  # noqa: F401  (defines --config/--workdir, puts the repo on sys.path)
from forgetmi_jax.runs import forget_request


def main(argv):
  del argv
  _flags.setup_logging()
  payload = forget_request.run(_flags.resolved_config(), _flags.config_name())
  with open(os.path.join(payload['workdir'], 'forget_report.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=_flags.parse_flags)
