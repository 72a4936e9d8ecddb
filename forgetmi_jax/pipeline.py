"""The end-to-end run behind experiments/unlearn.py.

config -> cohort -> forget split -> tokens -> original (trained or cached) -> retrained
(trained or cached) -> unlearning method -> evaluation -> workdir outputs.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from forgetmi_jax import config_utils
from forgetmi_jax.train import cache as cache_lib
from forgetmi_jax.train import parallel
from forgetmi_jax.train.trainer import create_train_state, fit, make_train_step

log = logging.getLogger('forgetmi_jax')


@dataclasses.dataclass
class Prepared:
  """What every stage after data preparation needs."""
  config: Any
  cohort: Any
  split: Any
  tokenizer: Any
  source: Any
  model: Any
  init_variables: Any
  mesh: Any
  data_key: str
  workdir: str
  cache_dir: str


def default_dirs(config, config_name='run'):
  workdir = config.workdir or os.path.join('runs', config_name)
  cache_dir = config.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), 'cache')
  return os.path.abspath(workdir), os.path.abspath(cache_dir)


# ------------------------------------------------------------------------------ data
def build_cohort(config, cache_dir):
  d = config.data
  if d.source == 'synthetic':
    from forgetmi_jax.data.synthetic import make_synthetic_cohort
    knobs = {k: v for k, v in d.synthetic.items() if not (isinstance(v, float) and v < 0)}
    return make_synthetic_cohort(seed=int(config.seed), image_size=int(d.image_size),
                                 split_csv=d.split_csv or None, **knobs)
  from forgetmi_jax.data.mimic_cxr import load_mimic_cxr
  return load_mimic_cxr(d.split_csv, d.mimic_root, d.data_dir or os.path.join(cache_dir, 'tfds'),
                        image_size=int(d.image_size), reports_tsv=d.reports_tsv or None)


def build_tokenizer(config, cohort, cache_dir, data_key):
  """The pretrained checkpoint's tokenizer, or a WordPiece vocabulary trained on the cohort."""
  from forgetmi_jax.data.tokenizer import load_tokenizer, train_wordpiece_tokenizer
  if config.model.text.pretrained_path:
    return load_tokenizer(config.model.text.pretrained_path)
  out_dir = os.path.join(cache_dir, f'tokenizer-{data_key}-{config.data.tokenizer_vocab_size}')
  if os.path.exists(os.path.join(out_dir, 'COMPLETE')):
    return load_tokenizer(out_dir)
  tok = train_wordpiece_tokenizer(sorted(set(cohort.reports)), int(config.data.tokenizer_vocab_size),
                                  out_dir)
  cache_lib.mark_complete(out_dir, {'vocab_size': len(tok)})
  return tok


def prepare(config, config_name='run') -> Prepared:
  """Resolve and validate the config, then build data, tokens and the model."""
  config_utils.resolve(config)
  workdir, cache_dir = default_dirs(config, config_name)
  with config.unlocked():
    config.workdir, config.cache_dir = workdir, cache_dir
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(cache_dir, exist_ok=True)
  from forgetmi_jax.data.forget_sets import make_forget_split
  from forgetmi_jax.data.pipeline import make_source
  from forgetmi_jax.models.multimodal import build_model, init_variables

  t0 = time.time()
  cohort = build_cohort(config, cache_dir)
  data_key = cache_lib.fingerprint(config.data.to_dict(), int(config.seed), len(cohort))
  split = make_forget_split(cohort, float(config.forget_fraction),
                            seed=int(config.data.forget_seed),
                            forget_csv=config.data.forget_csv or None)
  tokenizer = build_tokenizer(config, cohort, cache_dir, data_key)
  source = make_source(cohort, tokenizer, int(config.data.max_text_len))
  model_cfg = config.model.to_dict()
  if not config.model.text.pretrained_path:
    model_cfg['text']['vocab_size'] = max(int(model_cfg['text']['vocab_size']), len(tokenizer))
  model, pretrained_text, _ = build_model(model_cfg)
  variables = init_variables(model, jax.random.PRNGKey(int(config.seed)),
                             int(config.data.image_size), int(config.data.max_text_len))
  if pretrained_text is not None:
    from forgetmi_jax.models.bert import load_bert_params_into
    variables = load_bert_params_into(variables, pretrained_text)
  mesh = parallel.make_mesh()
  log.info('data ready in %.1fs: %d images, forget %d, retain %d, test %d', time.time() - t0,
           len(cohort), len(split.forget_idx), len(split.retain_idx), len(split.test_idx))
  return Prepared(config, cohort, split, tokenizer, source, model, variables, mesh, data_key,
                  workdir, cache_dir)


# ------------------------------------------------------------------------------ training
def train_or_load(prep: Prepared, kind: str, indices):
  """Train the original ('original', all non-TEST) or retrained ('retrain', retain only)
  model, or load it from the cache keyed by everything that determines it."""
  from forgetmi_jax.data.pipeline import batches
  config = prep.config
  key = cache_lib.fingerprint(kind, prep.data_key, config.model.to_dict(),
                              config.train.to_dict(), int(config.seed),
                              np.sort(np.asarray(indices)).tolist())
  path = cache_lib.entry_dir(prep.cache_dir, kind, key)
  bs = int(config.train.batch_size)
  steps = len(indices) // bs
  state = create_train_state(prep.init_variables['params'], prep.init_variables['batch_stats'],
                             config.train, steps, int(config.seed))
  ckpt_dir = os.path.join(path, 'ckpt')
  if cache_lib.is_complete(path):
    from forgetmi_jax.train.checkpoints import Checkpoints
    ckpt = Checkpoints(ckpt_dir)
    state, _ = ckpt.restore(state)
    ckpt.close()
    meta = cache_lib.read_meta(path)
    log.info('%s model loaded from cache %s', kind, path)
    return state, float(meta['seconds'])
  t0 = time.time()
  seed = int(config.seed) + (0 if kind == 'original' else 1)
  epoch_batches = lambda epoch: batches(prep.source, indices, bs, seed=seed, epoch=epoch,
                                        drop_remainder=True)
  step = make_train_step(prep.model.apply, float(config.train.ranking_weight))
  state = fit(state, step, epoch_batches, int(config.train.epochs), prep.mesh, ckpt_dir,
              desc=f'train {kind}')
  seconds = time.time() - t0
  cache_lib.mark_complete(path, {'kind': kind, 'seconds': seconds, 'examples': len(indices)})
  return state, seconds


def method_config(config, name):
  return config.unlearn if name == 'forgetmi' else config[name]


def make_context(prep: Prepared, with_noisy_text=True):
  from forgetmi_jax.data.forget_sets import RetainSampler
  from forgetmi_jax.unlearning.common import UnlearnContext
  config = prep.config
  sampler = RetainSampler(prep.cohort.subject_id, prep.split.retain_idx,
                          prep.split.forget_subjects, seed=int(config.seed))
  noisy = noisy_forget_tokens(prep) if with_noisy_text else None
  image_size, text_len = int(config.data.image_size), int(config.data.max_text_len)
  from forgetmi_jax.models.multimodal import init_variables
  init_params = lambda key: init_variables(prep.model, key, image_size, text_len)['params']
  return UnlearnContext(config, prep.model, prep.source, prep.split, sampler, prep.mesh, noisy,
                        init_params)


def noisy_forget_tokens(prep: Prepared):
  """Noisy report copies of the forget set, drawn once per run and tokenised once."""
  from forgetmi_jax.data.noise import TextNoiser
  from forgetmi_jax.data.pipeline import noisy_token_table
  noise = prep.config.unlearn.noise
  noiser = TextNoiser(noise.text_mode, float(noise.text_p), seed=int(prep.config.seed))
  return noisy_token_table(prep.source, prep.cohort, prep.split.forget_idx, noiser,
                           int(noise.num_draws), prep.tokenizer, int(prep.config.data.max_text_len))


def run_method(prep: Prepared, original_state, name=None, ckpt_dir=None):
  from forgetmi_jax.unlearning import registry
  from forgetmi_jax.unlearning.common import run_unlearning
  name = name or prep.config.method
  ctx = make_context(prep)
  method = registry.get(name)(ctx, method_config(prep.config, name))
  ckpt_dir = ckpt_dir or os.path.join(prep.workdir, 'checkpoints', name)
  state, seconds, history = run_unlearning(method, original_state, ckpt_dir, desc=f'unlearn {name}')
  return state, seconds, history


# ------------------------------------------------------------------------------ evaluation
def evaluate_models(prep: Prepared, states: dict, seconds: dict):
  """Metrics of the output contract for each model, plus the per-example losses."""
  from forgetmi_jax.evaluation import distance, gaps, metrics, mia
  from forgetmi_jax.evaluation.evaluator import make_predict_fn, predict_logits
  config = prep.config
  predict = make_predict_fn(prep.model.apply, config.eval.head)
  labels = np.asarray(prep.cohort.labels)
  sets = {'retain': prep.split.retain_idx, 'test': prep.split.test_idx,
          'forget': prep.split.forget_idx}
  logits = {}
  for name, state in states.items():
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits[name] = {s: predict_logits(predict, variables, prep.source, idx,
                                      int(config.eval.batch_size), desc=f'eval {name}/{s}')
                    for s, idx in sets.items()}
  results, losses = {}, {}
  for name, lg in logits.items():
    loss = {s: metrics.per_sample_ce(lg[s], labels[sets[s]]) for s in sets}
    losses[name] = loss
    forget = metrics.classification_metrics(lg['forget'], labels[sets['forget']])
    test = metrics.classification_metrics(lg['test'], labels[sets['test']])
    seed = int(config.eval.mia_seed)
    m = {
        'mia': mia.svc_mia(loss['retain'], loss['test'], loss['forget'], seed=seed),
        'forget_auc': forget['auc'], 'forget_f1': forget['f1'],
        'test_auc': test['auc'], 'test_f1': test['f1'],
        'distance_to_retrain': (distance.distance_to_retrain(lg['retain'],
                                                             logits['retrain']['retain'])
                                if 'retrain' in logits else None),
        'seconds': seconds.get(name),
    }
    strong = mia.logreg_mia(loss['retain'], loss['test'], loss['forget'], seed=seed)
    m['mia_logreg_member_rate'] = strong['forget_member_rate']
    m['mia_logreg_forget_vs_test_auc'] = strong['forget_vs_test_auc']
    if config.eval.mia_per_batch_mean:
      m['mia_per_batch'] = mia.svc_mia(loss['retain'], loss['test'], loss['forget'], seed=seed,
                                       per_batch_mean=True)
    results[name] = m
  if 'retrain' in results:
    results = gaps.add_gaps(results)
  return results, losses


def save_outputs(prep: Prepared, results: dict, losses: dict, extra: dict | None = None):
  """metrics.json (atomic), per-example losses (npz), report.md and the loss histograms."""
  from forgetmi_jax.evaluation import report
  workdir = prep.workdir
  payload = {'forget_fraction': float(prep.config.forget_fraction)
             if not prep.config.data.forget_csv else
             float(len(prep.split.forget_idx) / len(prep.cohort)),
             'models': results, 'config': prep.config.to_dict()}
  if extra:
    payload.update(extra)
  report.write_json_atomic(payload, os.path.join(workdir, 'metrics.json'))
  flat = {f'{m}/{s}': v for m, d in losses.items() for s, v in d.items()}
  from forgetmi_jax.io_utils import atomic_write
  atomic_write(os.path.join(workdir, 'losses.npz'), lambda f: np.savez(f, **flat))
  report.write_report(payload, os.path.join(workdir, 'report.md'))
  report.plot_loss_histograms({m: {'test': d['test'], 'forget': d['forget']}
                               for m, d in losses.items()},
                              os.path.join(workdir, 'loss_histograms.png'))
  return payload


def run(config, config_name='run'):
  """The main command: returns the metrics.json payload."""
  t_start = time.time()
  prep = prepare(config, config_name)
  split = prep.split
  non_test = np.sort(np.concatenate([split.forget_idx, split.retain_idx]))
  original, t_orig = train_or_load(prep, 'original', non_test)
  retrain, t_retrain = train_or_load(prep, 'retrain', split.retain_idx)
  unlearned, t_unlearn, history = run_method(prep, original)
  name = config.method
  results, losses = evaluate_models(prep, {'original': original, 'retrain': retrain,
                                           name: unlearned},
                                    {'original': t_orig, 'retrain': t_retrain, name: t_unlearn})
  payload = save_outputs(prep, results, losses,
                         {'history': {name: history},
                          'wall_seconds': {'total': time.time() - t_start}})
  return payload


def reevaluate(workdir):
  """Re-evaluate a finished run from its checkpoints (no training): rewrites its outputs."""
  import ml_collections
  from forgetmi_jax.evaluation.report import read_metrics
  from forgetmi_jax.train.checkpoints import Checkpoints
  from forgetmi_jax.unlearning import registry
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: run experiments/unlearn.py first')
  old = read_metrics(path)
  config = ml_collections.ConfigDict(old['config'])
  with config.unlocked():
    config.workdir = os.path.abspath(workdir)
  prep = prepare(config)
  split = prep.split
  non_test = np.sort(np.concatenate([split.forget_idx, split.retain_idx]))
  original, t_orig = train_or_load(prep, 'original', non_test)
  retrain, t_retrain = train_or_load(prep, 'retrain', split.retain_idx)
  name = config.method
  method = registry.get(name)(make_context(prep, with_noisy_text=False),
                              method_config(config, name))
  ckpt = Checkpoints(os.path.join(prep.workdir, 'checkpoints', name))
  unlearned, _ = ckpt.restore(method.init_state(original))
  ckpt.close()
  seconds = {k: v.get('seconds') for k, v in old['models'].items()}
  results, losses = evaluate_models(prep, {'original': original, 'retrain': retrain,
                                           name: unlearned}, seconds)
  return save_outputs(prep, results, losses, {k: old[k] for k in ('history', 'wall_seconds')
                                              if k in old})
