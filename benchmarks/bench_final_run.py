"""Where a Forget-MI+ final run's seconds go: the run whose wall time `compare.py` sets against
retraining's (issue 14's time ratio).

  python benchmarks/bench_final_run.py [--config configs/compare_6pct.py] [--copies 3]
      [--lr 3e-4] [--push_epochs 5] [--repair_epochs 3] [--budget 0] [--cache_dir DIR]
      [--checkpoint_every_s S] [--retrain]

A final run trains a tuned schedule (`compare.final_schedule`: push and repair epochs, no
validation score) as stacked copies, seeds 0..N-1, from the cached original (trained first when
`--cache_dir` has none). The run is timed whole, as `compare.py` times it, and taken apart:
- the step programs' tracing, lowering and compilation (or its load from the persistent
  cache, `<cache_dir>/xla` as in a run): jax.monitoring's compile events, their time spans
  merged so that nested ones count once;
- the frozen original's outputs (the forget targets, once; the retain targets, at first use)
  and the repair's pushed forget logits, each with the compilation of its own programs;
- the checkpoints (every epoch's at `--checkpoint_every_s 0`; the config's default writes one
  at most every minute, and always a phase's last epoch);
- the steps: the rest.
Retraining's seconds per model come from the cached retrained models of the same seeds (their
cache entries' meta; "-" when none is cached), its examples from `train.epochs` x the retain
set. A cached retraining was timed on whatever machine and day built the cache (on two 2-core
machines the same retraining took 119 and 131 s per model), so `--retrain` also retrains the
seeds here, after the run, and prints the ratio against that. Runs in a fresh checkpoint
folder (nothing resumed) in this fresh process, so it pays what the final run of a
`compare.py` process pays. Prints a table.
"""
import argparse
import copy
import functools
import os
import tempfile
import time

from _config import add_run_flags, run_config

COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
STEPS = 'steps'


class Timeline:
  """Wall-clock windows of the wrapped calls (by part) and of jax's compile events."""

  def __init__(self, clock=time.time):  # jax's spans are time.time()'s
    self.clock = clock
    self.windows, self.compiles, self.timed = [], [], []  # timed: the loop's runs

  def on_span(self, event, start, end, **kwargs):
    del kwargs
    if event in COMPILE_EVENTS:
      self.compiles.append((start, end))

  def wrap(self, owner, attr, part=None):
    """Time owner.attr's calls as `part`; without a part, as the timed run itself (what
    the parts are taken out of: compile spans outside it are not counted)."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      start = self.clock()
      try:
        return fn(*args, **kwargs)
      finally:
        (self.windows if part else self.timed).append(
            (start, self.clock()) + ((part,) if part else ()))
    setattr(owner, attr, timed)

  def seconds(self):
    """{part: wall seconds} and {part: compile seconds in it}, over the outermost windows (a
    window inside another counts as the outer one's time); each merged compile span goes to
    the outermost window holding its midpoint, else to the steps."""
    outer = [(s, e, p) for s, e, p in self.windows
             if not any(s0 <= s and e <= e0 and (s0, e0) != (s, e) for s0, e0, _ in self.windows)]
    wall = {}
    for start, end, part in outer:
      wall[part] = wall.get(part, 0.0) + end - start
    inside = lambda t: not self.timed or any(s <= t <= e for s, e in self.timed)  # noqa: E731
    merged = []
    for start, end in sorted(c for c in self.compiles if inside((c[0] + c[1]) / 2)):
      if merged and start <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], end)
      else:
        merged.append([start, end])
    compiled = {}
    for start, end in merged:
      mid = (start + end) / 2
      part = next((p for s, e, p in outer if s <= mid <= e), STEPS)
      compiled[part] = compiled.get(part, 0.0) + end - start
    return wall, compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_run_flags(parser, 'configs/compare_6pct.py')
  parser.add_argument('--copies', type=int, default=3, help='stacked copies (seeds 0..N-1)')
  parser.add_argument('--lr', type=float, default=3e-4, help='the push lr (the rule\'s choice)')
  parser.add_argument('--push_epochs', type=int, default=5)
  parser.add_argument('--repair_epochs', type=int, default=3)
  parser.add_argument('--budget', type=float, default=0.0, help='forgetmi.budget (0 = none)')
  parser.add_argument('--cache_dir', default='', help='where the original is (or is trained)')
  parser.add_argument('--retrain', action='store_true',
                      help='then retrain the same seeds in this process (into a temporary '
                      'cache, deleted after) and divide by those seconds too')
  parser.add_argument('--checkpoint_every_s', type=float, default=None,
                      help='config.checkpoint_every_s (default: the config\'s; 0 = every epoch)')
  args = parser.parse_args()
  import jax

  from forgetmi_jax.runs import compare, setup
  from forgetmi_jax.train import loop
  from forgetmi_jax.train.checkpoints import Checkpoints
  from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
  from forgetmi_jax.unlearning.repair import RepairMethod

  root, config = run_config(args, 'bench_final_run_')
  with config.unlocked():
    config.cache_dir = args.cache_dir or os.path.join(root, 'cache')
    config.forgetmi.budget = float(args.budget)
    if args.checkpoint_every_s is not None:
      config.checkpoint_every_s = float(args.checkpoint_every_s)
  config = compare.with_schedule(compare.with_lr(config, 'forgetmi', args.lr), 'forgetmi',
                                 {'epochs': args.push_epochs,
                                  'repair_epochs': args.repair_epochs})
  prep = setup.prepare(config, 'bench_final_run')
  (original,), _ = setup.train_or_load(prep, 'original')
  seeds = list(range(args.copies))
  try:
    _, retrain_seconds = setup.train_or_load(prep, 'retrain', seeds=seeds,
                                             allow_training=False)
    retrain = sum(retrain_seconds) / len(retrain_seconds)
  except FileNotFoundError:
    retrain = None

  timeline = Timeline()
  jax.monitoring.register_event_time_span_listener(timeline.on_span)
  timeline.wrap(ForgetMIMethod, '_forget_targets', 'original\'s forget targets')
  timeline.wrap(ForgetMIMethod, '_retain_targets', 'original\'s retain targets')
  timeline.wrap(RepairMethod, 'pushed_logits', 'repair: pushed forget logits')
  timeline.wrap(Checkpoints, 'save', 'checkpoints')
  timeline.wrap(loop, 'run')
  copies = setup.copies_of(config, 'forgetmi', seeds)
  result = setup.run_method(prep, original, 'forgetmi', copies=copies,
                            ckpt_root=os.path.join(root, 'ckpt'))
  total = result.seconds
  wall, compiled = timeline.seconds()
  rows = [(part, wall[part], compiled.get(part, 0.0)) for part in sorted(wall)]
  step_programs = compiled.get(STEPS, 0.0)
  steps = total - sum(wall.values()) - step_programs
  n = args.copies
  examples = result.spent / setup.retrain_examples(prep)

  print(f'\n{args.config}{":" + args.config_arg if args.config_arg else ""}: {n} copies, lr '
        f'{args.lr:g}, push {args.push_epochs} + repair {args.repair_epochs} epochs'
        f'{f", budget {args.budget:g}" if args.budget else ""}, checkpoints at most every '
        f'{config.checkpoint_every_s:g} s; '
        f'{len(prep.split.forget_idx)} forget images, {os.cpu_count()} CPUs, '
        f'{jax.default_backend()}\n')
  print('| part | seconds (all copies) | share | of which compile (trace, lower, XLA or cache) |')
  print('| :--- | ---: | ---: | ---: |')
  for part, seconds, comp in rows + [('step programs: trace, lower, compile', step_programs,
                                      step_programs),
                                     ('steps (the rest)', steps, 0.0)]:
    print(f'| {part} | {seconds:.2f} | {seconds / total:.0%} | {comp:.2f} |')
  print(f'| **the run** | **{total:.2f}** | 100% | {sum(compiled.values()):.2f} |')
  ratio = f'{total / n / retrain:.3f}' if retrain else '-'
  print(f'\nper model: {total / n:.2f} s; retraining {f"{retrain:.1f}" if retrain else "-"} s '
        f'per model (cached seeds {seeds}); time ratio {ratio}; trained examples per copy '
        f'{result.spent:,.0f} = {examples:.3f} of retraining\'s '
        f'{setup.retrain_examples(prep):,}')
  if args.retrain:  # the denominator timed now, on this machine, beside the run
    with tempfile.TemporaryDirectory(prefix='bench_final_run_retrain_') as tmp:
      fresh = copy.deepcopy(config)
      with fresh.unlocked():
        fresh.cache_dir = tmp
      _, seconds = setup.train_or_load(setup.prepare(fresh, 'bench_final_run'), 'retrain',
                                       seeds=seeds)
    now = sum(seconds) / len(seconds)
    print(f'retrained now in this process: {now:.1f} s per model ({n} stacked); time ratio '
          f'{total / n / now:.3f}')


if __name__ == '__main__':
  main()
