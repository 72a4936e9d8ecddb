"""Forget-MI ablation grid: loss weights x image noise x lr x seed on one forget set.

  python experiments/ablate.py --config configs/ablation.py:pct=10 [--workdir DIR]
  python experiments/ablate.py --config configs/ablation.py:pct=10,smoke
  python experiments/ablate.py --config configs/ablation.py:pct=10 --config.ablation.mode=sequential

Every setting is a model copy on the one training loop (stacked and vmapped in the default
'vmap' mode). Writes ablation.json, ablation.md and rows/<setting_id>.json in the workdir
(default runs/<config name>); rerunning resumes (finished settings whose fingerprint matches
are skipped). The original and retrained models come from (or go to) the shared cache.
"""
import os

from absl import app

import _flags  # noqa: F401  (defines --config/--workdir, puts the repo on sys.path)
from forgetmi_jax.runs import ablation


def main(argv):
  del argv
  _flags.setup_logging()
  payload = ablation.run_ablation(_flags.resolved_config(), _flags.config_name())
  with open(os.path.join(payload['config']['workdir'], 'ablation.md')) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=_flags.parse_flags)
