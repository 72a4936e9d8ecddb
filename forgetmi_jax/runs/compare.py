"""The comparison runner behind experiments/compare.py: original, retrain and every unlearning
method on the same forget set, with the paper's Table 1 beside the results.

Outputs in the workdir: comparison.json (the `models` mapping of metrics.json, keyed original,
retrain and the methods; plus the lr selection, the paper's numbers and the method orderings)
and comparison.md.

One tuning rule for every method (`config.compare`), none of it reading the test set or a
retrained model (`select_settings` is never given either; a test checks that shuffling the
test labels and removing the retrained models changes no choice):
- each method runs once per learning rate in `lr_factors` x its preset lr (the same number of
  trials for all), as stacked copies on the first `tune_seeds` seeds (0, the default: every
  seed, a trial's gap then its mean over them; 1: seed `config.seed` only), with the shared
  stopping rule (`config.stop`: each copy ends at its epoch of lowest validation gap);
- the selected lr has the lowest validation gap (evaluation/validation.py: forget patients
  against validation non-members held out of the original's training); trials within
  `gap_tolerance` of the lowest (the gap's sampling noise) count as equal and the one that
  ran the fewest epochs wins;
- the final runs use that lr on every seed; their time is the method's `seconds` (tuning time
  is reported apart). With `compare.final_schedule` (the default) they train the epochs the
  selected trial stopped at (`fixed_schedule`: the median over its seeds, push and repair) and
  score nothing: the rule has already chosen when to stop, so the unlearning run pays neither
  the validation scores nor the patience epochs after the best one. Without it they are
  stopped by the rule again. A method with `fixed_schedule` in its config (the paper's
  Forget-MI) runs as given. `compare.tune = False` runs every preset lr.
"""
import copy
import dataclasses
import logging
import math
import os
import time

import numpy as np


from forgetmi_jax import config as config_lib
from forgetmi_jax.config import method_config
from forgetmi_jax.evaluation import report
from forgetmi_jax.evaluation.report import EQUAL_TIME_SUFFIX as EQUAL_TIME
from forgetmi_jax.evaluation.evaluate import evaluate_runs
from forgetmi_jax.evaluation.gaps import retrain_gaps
from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.runs import setup
from forgetmi_jax.unlearning import registry

log = logging.getLogger('forgetmi_jax')

CRITERION = ('lowest validation gap (forget vs validation non-members, at each trial\'s '
             'stopping epoch); among trials within compare.gap_tolerance of it, the one that '
             'ran the fewest epochs')


# ------------------------------------------------------------------------------ tuning pieces
def lr_grid(lr, factors):
  """The learning rates tried for a method: its preset lr times each factor (sorted, unique)."""
  grid = sorted({float(lr) * float(f) for f in factors})
  if not grid or any(not (g > 0 and math.isfinite(g)) for g in grid):
    raise ValueError(f'lr grid must hold positive numbers, got {grid}')
  return grid


def select(records, tolerance=0.0):
  """The cheapest record (fewest epochs run, then the lower lr: grids are sorted by lr) among
  those whose validation gap is within `tolerance` of the lowest finite one; a diverged trial
  (None / inf / nan) is never selected unless all diverged. Trials closer than the gap's
  sampling noise are equally good, so the rule then takes the one that unlearns fastest."""
  def gap(r):
    g = r['val_gap']
    return g if g is not None and math.isfinite(g) else math.inf
  best = min(gap(r) for r in records)
  if not math.isfinite(best):
    return records[0]
  near = [r for r in records if gap(r) <= best + float(tolerance)]
  return min(near, key=lambda r: r.get('epochs_run') if r.get('epochs_run') is not None
             else math.inf)


def with_lr(config, name, lr):
  """A copy of the config with the method's learning rate set."""
  config = copy.deepcopy(config)
  with config.unlocked():
    method_config(config, name).lr = float(lr)
  return config


def tunable(config, name):
  return not method_config(config, name).get('fixed_schedule', False)


def run_or_reuse(prep, original, name, tag, seeds=None, copies=None, time_budget_s=None):
  """Run method `name` once per seed as stacked copies (or reload a finished run of the same
  fingerprint, which reports the run's own seconds); (variables per copy, seconds per copy:
  each copy's share of the program's time, histories per copy, stopping records per copy).
  `time_budget_s`: seconds per copy (an equal-wall-time run)."""
  copies = copies or setup.copies_of(prep.config, name, seeds)
  extra = {} if time_budget_s is None else {'time_budget_s': float(time_budget_s)}
  result = setup.run_method(prep, original, name, copies=copies,
                            ckpt_root=os.path.join(prep.workdir, 'checkpoints', tag), **extra)
  share = result.seconds / len(copies)
  stops = result.stopping or [None] * len(copies)
  return ([s.variables for s in result.states], [share] * len(copies), result.histories, stops)


def tuning_seeds(config):
  """The seeds the lr trials run on: the first `compare.tune_seeds` of the run's (0 = all)."""
  seeds = config_lib.seeds(config)
  k = config.compare.get('tune_seeds', 0)
  if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(seeds):
    raise ValueError(f'compare.tune_seeds must be an int in 0..num_seeds ({len(seeds)}), '
                     f'got {k!r}')
  return seeds[:k] if k else seeds


# The validation scores a tuning record keeps beside its gap (evaluation/validation.py).
TRIAL_SCORES = ('member_auc', 'svc_forget', 'retain_acc', 'forget_f1', 'forget_auc', 'val_f1',
                'val_auc')


def trial_record(prep, original, name, variables, stop, monitor=None):
  """One trial copy's validation scores at its stopping epoch ({key: value}, monitor)."""
  if stop is None:  # stop.rule = none: score where the schedule ended
    monitor = monitor or setup.validation_monitor(prep, original)
    scores, epoch = monitor(variables), None
    epochs_run = int(method_config(prep.config, name).epochs)
  else:
    scores = setup.best_scores(stop)
    epoch, epochs_run = stop['best_epoch'], setup.epochs_run(stop)
  record = {'val_gap': _finite(scores.get('val_gap')), 'stop_epoch': epoch,
            'repair_epoch': None if stop is None else stop.get('repair_epoch'),
            'epochs_run': epochs_run,
            **{k: _finite(scores.get(k)) for k in TRIAL_SCORES}}
  return record, monitor


def mean_record(per_seed):
  """A trial's record over its seeds: the mean of each score (None if any seed's is: a
  diverged seed makes the trial diverged), epochs and stopping epochs as lists."""
  if len(per_seed) == 1:
    return dict(per_seed[0])
  out = {}
  for key in ('val_gap', 'epochs_run') + TRIAL_SCORES:
    values = [r[key] for r in per_seed]
    out[key] = None if any(v is None for v in values) else float(np.mean(values))
  out['stop_epoch'] = [r['stop_epoch'] for r in per_seed]
  out['repair_epoch'] = [r.get('repair_epoch') for r in per_seed]
  out['val_gaps'] = [r['val_gap'] for r in per_seed]
  return out


def tune(prep, original, name, cc, time_budget_s=None):
  """The lr grid as stacked copies on the tuning seeds (`tuning_seeds`); a trial's validation
  gap is its mean over them. Returns the selection record."""
  preset = float(method_config(prep.config, name).lr)
  grid = lr_grid(preset, cc.lr_factors)
  if cc.get('final_schedule', False) and float(method_config(prep.config, name).get('budget', 0)):
    # the final runs will not score: an example budget then caps what they will train
    config = copy.deepcopy(prep.config)
    with config.unlocked():
      config.stop.scores_in_budget = False
    prep = dataclasses.replace(prep, config=config)
  seeds = tuning_seeds(prep.config)
  group = method_config(prep.config, name)
  cfgs = []
  for lr in grid:
    cfg = copy.deepcopy(group)
    with cfg.unlocked():
      cfg.lr = float(lr)
    cfgs.extend([cfg] * len(seeds))
  copies = setup.copies_of(prep.config, name, seeds * len(grid), cfgs)
  variables, seconds, _, stops = run_or_reuse(prep, original, name, 'tune', copies=copies,
                                              time_budget_s=time_budget_s)
  monitor = None
  records = []
  for i, lr in enumerate(grid):
    per_seed = []
    for j in range(i * len(seeds), (i + 1) * len(seeds)):
      record, monitor = trial_record(prep, original, name, variables[j], stops[j], monitor)
      per_seed.append(record)
    records.append({'lr': lr, **mean_record(per_seed),
                    'seconds': float(sum(seconds[i * len(seeds):(i + 1) * len(seeds)]))})
    log.info('tune %s lr=%g: validation gap %s (over seeds %s) at epoch %s', name, lr,
             records[-1]['val_gap'], seeds, records[-1]['stop_epoch'])
  best = select(records, cc.gap_tolerance)
  return {'preset_lr': preset, 'selected_lr': best['lr'], 'records': records,
          'schedule': fixed_schedule(best),
          'seeds': seeds, 'validation_images': int(len(prep.split.val_idx)),
          'seconds': float(sum(r['seconds'] for r in records))}


def fixed_schedule(record):
  """{'epochs', 'repair_epochs'} a final run trains without the stopping rule
  (`compare.final_schedule`): the selected trial's stopping epochs, the median over its seeds
  rounded up, plus one (epochs count from 0; -1, the start never improved on, trains none).
  None when the trial ran without the rule."""
  def count(epochs):  # one seed's epoch, or a list over seeds
    epochs = [e for e in (epochs if isinstance(epochs, list) else [epochs]) if e is not None]
    return math.ceil(float(np.median(epochs))) + 1 if epochs else None
  push = count(record.get('stop_epoch'))
  if push is None:
    return None
  return {'epochs': max(push, 0), 'repair_epochs': max(count(record.get('repair_epoch')) or 0, 0)}


def with_schedule(config, name, schedule):
  """A copy of the config where method `name` trains `schedule`'s epochs, no stopping rule."""
  config = copy.deepcopy(config)
  with config.unlocked():
    group = method_config(config, name)
    group.fixed_schedule = True
    group.epochs = int(schedule['epochs'])
    if 'repair' in group:
      group.repair.epochs = int(schedule['repair_epochs'])
  return config


def _finite(x):
  return float(x) if x is not None and math.isfinite(float(x)) else None


def select_settings(prep, original, methods, cc, time_budget_s=None):
  """{method: lr} and {method: tuning record}: the one rule, given only the original, the
  forget, retain and validation sets (never the test set or a retrained model)."""
  lrs, tuning = {}, {}
  for name in methods:
    lr = float(method_config(prep.config, name).lr)
    if cc.tune and tunable(prep.config, name):
      tuning[name] = tune(prep, original, name, cc, time_budget_s)
      lr = tuning[name]['selected_lr']
    lrs[name] = lr
  return lrs, tuning


def base_name(key):
  return key[:-len(EQUAL_TIME)] if key.endswith(EQUAL_TIME) else key


# ------------------------------------------------------------------------------ the comparison
def run_comparison(config, config_name='compare'):
  """The whole comparison; returns the comparison.json payload."""
  t_start = time.time()
  prep = setup.prepare(config, config_name)
  cc = config.compare
  methods = tuple(cc.methods)
  unknown = sorted(set(methods) - set(registry.names()))
  if unknown:
    raise ValueError(f'compare.methods has unknown names {unknown} (known: {registry.names()})')
  seeds = config_lib.seeds(config)
  tune_seeds = tuning_seeds(config)  # a bad compare.tune_seeds fails before any training
  (original,), t_orig = setup.train_or_load(prep, 'original')
  retrains, t_retrain = setup.train_or_load(prep, 'retrain', seeds=seeds)
  states, seconds = {'original': [original], 'retrain': retrains}, {'original': t_orig,
                                                                    'retrain': t_retrain}
  at_reference = [m for m in methods
                  if cc.reference_budget or m in config_lib.FORGETMI_GROUPS]
  lrs, tuning = select_settings(prep, original, at_reference, cc)
  histories, walls, stops = {}, {}, {}

  def final(key, budget=None):
    name = base_name(key)
    config = with_lr(prep.config, name, lrs[key])
    schedule = (tuning.get(key) or {}).get('schedule')
    if cc.get('final_schedule', False) and schedule is not None:
      config = with_schedule(config, name, schedule)
    p = dataclasses.replace(prep, config=config)
    states[key], seconds[key], hist, stop = run_or_reuse(
        p, original, name, 'final' if budget is None else 'final_eqtime', seeds,
        time_budget_s=budget)
    histories[key] = hist[0]
    stops[key] = [setup.stop_summary(s) for s in stop]
    walls[key] = float(sum(seconds[key]))
    log.info('%s done: lr %g, %.1fs for %d seed(s)', key, lrs[key], walls[key], len(seeds))
  for name in at_reference:
    final(name)
  budget = None
  if cc.equal_time and 'forgetmi' in methods:  # the baselines again, in Forget-MI+'s time
    budget = float(np.mean(seconds['forgetmi']))
    baselines = [m for m in methods if m not in config_lib.FORGETMI_GROUPS]
    eq_lrs, eq_tuning = select_settings(prep, original, baselines, cc, time_budget_s=budget)
    for name in baselines:
      lrs[name + EQUAL_TIME] = eq_lrs[name]
      if name in eq_tuning:
        tuning[name + EQUAL_TIME] = eq_tuning[name]
      final(name + EQUAL_TIME, budget)
  methods = tuple(at_reference) + tuple(k for k in states if k.endswith(EQUAL_TIME))
  results, _, _, summary, per_example = evaluate_runs(
      prep.model, prep.source, prep.split, states, seconds, config.eval, prep.cohort.subject_id)
  names = [k for k in ('original', 'retrain') + methods if k in states]
  models = {k: results[k] for k in names}  # seed 0: the single-seed table, unchanged
  setup.log_eval_metrics(prep, models)
  for name in methods:
    models[name]['lr'] = lrs[name]
    if name in tuning:
      models[name]['tuning_seconds'] = tuning[name]['seconds']
  walls['retrain'] = float(sum(t_retrain))
  payload = {
      'forget_fraction': prep.forget_fraction,
      'seeds': len(seeds),
      'models': models,
      'summary': {k: summary[k] for k in names},
      'tuning': {'enabled': bool(cc.tune), 'criterion': CRITERION,
                 'lr_factors': [float(f) for f in cc.lr_factors],
                 'seeds': tune_seeds,
                 'val_fraction': float(config.data.val_fraction), 'methods': tuning},
      'stopping': {'rule': config.stop.to_dict(), 'methods': stops},
      'equal_time': {'enabled': budget is not None, 'seconds_per_copy': budget},
      'history': histories,
      'wall_seconds': {'total': time.time() - t_start,
                       **{f'{k}_all_seeds': v for k, v in walls.items()}},
      'timing': setup.run_timing(prep, seeds),
  }
  paper_f = report.nearest_paper_fraction(payload['forget_fraction'])
  payload['paper'] = {'fraction': paper_f, 'models': report.PAPER_TABLE1[paper_f]}
  if len(seeds) > 1:  # rank by the means over seeds (and the mean of each seed's avg. gap)
    means = {k: {m: v['mean'] for m, v in summary[k].items() if isinstance(v, dict)}
             for k in names}
    payload['ordering'] = orderings(means, payload['paper']['models'], methods,
                                    avg_gaps={k: means[k]['avg_gap'] for k in names})
  else:
    payload['ordering'] = orderings(payload['models'], payload['paper']['models'], methods)
  payload['config'] = config.to_dict()
  write_outputs(prep.workdir, payload)
  report.write_seed_outputs(prep.workdir, per_example)
  return payload


def orderings(ours, paper, methods, avg_gaps=None):
  """Methods ranked by avg. gap to retrain, and who forgets most (lowest MIA, lowest forget
  F1; every method tied at the minimum is listed), here and in the paper. `avg_gaps` gives
  ours directly (over seeds: the mean of each seed's gap, not the gap of the means)."""
  def lowest(models, names, key):
    values = {m: models[m].get(key) for m in names if models[m].get(key) is not None}
    if not values:
      return []
    best = min(values.values())
    return [m for m in names if m in values and values[m] <= best + 1e-12]

  def summary(models, names, given=None):
    if 'retrain' not in models:
      return {}
    gap = {m: (given[m] if given else retrain_gaps(models[m], models['retrain'])['avg_gap'])
           for m in names}
    return {'by_avg_gap': sorted(names, key=lambda m: gap[m] if gap[m] is not None else math.inf),
            'lowest_mia': lowest(models, names, 'mia'),
            'lowest_forget_f1': lowest(models, names, 'forget_f1')}
  paper_methods = [m for m in paper if m not in ('original', 'retrain')]  # its own rows
  return {'ours': summary(ours, [m for m in methods if m in ours], avg_gaps),
          'paper': summary(paper, paper_methods)}


def build_markdown(payload):
  """The run report (results, paper Table 1, extras, config), then lr selection and ordering."""
  models = {}
  for name, m in payload['models'].items():
    m = dict(m)
    if isinstance(m.get('lr'), float):
      m['lr'] = f"{m['lr']:.3g}"  # the report's 3 decimals would print 1e-4 as 0.000
    models[name] = m
  # The configuration stays in comparison.json; the markdown ends with the comparison itself.
  summary = {'forget_fraction': payload['forget_fraction'], 'models': models,
             'wall_seconds': payload.get('wall_seconds', {}),
             'timing': payload.get('timing'),
             'seeds': payload.get('seeds', 1), 'summary': payload.get('summary')}
  parts = [report.build_report(summary, title='Unlearning comparison')]
  tuning = payload.get('tuning') or {}
  parts.append('## Learning-rate selection')
  if tuning.get('enabled'):
    parts.append(f"Rule: {tuning['criterion']}. Grid = preset lr x {tuning['lr_factors']}, "
                 f"every method, as stacked copies on seed(s) {tuning.get('seeds', [0])} (a "
                 "trial's validation gap: its mean over them); validation non-members: "
                 f"~{100 * tuning['val_fraction']:.0f} % of all images, held out of the "
                 'original and retrained models. The final runs use the selected lr on every '
                 'seed. No choice reads the test set or a retrained model.')
    rows = []
    for name, t in tuning['methods'].items():
      for r in t['records']:
        rows.append([report.display_name(name), f"{r['lr']:.3g}", r['val_gap'],
                     r['stop_epoch'] if r['stop_epoch'] is not None else report.MISSING,
                     r.get('epochs_run', report.MISSING), r['member_auc'],
                     r.get('svc_forget'), r.get('retain_acc'), r['forget_f1'],
                     r['val_f1'], 'yes' if r['lr'] == t['selected_lr'] else '',
                     f"{r['seconds']:.1f}"])
    parts.append(report.markdown_table(
        ['Method', 'lr', 'Val. gap', 'Best epoch', 'Epochs run', 'Member AUC', 'SVC forget',
         'Retain acc.', 'Forget F1', 'Val. F1', 'Selected', 'Seconds'], rows,
        align=['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'l', 'r']))
  else:
    parts.append('Tuning off (`compare.tune = False`): every method ran at its preset lr.')
  stopping = payload.get('stopping') or {}
  if stopping.get('methods'):
    rows = []
    for name, per_seed in stopping['methods'].items():
      epochs = [f"{s['best_epoch']} + repair {s['repair_epoch']}" if 'repair_epoch' in s
                else s['best_epoch'] for s in per_seed if s is not None]
      rows.append([report.display_name(name),
                   ', '.join(str(e) for e in epochs) if epochs
                   else schedule_text((tuning.get('methods') or {}).get(name, {}).get('schedule'))])
    parts.append('Stopping epoch per seed (-1 = the start was never improved on; '
                 '"+ repair k": Forget-MI+\'s repair phase ended at its epoch k; "tuned '
                 'schedule": the final runs trained the selected trial\'s epochs unscored, '
                 '`compare.final_schedule`):')
    parts.append(report.markdown_table(['Method', 'Epoch per seed'], rows, align=['l', 'l']))
  order = payload.get('ordering') or {}
  if order.get('ours'):
    parts.append('## Ordering (methods only)')
    sep = {'by_avg_gap': ' < ', 'lowest_mia': ' = ', 'lowest_forget_f1': ' = '}
    rows = []
    for what, joiner in sep.items():
      cell = lambda v, name: joiner.join(map(name, v)) or report.MISSING  # noqa: E731
      rows.append([what.replace('_', ' '), cell(order['ours'].get(what, []), report.display_name),
                   cell(order['paper'].get(what, []), report.paper_display_name)])
    parts.append(report.markdown_table(['', 'This run', 'Paper'], rows, align=['l', 'l', 'l']))
  return '\n\n'.join(p.strip('\n') for p in parts) + '\n'


def schedule_text(schedule):
  """How a final run without the stopping rule was scheduled, for the report."""
  if not schedule:
    return 'fixed schedule'
  n = int(schedule['epochs'])
  repair = f" + repair {schedule['repair_epochs']}" if schedule.get('repair_epochs') else ''
  return f"tuned schedule: {n} epoch{'' if n == 1 else 's'}{repair}"


def write_outputs(workdir, payload):
  report.write_json_atomic(payload, os.path.join(workdir, 'comparison.json'))
  markdown = build_markdown(payload)
  atomic_write(os.path.join(workdir, 'comparison.md'), lambda f: f.write(markdown), binary=False)
