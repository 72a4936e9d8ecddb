"""The end-to-end run behind experiments/unlearn.py: setup -> original and retrained models
(cached) -> the configured method on the loop -> evaluation -> metrics.json, report.md, figure.
"""
import logging
import os
import time

import ml_collections
import numpy as np

from forgetmi_jax import config as config_lib
from forgetmi_jax.evaluation.evaluate import evaluate_runs
from forgetmi_jax.evaluation.report import read_metrics, write_run_outputs, write_seed_outputs
from forgetmi_jax.runs import setup
from forgetmi_jax.train import loop
from forgetmi_jax.train.checkpoints import Checkpoints
from forgetmi_jax.unlearning import registry

log = logging.getLogger('forgetmi_jax')


def run(config, config_name='run'):
  """The main command: returns the metrics.json payload."""
  t_start = time.time()
  prep = setup.prepare(config, config_name)
  seeds = config_lib.seeds(config)
  (original,), t_orig = setup.train_or_load(prep, 'original')
  retrains, t_retrain = setup.train_or_load(prep, 'retrain', seeds=seeds)
  name = config.method
  copies = setup.copies_of(config, name, seeds)
  result = setup.run_method(prep, original, copies=copies)
  runs = {'original': [original], 'retrain': retrains, name: [s.variables for s in result.states]}
  seconds = {'original': t_orig, 'retrain': t_retrain,
             name: [result.seconds / len(copies)] * len(copies)}
  results, losses, logits, summary, per_example = evaluate_runs(
      prep.model, prep.source, prep.split, runs, seconds, config.eval, prep.cohort.subject_id)
  models = {k: results[k] for k in runs}  # seed 0: the single-seed table, unchanged
  payload = {'forget_fraction': prep.forget_fraction, 'seeds': len(seeds), 'models': models,
             'summary': summary, 'config': config.to_dict(),
             'fingerprint': {name: result.fingerprint},
             'cache_dir_relative': os.path.relpath(prep.cache_dir, prep.workdir),
             'history': {name: result.histories[0]},
             'stopping': {name: None if result.stopping is None else [
                 setup.stop_summary(s) for s in result.stopping]},
             'wall_seconds': {'total': time.time() - t_start,
                              'retrain_all_seeds': float(sum(t_retrain)),
                              f'{name}_all_seeds': float(result.seconds)},
             'timing': setup.run_timing(prep, seeds)}
  setup.log_eval_metrics(prep, models)
  write_seed_outputs(prep.workdir, per_example)
  return write_run_outputs(prep.workdir, payload, losses, logits, set_labels(prep))


def set_labels(prep):
  labels = np.asarray(prep.source.labels)
  return {s: labels[idx] for s, idx in (('retain', prep.split.retain_idx),
                                        ('test', prep.split.test_idx),
                                        ('forget', prep.split.forget_idx))}


def reevaluate(workdir):
  """Re-evaluate a finished run from its checkpoints (no training): rewrites its outputs.

  A moved workdir finds its cache where it was relative to the run; a missing cache or
  checkpoint is an error naming it, never a silent retraining.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: run experiments/unlearn.py first')
  old = read_metrics(path)
  config = ml_collections.ConfigDict(old['config'])
  with config.unlocked():
    config.workdir = workdir
    if 'cache_dir_relative' in old:
      config.cache_dir = os.path.normpath(os.path.join(workdir, old['cache_dir_relative']))
  prep = setup.prepare(config)
  seeds = config_lib.seeds(config)
  (original,), _ = setup.train_or_load(prep, 'original', allow_training=False)
  retrains, _ = setup.train_or_load(prep, 'retrain', seeds=seeds, allow_training=False)
  name = config.method
  copies = setup.copies_of(config, name, seeds)
  key, _ = setup.run_fingerprint(prep, name, copies)
  ckpt_dir = os.path.join(workdir, 'checkpoints', name, key)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoints of this run in {ckpt_dir}')
  method = registry.get(name)(setup.make_context(prep, with_noisy_text=False), copies)
  unlearned = [s.variables for s in restore_copies(method, original, ckpt_dir)]
  old_summary = old.get('summary') or {}
  seconds = {k: (old_summary.get(k, {}).get('seconds') or {}).get('values')
             or [v.get('seconds')] for k, v in old['models'].items()}
  runs = {'original': [original], 'retrain': retrains, name: unlearned}
  results, losses, logits, summary, per_example = evaluate_runs(
      prep.model, prep.source, prep.split, runs, seconds, config.eval, prep.cohort.subject_id)
  payload = dict(old, models={k: results[k] for k in runs}, summary=summary)
  write_seed_outputs(workdir, per_example)
  return write_run_outputs(workdir, payload, losses, logits, set_labels(prep))


def restore_copies(method, original, ckpt_dir):
  """The copies' final states from a finished run's checkpoints (an early-stopped copy's best
  epoch), in one folder or in the `chunk{c}-of-{k}` folders of a chunked run (each chunk
  padded to the largest)."""
  n = len(method.copies)
  chunked = sorted(d for d in os.listdir(ckpt_dir) if d.startswith('chunk'))
  k = int(chunked[0].split('-of-')[1]) if chunked else 1
  sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
  states, start = [], 0
  for c, size in enumerate(sizes):
    chunk = method.copies[start:start + size]
    chunk = chunk + [chunk[-1]] * (max(sizes) - size)
    chunk_dir = ckpt_dir if k == 1 else os.path.join(ckpt_dir, f'chunk{c}-of-{k}')
    ckpt = Checkpoints(chunk_dir)
    try:
      restored, extra = ckpt.restore(loop.stack([method.init_state(original, cp)
                                                 for cp in chunk]))
    finally:
      ckpt.close()
    chunk_states = loop.final_states(loop.unstack(restored, len(chunk)), extra, chunk_dir)
    states += chunk_states[:size]
    start += size
  return states
