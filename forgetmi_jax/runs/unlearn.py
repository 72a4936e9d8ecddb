"""The end-to-end run behind experiments/unlearn.py: setup -> original and retrained models
(cached) -> the configured method on the loop -> evaluation -> metrics.json, report.md, figure.
"""
import logging
import os
import time

import ml_collections
import numpy as np

from forgetmi_jax.evaluation.evaluate import evaluate_models
from forgetmi_jax.evaluation.report import read_metrics, write_run_outputs
from forgetmi_jax.runs import setup
from forgetmi_jax.train import loop
from forgetmi_jax.train.checkpoints import Checkpoints
from forgetmi_jax.unlearning import registry

log = logging.getLogger('forgetmi_jax')


def run(config, config_name='run'):
  """The main command: returns the metrics.json payload."""
  t_start = time.time()
  prep = setup.prepare(config, config_name)
  (original,), (t_orig,) = setup.train_or_load(prep, 'original')
  (retrain,), (t_retrain,) = setup.train_or_load(prep, 'retrain')
  name = config.method
  result = setup.run_method(prep, original)
  results, losses, logits = evaluate_models(
      prep.model, prep.source, prep.split,
      {'original': original, 'retrain': retrain, name: result.states[0].variables},
      {'original': t_orig, 'retrain': t_retrain, name: result.seconds}, config.eval,
      return_logits=True)
  payload = {'forget_fraction': prep.forget_fraction, 'models': results,
             'config': config.to_dict(), 'fingerprint': {name: result.fingerprint},
             'cache_dir_relative': os.path.relpath(prep.cache_dir, prep.workdir),
             'history': {name: result.histories[0]},
             'wall_seconds': {'total': time.time() - t_start}}
  setup.log_eval_metrics(prep, results)
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
  (original,), _ = setup.train_or_load(prep, 'original', allow_training=False)
  (retrain,), _ = setup.train_or_load(prep, 'retrain', allow_training=False)
  name = config.method
  copies = setup.copies_of(config, name)
  key, _ = setup.run_fingerprint(prep, name, copies)
  ckpt_dir = os.path.join(workdir, 'checkpoints', name, key)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoints of this run in {ckpt_dir}')
  method = registry.get(name)(setup.make_context(prep, with_noisy_text=False), copies)
  ckpt = Checkpoints(ckpt_dir)
  states, _ = ckpt.restore(loop.stack([method.init_state(original, copies[0])]))
  ckpt.close()
  unlearned = loop.unstack(states, 1)[0].variables
  seconds = {k: v.get('seconds') for k, v in old['models'].items()}
  results, losses, logits = evaluate_models(
      prep.model, prep.source, prep.split,
      {'original': original, 'retrain': retrain, name: unlearned}, seconds, config.eval,
      return_logits=True)
  payload = dict(old, models=results)
  return write_run_outputs(workdir, payload, losses, logits, set_labels(prep))
