"""What stacking N copies' train states costs at the start of a run (train/loop.stack): a
jnp.stack per leaf (one small compiled program per leaf shape, paid once per process) against
numpy stacking on the host and one device_put. Each variant runs in a fresh process, so its
first call pays what a run's first stack pays.

  python benchmarks/bench_loop.py [--copies 3] [--repeats 3]

Columns: seconds of the first call in a fresh process, the median of later calls, and the
number of leaves (the default model's TrainState with AdamW).
"""
import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _measure(kind, copies, repeats, queue):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.bench_trunk import default_model
  from forgetmi_jax.train import loop, optim
  from forgetmi_jax.train.state import TrainState

  _, variables, _, _ = default_model()
  tx = optim.adamw(1e-3)  # one optimiser object for all copies, as the loop's methods share
  states = [TrainState.create(variables, tx) for _ in range(copies)]
  jax.block_until_ready(states)
  fn = loop.stack if kind == 'host (loop.stack)' else (
      lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees))
  times = []
  for _ in range(1 + repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(states))
    times.append(time.perf_counter() - t)
  queue.put((kind, times[0], float(np.median(times[1:])),
             len(jax.tree_util.tree_leaves(states[0]))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--copies', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  ctx = mp.get_context('spawn')
  rows = []
  for kind in ('jnp.stack per leaf', 'host (loop.stack)'):
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, args.copies, args.repeats, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
      raise SystemExit(f'{kind}: the measuring process failed (exit code {proc.exitcode})')
    rows.append(queue.get())
  print(f'| stack ({args.copies} copies) | first call s | later calls s (median) | leaves |')
  print('| :--- | ---: | ---: | ---: |')
  for kind, first, later, leaves in rows:
    print(f'| {kind} | {first:.3f} | {later:.3f} | {leaves} |')


if __name__ == '__main__':
  main()
