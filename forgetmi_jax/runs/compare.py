"""The comparison runner behind experiments/compare.py: original, retrain and every unlearning
method on the same forget set, with the paper's Table 1 beside the results.

Outputs in the workdir: comparison.json (the `models` mapping of metrics.json, keyed original,
retrain, forgetmi, neggrad_plus, scrub, cf_k, eu_k, multidelete; plus the lr selection, the
paper's numbers and the method orderings) and comparison.md.

Tuning budget (the same for every method, Forget-MI included), `config.compare`:
- a validation set of whole retain patients (about `val_fraction` of the retain images, drawn
  with `val_seed`) is held out of the retain data the method sees while tuning;
- each method runs once per learning rate in `lr_factors` x its preset lr, with its preset
  epochs and everything else unchanged;
- the selected lr maximises  macro-F1(validation) - macro-F1(forget set)  (image head): keep
  what the model knows about retain-like patients it did not unlearn on, lose what it knows
  about the forget patients. No test-set label and no retrained model is looked at;
- the final run uses the selected lr on the full retain set; its time is the method's
  `seconds` (tuning time is reported apart). `compare.tune = False` runs the preset lr only.
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
from forgetmi_jax.evaluation.evaluate import evaluate_runs
from forgetmi_jax.evaluation.evaluator import make_predict_fn, predict_logits
from forgetmi_jax.evaluation.gaps import retrain_gaps
from forgetmi_jax.evaluation.metrics import classification_metrics
from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.runs import setup
from forgetmi_jax.unlearning import registry

log = logging.getLogger('forgetmi_jax')

CRITERION = 'macro_f1(validation) - macro_f1(forget), image head'


# ------------------------------------------------------------------------------ tuning pieces
def lr_grid(lr, factors):
  """The learning rates tried for a method: its preset lr times each factor (sorted, unique)."""
  grid = sorted({float(lr) * float(f) for f in factors})
  if not grid or any(not (g > 0 and math.isfinite(g)) for g in grid):
    raise ValueError(f'lr grid must hold positive numbers, got {grid}')
  return grid


def carve_validation(split, subject_id, fraction, seed):
  """(tuning split without the validation patients, validation indices).

  Whole patients, as for the forget set, so no patient is on both sides; seeded; at least one
  patient, and never the whole retain set.
  """
  if not 0 < float(fraction) < 1:
    raise ValueError(f'compare.val_fraction must be in (0, 1), got {fraction}')
  retain = np.asarray(split.retain_idx)
  subjects = np.asarray(subject_id)[retain]
  unique = np.unique(subjects)
  if len(unique) < 2:
    raise ValueError('the retain set needs at least 2 patients to carve a validation set')
  order = np.random.default_rng(int(seed)).permutation(unique)
  counts = {s: c for s, c in zip(*np.unique(subjects, return_counts=True))}
  target, total, chosen = float(fraction) * len(retain), 0, []
  for s in order[:-1]:
    if total >= target:
      break
    chosen.append(s)
    total += counts[s]
  held = np.isin(subjects, chosen)
  return dataclasses.replace(split, retain_idx=retain[~held]), retain[held]


def selection_score(val_f1, forget_f1):
  """Higher is better; a diverged run (nan) is never selected."""
  s = float(val_f1) - float(forget_f1)
  return s if math.isfinite(s) else -math.inf


def select(records):
  """The record with the highest score (the first such: grids are sorted by lr)."""
  return max(records, key=lambda r: r['score'])


# ------------------------------------------------------------------------------ runs
def with_lr(config, name, lr):
  """A copy of the config with the method's learning rate set."""
  config = copy.deepcopy(config)
  with config.unlocked():
    method_config(config, name).lr = float(lr)
  return config


def run_or_reuse(prep, original, name, tag, seeds=None):
  """Run method `name` once per seed as stacked copies (or reload a finished run of the same
  fingerprint, which reports the run's own seconds); (variables per seed, seconds per seed:
  each copy's share of the program's time, histories per seed)."""
  copies = setup.copies_of(prep.config, name, seeds)
  result = setup.run_method(prep, original, name, copies=copies,
                            ckpt_root=os.path.join(prep.workdir, 'checkpoints', tag))
  share = result.seconds / len(copies)
  return ([s.variables for s in result.states], [share] * len(copies), result.histories)


def image_f1(prep, predict, variables, indices, labels):
  logits = predict_logits(predict, variables, prep.source, indices,
                          int(prep.config.eval.batch_size))
  return classification_metrics(logits, labels[indices])['f1']


def tune(prep, original, name, cc):
  """Try the lr grid on the tuning split; returns the selection record."""
  tune_split, val_idx = carve_validation(prep.split, prep.cohort.subject_id, cc.val_fraction,
                                         cc.val_seed)
  predict = make_predict_fn(prep.model.apply, prep.config.eval.head)
  labels = np.asarray(prep.cohort.labels)
  preset = float(method_config(prep.config, name).lr)
  records = []
  for lr in lr_grid(preset, cc.lr_factors):
    p = dataclasses.replace(prep, config=with_lr(prep.config, name, lr), split=tune_split)
    (state,), (seconds,), _ = run_or_reuse(p, original, name, 'tune')
    val_f1 = image_f1(prep, predict, state, val_idx, labels)
    forget_f1 = image_f1(prep, predict, state, prep.split.forget_idx, labels)
    records.append({'lr': lr, 'val_f1': val_f1, 'forget_f1': forget_f1,
                    'score': selection_score(val_f1, forget_f1), 'seconds': seconds})
    log.info('tune %s lr=%g: val F1 %.3f, forget F1 %.3f', name, lr, val_f1, forget_f1)
  best = select(records)
  return {'preset_lr': preset, 'selected_lr': best['lr'], 'records': records,
          'validation_images': int(len(val_idx)),
          'seconds': float(sum(r['seconds'] for r in records))}


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
  (original,), t_orig = setup.train_or_load(prep, 'original')
  retrains, t_retrain = setup.train_or_load(prep, 'retrain', seeds=seeds)
  states, seconds = {'original': [original], 'retrain': retrains}, {'original': t_orig,
                                                                    'retrain': t_retrain}
  tuning, histories, lrs, walls = {}, {}, {}, {}
  for name in methods:
    lr = float(method_config(config, name).lr)
    if cc.tune:
      tuning[name] = tune(prep, original, name, cc)
      lr = tuning[name]['selected_lr']
    p = dataclasses.replace(prep, config=with_lr(prep.config, name, lr))
    states[name], seconds[name], hist = run_or_reuse(p, original, name, 'final', seeds)
    histories[name] = hist[0]
    lrs[name] = lr
    walls[name] = float(sum(seconds[name]))
    log.info('%s done: lr %g, %.1fs for %d seed(s)', name, lr, walls[name], len(seeds))
  results, _, _, summary, per_example = evaluate_runs(
      prep.model, prep.source, prep.split, states, seconds, config.eval, prep.cohort.subject_id)
  names = [k for k in ('original', 'retrain') + registry.names() if k in states]
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
                 'val_fraction': float(cc.val_fraction), 'methods': tuning},
      'history': histories,
      'wall_seconds': {'total': time.time() - t_start,
                       **{f'{k}_all_seeds': v for k, v in walls.items()}},
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

  def summary(models, given=None):
    if 'retrain' not in models:
      return {}
    names = [m for m in methods if m in models]
    gap = {m: (given[m] if given else retrain_gaps(models[m], models['retrain'])['avg_gap'])
           for m in names}
    return {'by_avg_gap': sorted(names, key=lambda m: gap[m] if gap[m] is not None else math.inf),
            'lowest_mia': lowest(models, names, 'mia'),
            'lowest_forget_f1': lowest(models, names, 'forget_f1')}
  return {'ours': summary(ours, avg_gaps), 'paper': summary(paper)}


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
             'seeds': payload.get('seeds', 1), 'summary': payload.get('summary')}
  parts = [report.build_report(summary, title='Unlearning comparison')]
  tuning = payload.get('tuning') or {}
  parts.append('## Learning-rate selection')
  if tuning.get('enabled'):
    parts.append(f"Criterion: maximise {tuning['criterion']}, on a validation set of retain "
                 f"patients (~{100 * tuning['val_fraction']:.0f} % of retain images) held out "
                 f"of the tuning runs; grid = preset lr x {tuning['lr_factors']}. The final "
                 'run uses the selected lr on the full retain set.')
    rows = []
    for name, t in tuning['methods'].items():
      for r in t['records']:
        rows.append([report.display_name(name), f"{r['lr']:.3g}", r['val_f1'], r['forget_f1'],
                     r['score'], 'yes' if r['lr'] == t['selected_lr'] else '',
                     f"{r['seconds']:.1f}"])
    parts.append(report.markdown_table(
        ['Method', 'lr', 'Val. F1', 'Forget F1', 'Score', 'Selected', 'Seconds'], rows,
        align=['l', 'r', 'r', 'r', 'r', 'l', 'r']))
  else:
    parts.append('Tuning off (`compare.tune = False`): every method ran at its preset lr.')
  order = payload.get('ordering') or {}
  if order.get('ours'):
    parts.append('## Ordering (methods only)')
    sep = {'by_avg_gap': ' < ', 'lowest_mia': ' = ', 'lowest_forget_f1': ' = '}
    rows = []
    for what, joiner in sep.items():
      cell = lambda v: joiner.join(map(report.display_name, v)) or report.MISSING  # noqa
      rows.append([what.replace('_', ' '), cell(order['ours'].get(what, [])),
                   cell(order['paper'].get(what, []))])
    parts.append(report.markdown_table(['', 'This run', 'Paper'], rows, align=['l', 'l', 'l']))
  return '\n\n'.join(p.strip('\n') for p in parts) + '\n'


def write_outputs(workdir, payload):
  report.write_json_atomic(payload, os.path.join(workdir, 'comparison.json'))
  markdown = build_markdown(payload)
  atomic_write(os.path.join(workdir, 'comparison.md'), lambda f: f.write(markdown), binary=False)
