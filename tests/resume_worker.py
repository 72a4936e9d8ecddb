"""Train the original and run Forget-MI as 2 stacked copies (seeds 0 and 1) on the tiny config;
save the final params and the epoch each stage started from (npz). Launched (and killed with
SIGKILL) by test_resume.py."""
import logging
import sys

import jax
import numpy as np

from forgetmi_jax.runs import setup
from tests.helpers import tiny_config


def main(workdir, out):
  logging.basicConfig(level=logging.INFO, stream=sys.stderr)
  logging.getLogger('forgetmi_jax').setLevel(logging.INFO)
  # every epoch checkpointed, so the test can kill the run between two of them
  config = tiny_config(workdir, **{'train.epochs': 3, 'forgetmi.epochs': 3,
                                   'checkpoint_every_s': 0.0})
  prep = setup.prepare(config)
  (original,), _ = setup.train_or_load(prep, 'original')
  result = setup.run_method(prep, original, copies=setup.copies_of(config, 'forgetmi', [0, 1]))
  flat = {'resumed_from': np.asarray(result.resumed_from)}
  trees = [('original', original['params'])]
  for i, state in enumerate(result.states):
    trees += [(f'unlearned{i}', state.params), (f'unlearned{i}_stats', state.batch_stats)]
  for name, tree in trees:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(out, **flat)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
