"""The ablation grid behind experiments/ablate.py: Forget-MI loss-weight settings x image noise
(mu, sigma) x lr x seed on one forget set, against the cached original and retrained models.

Outputs in the workdir (atomic writes):
  rows/<setting_id>.json  one finished setting (resumption skips it; the chunk in progress
                          restarts from the original model)
  ablation.json           {"rows": [...], "best": row, "models": {original, retrain}, "paper",
                          "criterion", "grid", "chunking", "device", "config", ...}
  ablation.md             the rows ranked by the criterion, this run's original / retrain, the
                          paper's Table 1 rows (Table 2 is not in the reference: said so)
A row = the setting (setting_id, setting, weights, noise, lr, seed) + the output contract's
metrics {mia, forget_auc, forget_f1, test_auc, test_f1, distance_to_retrain, seconds} + gap_*
and avg_gap + extras (normalised weights, final losses, mode, chunk).

Best = closest to the retrained model in Avg. Gap, then lowest MIA (then grid order).

Modes (`config.ablation.mode`):
- 'vmap' (default): settings grouped by seed (the seed sets the data order, so a group shares
  every batch); each group is split into equal chunks that fit `memory_budget_gb` (measured,
  see unlearning/grid.py) and each chunk is ONE jitted program over stacked model copies.
  A setting's `seconds` is its share: chunk time / chunk size + group target caching / group size.
- 'sequential': one setting at a time through ForgetMIMethod + run_unlearning (per-epoch
  checkpoints, resumable mid-setting); for debugging. Both modes give the same rows to float
  rounding (tests/test_ablation.py).
"""
import dataclasses
import logging
import math
import os
import shutil
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax import pipeline
from forgetmi_jax.evaluation import report
from forgetmi_jax.evaluation.gaps import METRIC_KEYS
from forgetmi_jax.train import cache as cache_lib
from forgetmi_jax.unlearning import grid as grid_lib

log = logging.getLogger('forgetmi_jax')

MODES = ('vmap', 'sequential')
CRITERION = ('lowest avg_gap (mean |metric - retrain| over MIA, forget AUC, forget F1, test '
             'AUC, test F1), then lowest MIA')
CONTRACT_KEYS = METRIC_KEYS + ('distance_to_retrain', 'seconds')
TABLE2_NOTE = ("The paper's Table 2 (its loss-weight and noise ablation) is not transcribed in "
               "this project's reference, so its values are not shown; the paper's Table 1 rows "
               "for Forget-MI (at its best setting) and retrain are given for scale.")


# ------------------------------------------------------------------------------ pieces
def grid_key(prep):
  """Everything but the grid point that determines a row (stale rows are recomputed)."""
  c = prep.config
  unlearn = c.unlearn.to_dict()
  for k in ('setting', 'loss_weights', 'lr'):
    unlearn.pop(k, None)
  unlearn['noise'] = {k: v for k, v in unlearn['noise'].items()
                      if k not in ('image_mu', 'image_sigma')}
  return cache_lib.fingerprint('ablation', prep.data_key, c.model.to_dict(), c.train.to_dict(),
                               unlearn, c.eval.to_dict(), int(c.seed),
                               np.asarray(prep.split.forget_idx).tolist(),
                               np.asarray(prep.split.retain_idx).tolist())


def rows_dir(workdir):
  return os.path.join(workdir, 'rows')


def load_rows(workdir, key):
  """{setting_id: row} of finished settings written under the same grid key."""
  import json
  out = {}
  d = rows_dir(workdir)
  if not os.path.isdir(d):
    return out
  for name in sorted(os.listdir(d)):
    if not name.endswith('.json') or name.startswith('.'):
      continue
    try:
      with open(os.path.join(d, name), encoding='utf-8') as f:
        saved = json.load(f)
    except (OSError, ValueError):
      continue  # a torn file cannot happen with atomic writes, but never trust it
    if saved.get('key') == key and isinstance(saved.get('row'), dict):
      out[saved['row']['setting_id']] = saved['row']
  return out


def save_row(workdir, key, row):
  report.write_json_atomic({'key': key, 'row': row},
                           os.path.join(rows_dir(workdir), f"{row['setting_id']}.json"))


def make_row(setting, metrics, history, extra=None):
  """The setting, the contract metrics (+ gaps and extras) and the final epoch's losses."""
  from forgetmi_jax.unlearning.forgetmi import weight_vector
  row = setting.to_dict()
  row['weights_normalized'] = [float(x) for x in weight_vector(row['weights'])]
  for k in CONTRACT_KEYS:
    row[k] = metrics.get(k)
  for k, v in metrics.items():
    if k not in row:
      row[k] = v
  last = history[-1] if history else {}
  row['final_losses'] = {k: last[k] for k in ('loss', 'ur', 'uu', 'mu', 'mr') if k in last}
  row['epochs'] = len(history)
  if extra:
    row.update(extra)
  return report.to_jsonable(row)


def _sort_key(row):
  gap, mia = row.get('avg_gap'), row.get('mia')
  bad = lambda v: v is None or not math.isfinite(float(v))  # noqa: E731
  return (bad(gap), float(gap) if not bad(gap) else 0.0, bad(mia),
          float(mia) if not bad(mia) else 0.0)


def rank_rows(rows):
  """Rows ordered by the criterion (stable: ties keep grid order); missing values last."""
  return sorted(rows, key=_sort_key)


def select_best(rows):
  return rank_rows(rows)[0] if rows else None


def evaluate_states(prep, retrain, states, seconds):
  """Contract metrics (+ gaps to retrain) for each named state."""
  models = dict(states)
  models['retrain'] = retrain
  results, _ = pipeline.evaluate_models(prep, models, dict(seconds))
  return {k: v for k, v in results.items() if k != 'retrain'}


# ------------------------------------------------------------------------------ training
def settings_by_seed(settings):
  groups = {}
  for s in settings:
    groups.setdefault(s.seed, []).append(s)
  return groups


def chunk_plan(group, program, ab, workdir=None, key=None):
  """Chunk sizes for a seed group and how they were chosen (measured memory, budget)."""
  n = len(group.settings)
  info = {'memory_budget_gb': float(ab.memory_budget_gb), 'chunk_size_config': int(ab.chunk_size)}
  if int(ab.chunk_size) > 0:
    info['chunk_sizes'] = grid_lib.plan_chunks(n, chunk_size=int(ab.chunk_size))
    return info
  est = _cached_estimate(group, program, workdir, key)
  info.update(est or {})
  budget = float(ab.memory_budget_gb) * 2 ** 30
  info['chunk_sizes'] = grid_lib.plan_chunks(
      n, est and est['per_copy_bytes'], est['fixed_bytes'] if est else 0, budget)
  return info


def _cached_estimate(group, program, workdir, key):
  """The 1- and 2-copy compile measurement, reused on resumption (it costs two compiles)."""
  import json
  path = None
  if workdir and key:
    ekey = cache_lib.fingerprint(key, len(group.noise_keys), jax.devices()[0].device_kind,
                                 len(jax.devices()))
    path = os.path.join(workdir, 'memory_estimate.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        saved = json.load(f)
      if saved.get('key') == ekey:
        return saved['estimate']
  state, batch, hparams = group.example()
  t0 = time.time()
  est = grid_lib.estimate_memory(program, state, group.original_host, batch, hparams)
  if est is not None:
    est['estimate_seconds'] = time.time() - t0
    if path:
      report.write_json_atomic({'key': ekey, 'estimate': est}, path)
  return est


def train_grid(prep, original, settings, mode='vmap', ab=None, workdir=None, key=None,
               ckpt_root=None, progress=None):
  """Train `settings`; yields (settings, host states, per-setting seconds, histories, extra)
  per finished unit (a chunk in vmap mode, one setting in sequential mode).

  Used by the runner (which evaluates and saves each unit) and by benchmarks/bench_ablation.py.
  """
  ctx = pipeline.make_context(prep)
  unlearn_cfg = prep.config.unlearn
  if mode == 'sequential':
    for s in settings:
      ckpt = os.path.join(ckpt_root or os.path.join(prep.workdir, 'checkpoints'),
                          f'{s.setting_id}-{key or "run"}')
      state, seconds, history = grid_lib.run_sequential(ctx, unlearn_cfg, s, original, ckpt,
                                                        desc=s.setting_id)
      yield [s], [state], [seconds], [history], {'mode': 'sequential', 'ckpt_dir': ckpt}
    return
  if mode != 'vmap':
    raise ValueError(f'ablation.mode={mode!r} is not one of {MODES}')
  program = None
  for seed, members in settings_by_seed(settings).items():
    group = grid_lib.GroupRun(ctx, unlearn_cfg, members, original)
    if program is None:
      program = grid_lib.VmappedForgetMI(ctx.apply_fn, num_draws=group.num_draws)
    group.prepare()
    plan = chunk_plan(group, program, ab, workdir, key) if ab is not None else {
        'chunk_sizes': [len(members)]}
    sizes = plan['chunk_sizes']
    start = 0
    for c, size in enumerate(sizes):
      idx = list(range(start, start + size))
      start += size
      states, seconds, histories = group.run_chunk(
          idx, program, pad_to=max(sizes), desc=f'seed {seed} chunk {c + 1}/{len(sizes)}')
      share = seconds / size + group.prepare_seconds / len(members)
      extra = {'mode': 'vmap', 'chunk': {'seed': seed, 'index': c, 'size': size,
                                         'padded_to': max(sizes), 'seconds': seconds},
               'chunk_plan': plan}
      yield [members[i] for i in idx], states, [share] * size, histories, extra


# ------------------------------------------------------------------------------ the grid
def run_ablation(config, config_name='ablation'):
  """The whole grid (resuming finished settings); returns the ablation.json payload."""
  t_start = time.time()
  ab = config.ablation
  if ab.mode not in MODES:
    raise ValueError(f'ablation.mode={ab.mode!r} is not one of {MODES}')
  settings = grid_lib.expand_grid(ab)
  prep = pipeline.prepare(config, config_name)
  split = prep.split
  non_test = np.sort(np.concatenate([split.forget_idx, split.retain_idx]))
  original, t_orig = pipeline.train_or_load(prep, 'original', non_test)
  retrain, t_retrain = pipeline.train_or_load(prep, 'retrain', split.retain_idx)
  key = grid_key(prep)
  done = load_rows(prep.workdir, key)
  todo = [s for s in settings if s.setting_id not in done]
  log.info('ablation: %d settings, %d already done, %d to run (%s mode)', len(settings),
           len(settings) - len(todo), len(todo), ab.mode)
  models = _reference_models(prep, original, retrain, t_orig, t_retrain, key)
  chunking = []
  with tqdm(total=len(settings), initial=len(settings) - len(todo), desc='ablation settings',
            unit='setting', position=0, dynamic_ncols=True) as bar:
    for unit, states, seconds, histories, extra in train_grid(
        prep, original, todo, ab.mode, ab, prep.workdir, key):
      named = {s.setting_id: st for s, st in zip(unit, states)}
      metrics = evaluate_states(prep, retrain, named,
                                {s.setting_id: sec for s, sec in zip(unit, seconds)})
      ckpt_dir = extra.pop('ckpt_dir', None)
      for s, hist in zip(unit, histories):
        row = make_row(s, metrics[s.setting_id], hist, extra)
        save_row(prep.workdir, key, row)
        done[s.setting_id] = row
      if ckpt_dir and not ab.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the row is the result
      bar.update(len(unit))
  rows = [done[s.setting_id] for s in settings]
  for r in rows:  # how the chunks were sized, also for rows finished by an earlier invocation
    if r.get('chunk_plan') and r['chunk_plan'] not in chunking:
      chunking.append(r['chunk_plan'])
  payload = build_payload(prep, rows, models, chunking, time.time() - t_start)
  write_outputs(prep.workdir, payload)
  return payload


def _reference_models(prep, original, retrain, t_orig, t_retrain, key):
  """This run's original and retrained metrics (evaluated once, reused on resumption)."""
  import json
  path = os.path.join(rows_dir(prep.workdir), '_reference.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if saved.get('key') == key:
      return saved['models']
  results, _ = pipeline.evaluate_models(prep, {'original': original, 'retrain': retrain},
                                        {'original': t_orig, 'retrain': t_retrain})
  report.write_json_atomic({'key': key, 'models': results}, path)
  return report.to_jsonable(results)


def build_payload(prep, rows, models, chunking, wall_seconds):
  config = prep.config
  fraction = (float(len(prep.split.forget_idx) / len(prep.cohort)) if config.data.forget_csv
              else float(config.forget_fraction))
  paper_f = report.nearest_paper_fraction(fraction)
  paper = report.PAPER_TABLE1[paper_f]
  ab = config.ablation
  return report.to_jsonable({
      'forget_fraction': fraction,
      'criterion': CRITERION,
      'rows': rows,
      'best': select_best(rows),
      'models': models,
      'paper': {'fraction': paper_f,
                'table1': {k: paper[k] for k in ('retrain', 'forgetmi')},
                'table2': None, 'note': TABLE2_NOTE},
      'grid': {'settings': list(ab.settings), 'noise': [list(n) for n in ab.noise],
               'lrs': list(ab.lrs), 'seeds': list(ab.seeds), 'count': len(rows),
               'epochs': int(config.unlearn.epochs),
               'seed_grouping': 'one vmapped program run per seed (shared batches and rngs)'},
      'mode': ab.mode,
      'chunking': chunking,
      'device': {'kind': jax.devices()[0].device_kind, 'count': len(jax.devices()),
                 'platform': jax.devices()[0].platform},
      'wall_seconds': {'total': wall_seconds},
      'config': config.to_dict(),
  })


# ------------------------------------------------------------------------------ markdown
def _weights_cell(row):
  w = row.get('weights_normalized') or []
  return '/'.join(f'{x:.2f}' for x in w)


def _noise_cell(row):
  n = row.get('noise')
  return 'clean' if not n else f"({n['mu']:g}, {n['sigma']:g})"


def build_markdown(payload):
  rows = payload['rows']
  ranked = rank_rows(rows)
  best = payload.get('best')
  parts = ['# Forget-MI ablation']
  f = payload['forget_fraction']
  dev = payload.get('device') or {}
  parts.append(
      f"Forget fraction {100 * f:.1f} %; {len(rows)} settings (weights x image noise (mu, "
      f"sigma) x lr x seed), {payload['grid']['epochs']} unlearning epochs each; mode "
      f"`{payload['mode']}` on {dev.get('count', 1)} x {dev.get('kind', '?')}; total wall "
      f"{payload['wall_seconds']['total']:.1f} s (this invocation).")
  parts.append(f"Criterion: {payload['criterion']}.")
  if best:
    parts.append(f"**Best: `{best['setting_id']}`** — weights UR/UU/MU/MR "
                 f"{_weights_cell(best)}, noise {_noise_cell(best)}, lr {best['lr']:g}, "
                 f"seed {best['seed']}: Avg. gap {report.format_value(best.get('avg_gap'))}, "
                 f"MIA {report.format_value(best.get('mia'))}.")
  parts.append('## Settings, ranked')
  table = []
  for rank, r in enumerate(ranked, 1):
    table.append([rank, r['setting'], _weights_cell(r), _noise_cell(r), f"{r['lr']:g}",
                  r['seed']] + [r.get(k) for k in METRIC_KEYS] +
                 [r.get('distance_to_retrain'), r.get('avg_gap'),
                  f"{r['seconds']:.1f}" if r.get('seconds') is not None else None])
  parts.append(report.markdown_table(
      ['#', 'Setting', 'UR/UU/MU/MR', 'Noise (mu, sigma)', 'lr', 'Seed', 'MIA', 'Forget AUC',
       'Forget F1', 'Test AUC', 'Test F1', 'Dist. to retrain', 'Avg. gap', 'Seconds'], table,
      align=['r', 'l', 'l', 'l', 'r', 'r'] + ['r'] * 8))
  parts.append('Seconds: vmap mode = the setting\'s share of its chunk (chunk wall time / '
               'settings in it, plus the shared frozen-original targets / settings in the seed '
               'group); sequential mode = its own run. Evaluation time is not included.')
  models = payload.get('models') or {}
  if models:
    parts.append('## This run: original and retrained models')
    parts.append(report.markdown_table(
        ['Model', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1', 'Avg. gap'],
        [[report.display_name(k)] + [m.get(x) for x in METRIC_KEYS] + [m.get('avg_gap')]
         for k, m in models.items()], align=['l'] + ['r'] * 6))
  paper = payload['paper']
  parts.append(f"## Paper context ({round(100 * paper['fraction'])} % forget set)")
  from forgetmi_jax.evaluation.gaps import retrain_gaps
  t1 = paper['table1']
  parts.append(report.markdown_table(
      ['Model (paper, Table 1)', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1',
       'Avg. gap'],
      [[report.display_name(k)] + [m[x] for x in METRIC_KEYS] +
       [retrain_gaps(m, t1['retrain'])['avg_gap']] for k, m in t1.items()],
      align=['l'] + ['r'] * 6))
  parts.append(paper['note'] + ' The paper ran on MIMIC-CXR; runs on the synthetic cohort are '
               'comparable in pattern only.')
  chunking = payload.get('chunking') or []
  if chunking:
    parts.append('## Chunking')
    for c in chunking:
      mem = ''
      if c.get('per_copy_bytes'):
        mem = (f"; measured {c['per_copy_bytes'] / 2**20:.1f} MiB per copy + "
               f"{c['fixed_bytes'] / 2**20:.1f} MiB fixed (XLA memory_analysis of the step "
               f"compiled for 1 and 2 copies)")
      parts.append(f"- budget {c['memory_budget_gb']:g} GB{mem}; chunk sizes "
                   f"{c['chunk_sizes']}")
  return '\n\n'.join(p.strip('\n') for p in parts) + '\n'


def write_outputs(workdir, payload):
  report.write_json_atomic(payload, os.path.join(workdir, 'ablation.json'))
  report._atomic_write(os.path.join(workdir, 'ablation.md'), build_markdown(payload))
