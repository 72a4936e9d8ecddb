"""Train the original and run Forget-MI on the tiny config; save the final params (npz).
Launched (and killed with SIGKILL) by test_resume.py."""
import sys

import jax
import numpy as np

from tests.helpers import tiny_config


def main(workdir, out):
  from forgetmi_jax import pipeline
  config = tiny_config(workdir, **{'train.epochs': 3, 'unlearn.epochs': 3})
  prep = pipeline.prepare(config)
  split = prep.split
  non_test = np.sort(np.concatenate([split.forget_idx, split.retain_idx]))
  original, _ = pipeline.train_or_load(prep, 'original', non_test)
  unlearned, _, _ = pipeline.run_method(prep, original)
  flat = {}
  for name, tree in (('original', original.params), ('unlearned', unlearned.params),
                     ('unlearned_stats', unlearned.batch_stats)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(out, **flat)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
