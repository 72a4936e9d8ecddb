"""Re-evaluate a run's saved checkpoints without retraining.

  python experiments/evaluate.py --workdir runs/forgetmi_10pct
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from forgetmi_jax.runs import unlearn  # noqa: E402

WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run folder (holds metrics.json).',
                              required=True)


def main(argv):
  del argv
  payload = unlearn.reevaluate(WORKDIR.value)
  with open(os.path.join(payload['config']['workdir'], 'report.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main)
