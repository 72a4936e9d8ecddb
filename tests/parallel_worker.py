"""Run a few training and Forget-MI steps on a 1-device and a 2-device mesh; print the max
parameter difference as JSON. Launched by test_parallel.py with 2 forced host devices."""
import json
import sys
import tempfile

import jax
import numpy as np

from tests.helpers import tiny_config


def main():
  from forgetmi_jax import pipeline
  from forgetmi_jax.data.pipeline import batches
  from forgetmi_jax.train import parallel
  from forgetmi_jax.train.trainer import create_train_state, make_train_step
  from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
  assert jax.device_count() == 2, jax.devices()
  prep = pipeline.prepare(tiny_config(tempfile.mkdtemp(), **{'unlearn.batch_size': 8}))
  v = prep.init_variables
  results = {}
  for n in (1, 2):
    mesh = parallel.make_mesh(n)
    state = parallel.replicate(create_train_state(v['params'], v['batch_stats'],
                                                  prep.config.train, 10, 0), mesh)
    step = make_train_step(prep.model.apply, 1.0)
    idx = prep.split.retain_idx
    for i, batch in enumerate(batches(prep.source, idx, 16, seed=0, epoch=0)):
      if i == 3:
        break
      state, _ = step(state, parallel.shard_batch(batch, mesh))
    original = jax.device_get(state)
    ctx = pipeline.make_context(prep)
    ctx.mesh = mesh
    method = ForgetMIMethod(ctx, prep.config.unlearn)
    ustate = parallel.replicate(method.init_state(original), mesh)
    orig = parallel.replicate(original, mesh)
    method.prepare(orig)
    hp = method.start_epoch(0, method.hparams(), orig)
    for i, batch in enumerate(method.epoch_batches(0)):
      if i == 3:
        break
      batch = method.prepare_batch(batch, 0)
      ustate, m = method.step(ustate, orig, parallel.shard_batch(batch, mesh),
                              method.step_rng(0, i), hp)
    results[n] = (jax.device_get(original), jax.device_get(ustate), float(m['loss']))
  def maxdiff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  (o1, u1, l1), (o2, u2, l2) = results[1], results[2]
  print(json.dumps({'train_params': maxdiff(o1.params, o2.params),
                    'train_stats': maxdiff(o1.batch_stats, o2.batch_stats),
                    'unlearn_params': maxdiff(u1.params, u2.params),
                    'unlearn_stats': maxdiff(u1.batch_stats, u2.batch_stats),
                    'loss_1': l1, 'loss_2': l2}))


if __name__ == '__main__':
  sys.exit(main())
