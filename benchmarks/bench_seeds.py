"""N seeds: stacked copies (one program) against N sequential runs, for the retrained models and
for Forget-MI, on the loop that `--config.num_seeds=N` uses.

  python benchmarks/bench_seeds.py [--config configs/forgetmi_10pct.py] [--seeds 5]
                                   [--train_epochs 2] [--unlearn_epochs 3]
                                   [--what retrain,forgetmi] [--workdir DIR]

Both modes run the same copies (seeds 0..N-1, the config's settings, epochs cut to the flags:
per-epoch cost is what differs, so both scale the same way with the full schedule):
- stacked: `copies_per_program=0`, the N copies vmapped in one program;
- sequential: `copies_per_program=1`, one single-model program per copy (the N = 1 path).
Timed: the loop (compilation, epochs, per-epoch checkpoints) of N retrainings from scratch
(each mode in its own empty cache) and of N Forget-MI runs from one original (trained once,
outside the timings); not data preparation or evaluation. Prints a table.
"""
import argparse
import copy
import os
import time

from _config import add_run_flags, run_config

MODES = (('stacked', 0), ('sequential', 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_run_flags(parser, 'configs/forgetmi_10pct.py')
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--train_epochs', type=int, default=2)
  parser.add_argument('--unlearn_epochs', type=int, default=3)
  parser.add_argument('--what', default='retrain,forgetmi', help='retrain and/or forgetmi')
  args = parser.parse_args()
  from forgetmi_jax.runs import setup
  root, base = run_config(args, 'bench_seeds_')
  with base.unlocked():
    base.train.epochs = args.train_epochs
    base.forgetmi.epochs = args.unlearn_epochs
    base.cache_dir = os.path.join(root, 'cache-original')
  seeds = list(range(args.seeds))
  prep = setup.prepare(copy.deepcopy(base), 'bench_seeds')
  (original,), _ = setup.train_or_load(prep, 'original')
  ctx = setup.make_context(prep)  # noisy report tokens: made once, outside the timings
  rows = []
  for what in args.what.split(','):
    times = {}
    for mode, per_program in MODES:
      config = copy.deepcopy(base)
      with config.unlocked():
        config.copies_per_program = per_program
        config.cache_dir = os.path.join(root, f'cache-{mode}')
      p = setup.prepare(config, 'bench_seeds')
      t = time.perf_counter()
      if what == 'retrain':
        setup.train_or_load(p, 'retrain', seeds=seeds)
      else:
        setup.run_method(p, original, 'forgetmi', copies=setup.copies_of(config, 'forgetmi',
                                                                         seeds),
                         ckpt_root=os.path.join(root, f'ckpt-{mode}'), ctx=ctx)
      times[mode] = time.perf_counter() - t
    epochs = args.train_epochs if what == 'retrain' else args.unlearn_epochs
    for mode, _ in MODES:
      rows.append((what, len(seeds), epochs, mode, times[mode],
                   times[mode] / len(seeds) / epochs, times['sequential'] / times[mode]))
  print(f'\n{len(seeds)} seeds, {args.config}{":" + args.config_arg if args.config_arg else ""}'
        f', {os.cpu_count()} CPUs\n')
  print('| runs | copies | epochs | mode | seconds | s / copy / epoch | speed-up |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f}x |')


if __name__ == '__main__':
  main()
