"""Where Forget-MI+'s seconds go: unlearning epochs against the stopping rule's scoring.

  python benchmarks/bench_monitor.py [--config configs/forgetmi_6pct.py] [--epochs 4]
                                     [--copies 1] [--cache_dir DIR] [--workdir DIR]

The time ratio to retraining (issue 14's goal: <= 0.10) is the unlearning run's wall time, and
the validation rule scores every copy after every epoch. This times, on the config's data and
model and the cached original (trained first when `--cache_dir` has none):
- the loop with `stop.rule=none` for 1 and for `--epochs` epochs (compilation, steps,
  checkpoints): their difference gives a later epoch's cost, the rest of the 1-epoch run is
  the run's fixed cost (method setup, compilation, the original's cached outputs);
- the same loop scored after every epoch and once before the first (`stop.patience` above the
  epochs, `stop.at_chance` off, so every epoch runs and is scored): the difference is the
  rule's cost, `epochs + 1` scores per copy;
- one score taken apart: the eval-mode forwards of each scored set, and the SVC attack's fit.
An untimed 1-epoch run comes first, so the process's one-off costs (backend start, first
imports) fall on none of them. Prints a table; each loop runs in its own empty checkpoint
folder (nothing is resumed).
"""
import argparse
import copy
import dataclasses
import os
import time

from _config import add_run_flags, run_config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_run_flags(parser, 'configs/forgetmi_6pct.py')
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--copies', type=int, default=1, help='stacked copies (seeds 0..N-1)')
  parser.add_argument('--cache_dir', default='', help='where the original is (or is trained)')
  args = parser.parse_args()
  from forgetmi_jax.evaluation.evaluator import predict_logits
  from forgetmi_jax.evaluation.metrics import per_sample_ce
  from forgetmi_jax.evaluation.mia import svc_mia
  from forgetmi_jax.runs import setup

  root, config = run_config(args, 'bench_monitor_')
  with config.unlocked():
    config.forgetmi.epochs = args.epochs
    config.cache_dir = args.cache_dir or os.path.join(root, 'cache')
  prep = setup.prepare(config, 'bench_monitor')
  (original,), _ = setup.train_or_load(prep, 'original')
  ctx = setup.make_context(prep)  # noisy report tokens: made once, outside the timings
  copies = setup.copies_of(config, 'forgetmi', list(range(args.copies)))

  def timed_run(tag, stopping, epochs=args.epochs):
    run_copies = [dataclasses.replace(c, cfg=copy.deepcopy(c.cfg)) for c in copies]
    for c in run_copies:
      with c.cfg.unlocked():
        c.cfg.epochs = epochs
    t = time.perf_counter()
    setup.run_method(prep, original, 'forgetmi', copies=run_copies, ctx=ctx,
                     stopping=stopping, ckpt_root=os.path.join(root, f'ckpt-{tag}'))
    return time.perf_counter() - t

  scored = copy.deepcopy(config)
  with scored.unlocked():
    scored.stop.patience = args.epochs + 1
    scored.stop.at_chance = False
  scored_prep = dataclasses.replace(prep, config=scored)
  timed_run('warmup', None, epochs=1)  # the process's one-off costs, outside every timing
  t_one = timed_run('one', None, epochs=1)
  t_plain = timed_run('plain', None)
  t_scored = timed_run('scored', setup.stopping_rule(scored_prep, original, 'forgetmi'))

  monitor = setup.validation_monitor(prep, original)
  monitor(original)  # compiled once, as in the loop
  parts = []
  losses = {}
  for name, idx in monitor.sets.items():
    t = time.perf_counter()
    logits = predict_logits(monitor.predict, original, monitor.source, idx, monitor.batch_size)
    parts.append((f'forwards: {name}', time.perf_counter() - t, len(idx)))
    losses[name] = per_sample_ce(logits, monitor.labels[idx])
  if 'retain' in losses:
    t = time.perf_counter()
    svc_mia(losses['retain'], losses['val'], losses['forget'],
            retain_weight=monitor.retain_weight)
    parts.append(('SVC attack fit + predict', time.perf_counter() - t,
                  len(losses['retain']) + len(losses['val'])))
  t = time.perf_counter()
  monitor(original)
  t_score = time.perf_counter() - t

  n, e = args.copies, args.epochs
  print(f'\n{args.config}{":" + args.config_arg if args.config_arg else ""}, {n} copies, '
        f'{e} epochs, {len(prep.split.forget_idx)} forget images, {os.cpu_count()} CPUs\n')
  print('| what | seconds | per copy | note |')
  print('|---|---|---|---|')
  per_epoch = (t_plain - t_one) / max(e - 1, 1)
  print(f'| loop, stop.rule=none, 1 epoch | {t_one:.1f} | {t_one / n:.1f} | compile included |')
  print(f'| loop, stop.rule=none | {t_plain:.1f} | {t_plain / n:.1f} | {e} epochs, compile '
        'included |')
  print(f'| - a later epoch | {per_epoch:.1f} | {per_epoch / n:.2f} | steps and checkpoint |')
  print(f'| - fixed cost | {t_one - per_epoch:.1f} | {(t_one - per_epoch) / n:.1f} | setup, '
        'compilation, the original\'s outputs |')
  print(f'| loop, scored every epoch | {t_scored:.1f} | {t_scored / n:.1f} | {e + 1} scores '
        'per copy |')
  rule = t_scored - t_plain
  print(f'| the rule\'s share | {rule:.1f} | {rule / n:.1f} | {rule / max(t_scored, 1e-9):.0%}'
        f' of the scored loop; {rule / n / (e + 1):.2f} s per score |')
  print(f'| one score (warm) | {t_score:.2f} | | |')
  for name, seconds, count in parts:
    print(f'| - {name} | {seconds:.2f} | | {count} images |')


if __name__ == '__main__':
  main()
