"""The ablation grid behind experiments/ablate.py: Forget-MI loss-weight settings x image noise
(mu, sigma) x lr x seed on one forget set, against the cached original and retrained models.

Every setting is one copy (`loop.Copy`: its seed and its `config.forgetmi` with the setting's
weights, noise and lr) of ForgetMIMethod on THE loop (train/loop.py); nothing here trains.

Modes (`config.ablation.mode`):
- 'vmap' (default): all settings are copies of ONE ForgetMIMethod run through
  setup.run_method. The loop stacks them (one program per chunk size), splits them into equal
  chunks that fit `memory_budget_gb` (XLA's measured per-copy bytes) or `chunk_size`, pads the
  last chunks, and checkpoints every epoch (a killed grid resumes mid-run). Copies sharing a
  seed share batches; the frozen original's targets are computed once per (seed, noise).
  A setting's `seconds` is its share: the run's wall time / the settings in it.
- 'sequential': each setting is its own one-copy run (its own compile, targets and
  checkpoints); for debugging. Both modes give the same rows to float rounding
  (tests/test_ablation.py).

Outputs in the workdir (atomic writes):
  rows/<setting_id>.json  one finished setting with the fingerprint of what made it (the
                          setting's run fingerprint + the eval config); a rerun reuses a row only
                          when its fingerprint matches, so a changed config recomputes it
  ablation.json           {"rows": [...], "best": row, "models": {original, retrain}, "paper",
                          "criterion", "grid", "chunking", "device", "config", ...}
  ablation.md             the rows ranked by the criterion, this run's original / retrain, the
                          paper's Table 1 rows (Table 2 is not in the reference: said so)
A row = the setting (setting_id, setting, weights, noise, lr, seed) + the output contract's
metrics {mia, forget_auc, forget_f1, test_auc, test_f1, distance_to_retrain, seconds} + gap_*
and avg_gap + extras (normalised weights, final losses, mode, chunk, fingerprints).

Best = closest to the retrained model in Avg. Gap, then lowest MIA (then grid order).
"""
import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax import config as config_lib
from forgetmi_jax.evaluation import report
from forgetmi_jax.evaluation.evaluate import evaluate_models
from forgetmi_jax.evaluation.gaps import METRIC_KEYS, retrain_gaps
from forgetmi_jax.runs import setup
from forgetmi_jax.train import loop
from forgetmi_jax.unlearning.forgetmi import TERMS, ForgetMIMethod, normalised_weights

log = logging.getLogger('forgetmi_jax')

METHOD = 'forgetmi'
MODES = ('vmap', 'sequential')
CRITERION = ('lowest avg_gap (mean |metric - retrain| over MIA, forget AUC, forget F1, test '
             'AUC, test F1), then lowest MIA')
CONTRACT_KEYS = METRIC_KEYS + ('distance_to_retrain', 'seconds')
TABLE2_NOTE = ("The paper's Table 2 (its loss-weight and noise ablation) is not transcribed in "
               "this project's reference, so its values are not shown; the paper's Table 1 rows "
               "for Forget-MI (at its best setting) and retrain are given for scale.")


# ------------------------------------------------------------------------------ the grid
@dataclasses.dataclass(frozen=True)
class Setting:
  """One grid point. `name` is a LOSS_WEIGHT_PRESETS key; mu/sigma are None for no_noise."""
  name: str
  weights: tuple  # raw (ur, uu, mu, mr), normalised by the method
  mu: float | None
  sigma: float | None
  lr: float
  seed: int

  @property
  def no_noise(self):
    return self.name == 'no_noise'

  @property
  def noise_key(self):
    """Settings with equal noise_key (and seed) share the frozen original's forget targets."""
    return ('clean',) if self.no_noise else (float(self.mu), float(self.sigma))

  @property
  def setting_id(self):
    """Stable, filename-safe id, e.g. 'equal_mu0_sigma0.1_lr0.0001_seed0'."""
    noise = 'clean' if self.no_noise else f'mu{self.mu:g}_sigma{self.sigma:g}'
    sid = f'{self.name}_{noise}_lr{self.lr:g}_seed{self.seed}'
    return re.sub(r'[^A-Za-z0-9._-]', '-', sid)

  def to_dict(self):
    return {'setting_id': self.setting_id, 'setting': self.name,
            'weights': dict(zip(TERMS, map(float, self.weights))),
            'noise': None if self.no_noise else {'mu': float(self.mu), 'sigma': float(self.sigma)},
            'lr': float(self.lr), 'seed': int(self.seed)}

  def method_config(self, forgetmi_cfg):
    """A deep copy of `config.forgetmi` with this setting's weights, noise and lr."""
    cfg = copy.deepcopy(forgetmi_cfg)
    with cfg.unlocked():
      cfg.setting = self.name
      for k, v in zip(TERMS, self.weights):
        cfg.loss_weights[k] = float(v)
      if not self.no_noise:
        cfg.noise.image_mu = float(self.mu)
        cfg.noise.image_sigma = float(self.sigma)
      cfg.lr = float(self.lr)
    return cfg

  def copy(self, forgetmi_cfg):
    """This setting as one model copy of the loop."""
    return loop.Copy(int(self.seed), self.method_config(forgetmi_cfg), self.setting_id)


def expand_grid(ablation_cfg, presets=None) -> list:
  """settings x noise x lr x seed, in that nesting order. no_noise ignores the image noise, so
  it appears once per (lr, seed) instead of once per noise setting."""
  presets = config_lib.LOSS_WEIGHT_PRESETS if presets is None else presets
  names = list(ablation_cfg.settings)
  unknown = [n for n in names if n not in presets]
  if unknown:
    raise ValueError(f'ablation.settings has unknown names {unknown} (known: {sorted(presets)})')
  noise = [tuple(map(float, n)) for n in ablation_cfg.noise]
  if not noise or any(len(n) != 2 or n[1] < 0 for n in noise):
    raise ValueError(f'ablation.noise must be (mu, sigma>=0) pairs, got {noise}')
  lrs = [float(x) for x in ablation_cfg.lrs]
  if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
    raise ValueError(f'ablation.lrs must be positive, got {lrs}')
  seeds = [int(s) for s in ablation_cfg.seeds]
  out = []
  for name in names:
    w = tuple(float(presets[name][k]) for k in TERMS)
    grid = [(None, None)] if name == 'no_noise' else noise
    for mu, sigma in grid:
      for lr in lrs:
        for seed in seeds:
          out.append(Setting(name, w, mu, sigma, lr, seed))
  ids = [s.setting_id for s in out]
  if len(set(ids)) != len(ids):
    raise ValueError('the ablation grid has duplicate settings: '
                     f'{sorted({i for i in ids if ids.count(i) > 1})}')
  return out


# ------------------------------------------------------------------------------ fingerprints
def row_key(prep, setting) -> str:
  """What made a row: the setting's own run fingerprint (its copy's config and seed, the data,
  model, training config and split: setup.run_fingerprint) and the evaluation config."""
  run_key, _ = setup.run_fingerprint(prep, METHOD, [setting.copy(prep.config.forgetmi)])
  return config_lib.fingerprint('ablation-row', run_key, prep.config.eval.to_dict())


def reference_key(prep) -> str:
  """What the original / retrained rows depend on (data, model, training, eval, split)."""
  c = prep.config
  return config_lib.fingerprint('ablation-reference', prep.data_key, c.model.to_dict(),
                                c.train.to_dict(), c.eval.to_dict(), int(c.seed),
                                np.asarray(prep.split.forget_idx).tolist(),
                                np.asarray(prep.split.retain_idx).tolist())


# ------------------------------------------------------------------------------ rows
def rows_dir(workdir):
  return os.path.join(workdir, 'rows')


def _read_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # a torn file cannot happen with atomic writes, but never trust it


def load_rows(workdir, keys: dict) -> dict:
  """{setting_id: row} of finished settings whose saved fingerprint is `keys[setting_id]`;
  a row made by anything else (another config, data, split or eval) is not reused."""
  out = {}
  for sid, key in keys.items():
    saved = _read_json(os.path.join(rows_dir(workdir), f'{sid}.json'))
    if saved is None:
      continue
    row = saved.get('row')
    if saved.get('key') == key and isinstance(row, dict) and row.get('setting_id') == sid:
      out[sid] = row
    else:
      log.info('ablation: row %s was made by another config (fingerprint %s, now %s): rerun',
               sid, saved.get('key'), key)
  return out


def save_row(workdir, key, row):
  report.write_json_atomic({'key': key, 'row': row},
                           os.path.join(rows_dir(workdir), f"{row['setting_id']}.json"))


def make_row(setting, metrics, history, extra=None):
  """The setting, the contract metrics (+ gaps and extras) and the final epoch's losses."""
  row = setting.to_dict()
  row['weights_normalized'] = list(normalised_weights(row['weights']).values())
  for k in CONTRACT_KEYS:
    row[k] = metrics.get(k)
  for k, v in metrics.items():
    if k not in row:
      row[k] = v
  last = history[-1] if history else {}
  row['final_losses'] = {k: last[k] for k in ('loss',) + TERMS if k in last}
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


def evaluate_states(prep, retrain, variables: dict, seconds: dict):
  """Contract metrics (+ gaps to retrain) for each named model's variables."""
  models = dict(variables)
  models['retrain'] = retrain
  results, _ = evaluate_models(prep.model, prep.source, prep.split, models, dict(seconds),
                               prep.config.eval)
  return {k: v for k, v in results.items() if k != 'retrain'}


# ------------------------------------------------------------------------------ training
@dataclasses.dataclass
class Trained:
  """One loop run over some settings: results per setting, in the settings' order."""
  settings: list
  states: list  # host TrainStates
  seconds: list  # per setting
  histories: list  # per setting, per epoch
  extras: list  # per setting: mode, chunk, chunk plan
  groups: list  # index lists: settings trained (and evaluated) together
  ckpt_dir: str
  fingerprint: str
  memory: dict | None = None


def chunk_plan(n, ab, memory):
  """How the loop chunked n copies (the same plan_chunks call, on its measured memory)."""
  budget = float(ab.memory_budget_gb) * 2 ** 30
  info = {'memory_budget_gb': float(ab.memory_budget_gb), 'chunk_size_config': int(ab.chunk_size)}
  info.update(memory or {})
  info['chunk_sizes'] = loop.plan_chunks(n, (memory or {}).get('per_copy_bytes'),
                                         (memory or {}).get('fixed_bytes', 0), budget,
                                         int(ab.chunk_size))
  return info


def _check_vmappable(ctx, copies):
  """The copies of one program must agree on what is compiled in (ForgetMIMethod checks)."""
  try:
    ForgetMIMethod(ctx, copies)
  except ValueError as e:
    raise ValueError(f"ablation.mode='vmap': {e}. Run these settings with "
                     "--config.ablation.mode=sequential") from None


def train_grid(prep, original, settings, mode='vmap', ab=None, ctx=None, ckpt_root=None):
  """Train `settings` from `original` on the loop; yields one `Trained` per loop run (the
  whole grid in vmap mode, each setting in sequential mode).

  `ab`: the ablation config group (memory budget, chunk size; default the config's).
  Used by the runner (which evaluates and saves each run) and by benchmarks/bench_ablation.py.
  """
  if mode not in MODES:
    raise ValueError(f'ablation.mode={mode!r} is not one of {MODES}')
  settings = list(settings)
  if not settings:
    return
  ab = prep.config.ablation if ab is None else ab
  ctx = ctx or setup.make_context(prep)
  ckpt_root = ckpt_root or os.path.join(prep.workdir, 'checkpoints')
  forgetmi_cfg = prep.config.forgetmi
  if mode == 'sequential':
    for s in settings:
      result = setup.run_method(prep, original, METHOD, copies=[s.copy(forgetmi_cfg)],
                                ckpt_root=ckpt_root, ctx=ctx)
      yield Trained([s], result.states, [result.seconds], result.histories,
                    [{'mode': 'sequential'}], [[0]],
                    os.path.join(ckpt_root, METHOD, result.fingerprint), result.fingerprint)
    return
  copies = [s.copy(forgetmi_cfg) for s in settings]
  _check_vmappable(ctx, copies)
  result = setup.run_method(prep, original, METHOD, copies=copies, ckpt_root=ckpt_root, ctx=ctx,
                            chunk_size=int(ab.chunk_size),
                            memory_budget_bytes=float(ab.memory_budget_gb) * 2 ** 30)
  n = len(settings)
  plan = chunk_plan(n, ab, result.memory)
  sizes = plan['chunk_sizes']
  extras, groups, start = [], [], 0
  for c, size in enumerate(sizes):
    groups.append(list(range(start, start + size)))
    extras += [{'mode': 'vmap', 'chunk': {'index': c, 'size': size, 'padded_to': max(sizes),
                                          'count': len(sizes)},
                'chunk_plan': plan}] * size
    start += size
  yield Trained(settings, result.states, [result.seconds / n] * n, result.histories, extras,
                groups, os.path.join(ckpt_root, METHOD, result.fingerprint), result.fingerprint,
                result.memory)


def _remove_checkpoints(ckpt_dir, root):
  """A finished run's checkpoints (its rows are the result), and folders left empty."""
  shutil.rmtree(ckpt_dir, ignore_errors=True)
  parent, root = os.path.dirname(os.path.abspath(ckpt_dir)), os.path.abspath(root)
  while parent.startswith(root) and os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)
    parent = os.path.dirname(parent)


# ------------------------------------------------------------------------------ the runner
def run_ablation(config, config_name='ablation'):
  """The whole grid (resuming finished settings); returns the ablation.json payload."""
  t_start = time.time()
  ab = config.ablation
  if ab.mode not in MODES:
    raise ValueError(f'ablation.mode={ab.mode!r} is not one of {MODES}')
  settings = expand_grid(ab)
  prep = setup.prepare(config, config_name)
  (original,), (t_orig,) = setup.train_or_load(prep, 'original')
  (retrain,), (t_retrain,) = setup.train_or_load(prep, 'retrain')
  keys = {s.setting_id: row_key(prep, s) for s in settings}
  done = load_rows(prep.workdir, keys)
  todo = [s for s in settings if s.setting_id not in done]
  log.info('ablation: %d settings, %d already done, %d to run (%s mode)', len(settings),
           len(settings) - len(todo), len(todo), ab.mode)
  models = _reference_models(prep, original, retrain, t_orig, t_retrain)
  ckpt_root = os.path.join(prep.workdir, 'checkpoints')
  with tqdm(total=len(settings), initial=len(settings) - len(todo), desc='ablation settings',
            unit='setting', position=0, dynamic_ncols=True) as bar:
    for trained in train_grid(prep, original, todo, ab.mode, ab, ckpt_root=ckpt_root):
      for group in trained.groups:  # evaluated per chunk: rows are saved as they are ready
        unit = [trained.settings[i] for i in group]
        metrics = evaluate_states(
            prep, retrain, {s.setting_id: trained.states[i].variables for s, i in zip(unit, group)},
            {s.setting_id: trained.seconds[i] for s, i in zip(unit, group)})
        for s, i in zip(unit, group):
          extra = dict(trained.extras[i], fingerprint=keys[s.setting_id],
                       run_fingerprint=trained.fingerprint)
          row = make_row(s, metrics[s.setting_id], trained.histories[i], extra)
          save_row(prep.workdir, keys[s.setting_id], row)
          done[s.setting_id] = row
        bar.update(len(unit))
        bar.set_postfix_str(unit[-1].setting_id)
      if not ab.keep_checkpoints:
        _remove_checkpoints(trained.ckpt_dir, ckpt_root)
  rows = [done[s.setting_id] for s in settings]
  chunking = []
  for r in rows:  # how the chunks were sized, also for rows finished by an earlier invocation
    if r.get('chunk_plan') and r['chunk_plan'] not in chunking:
      chunking.append(r['chunk_plan'])
  payload = build_payload(prep, rows, models, chunking, time.time() - t_start)
  setup.log_eval_metrics(prep, {**models, **{r['setting_id']: r for r in rows}})
  write_outputs(prep.workdir, payload)
  return payload


def _reference_models(prep, original, retrain, t_orig, t_retrain):
  """This run's original and retrained metrics (evaluated once, reused on resumption)."""
  key = reference_key(prep)
  path = os.path.join(rows_dir(prep.workdir), '_reference.json')
  saved = _read_json(path) if os.path.exists(path) else None
  if saved is not None and saved.get('key') == key:
    return saved['models']
  results, _ = evaluate_models(prep.model, prep.source, prep.split,
                               {'original': original, 'retrain': retrain},
                               {'original': t_orig, 'retrain': t_retrain}, prep.config.eval)
  report.write_json_atomic({'key': key, 'models': results}, path)
  return report.to_jsonable(results)


def build_payload(prep, rows, models, chunking, wall_seconds):
  config = prep.config
  fraction = prep.forget_fraction
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
               'epochs': int(config.forgetmi.epochs),
               'copies': 'vmap mode: every setting is a copy of one ForgetMIMethod on the loop '
                         '(one program per chunk size); copies of one seed share batches'},
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
  parts.append("Seconds: vmap mode = the setting's share of the stacked run (its wall time, "
               'with compilation, memory measurement, the frozen original\'s targets and all '
               'chunks, / the settings in it); sequential mode = its own run. Evaluation time '
               'is not included.')
  models = payload.get('models') or {}
  if models:
    parts.append('## This run: original and retrained models')
    parts.append(report.markdown_table(
        ['Model', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1', 'Avg. gap'],
        [[report.display_name(k)] + [m.get(x) for x in METRIC_KEYS] + [m.get('avg_gap')]
         for k, m in models.items()], align=['l'] + ['r'] * 6))
  paper = payload['paper']
  parts.append(f"## Paper context ({round(100 * paper['fraction'])} % forget set)")
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
