"""A forget request, end to end (experiments/forget.py): a trained original, a list of patients
who withdrew consent, no retraining; out come the unlearned model and an audit report.

request CSV -> forget split (every image of every study of each listed patient; TEST or
unknown ids are an error before any work) -> the original (a public-code state dict, our
variables, or the cached original of this data config) -> the method on the loop -> per-patient
evidence before/after -> unlearned model (orbax, safetensors[, public-code state dict]) and
forget_report.{json,md,png} under the workdir.
"""
import logging
import os
import time

import numpy as np

from forgetmi_jax import config as config_lib
from forgetmi_jax.data.forget_request import load_forget_request
from forgetmi_jax.evaluation import metrics
from forgetmi_jax.evaluation.evaluate import model_logits
from forgetmi_jax.evaluation.forget_report import (build_forget_report, sha256_of_variables,
                                                   write_forget_report)
from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.models.interop import load_reference_checkpoint, save_reference_checkpoint
from forgetmi_jax.runs import setup
from forgetmi_jax.train.checkpoints import (load_variables, load_variables_safetensors,
                                            save_variables, save_variables_safetensors)

log = logging.getLogger('forgetmi_jax')
REFERENCE_SUFFIXES = ('.pth', '.pt', '.bin')


def example_request(cohort, path, n=5, seed=0):
  """A request of `n` random non-TEST synthetic patients (so the command runs with no files)."""
  subjects = np.unique(cohort.subject_id[cohort.fold != 'TEST'])
  chosen = np.sort(np.random.default_rng(seed).choice(subjects, size=n, replace=False))
  text = 'subject_id\n' + ''.join(f'{int(s)}\n' for s in chosen)
  atomic_write(path, lambda f: f.write(text), binary=False)
  return path


def load_original(path, config, like):
  """The trained original from a public-code state dict (.pth/.pt/.bin, or a .safetensors
  with its key names), our safetensors variables, or our orbax variables folder."""
  if os.path.isdir(path):
    return load_variables(path, like)
  if not os.path.exists(path):
    raise FileNotFoundError(f'request.original={path!r} does not exist')
  if path.endswith('.safetensors'):
    try:
      return load_variables_safetensors(path)
    except ValueError:  # not ours: the public code's key names
      return load_reference_checkpoint(path, config)
  if path.endswith(REFERENCE_SUFFIXES):
    return load_reference_checkpoint(path, config)
  raise ValueError(f'request.original={path!r}: expected a .pth/.pt/.bin or .safetensors file '
                   'or an orbax variables folder')


def run(config, config_name='forget_request'):
  t0 = time.time()
  rc = config.request
  if config.data.source != 'synthetic' and not rc.subjects_csv:
    raise ValueError('request.subjects_csv is required: a CSV with a subject_id column')
  summary = {}

  def make_split(cohort):
    path = rc.subjects_csv
    if not path:
      path = example_request(cohort, os.path.join(config.workdir or '.', 'example_request.csv'),
                             int(rc.example_subjects))
      log.info('no request.subjects_csv: forgetting %d random synthetic patients (%s)',
               int(rc.example_subjects), path)
    request = load_forget_request(path, cohort, split_df=config.data.split_csv or None)
    summary.update(request.summary)
    return request.split

  with config.unlocked():  # the example request goes into the workdir, made before prepare
    config.workdir = setup.default_dirs(config, config_name)[0]
  os.makedirs(config.workdir, exist_ok=True)
  prep = setup.prepare(config, config_name, make_split=make_split)
  like = prep.init_variables(int(config.seed))
  if rc.original:
    original = load_original(rc.original, config, like)
    origin = 'file'
  else:
    (original,), _ = setup.train_or_load(prep, 'original')
    origin = 'cache'
  t_unlearn = time.time()
  result = setup.run_method(prep, original, name=config.method)
  unlearned = result.states[0].variables
  unlearn_seconds = time.time() - t_unlearn
  out = os.path.join(prep.workdir, 'unlearned')
  save_variables(os.path.join(out, 'variables'), unlearned)
  save_variables_safetensors(os.path.join(out, 'model.safetensors'), unlearned)
  if rc.export_reference:
    save_reference_checkpoint(unlearned, os.path.join(out, 'reference_state_dict.pth'))
  payload = _evidence(prep, original, unlearned, summary, result, origin, t0, unlearn_seconds)
  payload['workdir'] = prep.workdir
  write_forget_report(payload, prep.workdir)
  utility = payload.get('utility', {})
  setup.log_eval_metrics(prep, {'original': utility.get('before', {}),
                                'unlearned': utility.get('after', {})})
  return payload


def _evidence(prep, original, unlearned, summary, result, origin, t0, unlearn_seconds):
  """Per-example losses of both models on forget, retain and the non-members (TEST), their
  utility, and the report payload."""
  split, labels = prep.split, np.asarray(prep.source.labels)
  logits = model_logits(prep.model, prep.source, split,
                        {'original': original, 'unlearned': unlearned}, prep.config.eval)
  sets = {'forget': split.forget_idx, 'retain': split.retain_idx, 'nonmember': split.test_idx}
  names = {'forget': 'forget', 'retain': 'retain', 'nonmember': 'test'}
  losses, utility = {}, {}
  for model, lg in logits.items():
    losses[model] = {k: metrics.per_sample_ce(lg[names[k]], labels[idx]) for k, idx in sets.items()}
    utility[model] = {s: metrics.classification_metrics(lg[s], labels[idx])
                      for s, idx in (('retain', split.retain_idx), ('test', split.test_idx))}
  config = prep.config
  payload = build_forget_report(
      forget_subject_ids=prep.cohort.subject_id[split.forget_idx],
      forget_study_ids=prep.cohort.study_id[split.forget_idx],
      losses_original=losses['original'], losses_unlearned=losses['unlearned'],
      sha256_original=sha256_of_variables(original),
      sha256_unlearned=sha256_of_variables(unlearned), seconds=time.time() - t0,
      nonmember_set='test', utility_before=utility['original'],
      utility_after=utility['unlearned'], request_summary=summary, method=config.method,
      config=config_lib.result_dict(config), config_fingerprint=result.fingerprint,
      seed=int(config.eval.mia_seed))
  payload['original_from'] = origin
  payload['unlearning_seconds'] = unlearn_seconds
  return payload
