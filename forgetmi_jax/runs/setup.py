"""What every runner does first, written once: config -> cohort -> forget split -> tokens ->
model -> cached reference models (original, retrained) -> method copies on the loop.

Fingerprints: a reference model is cached under a key of what it was trained on (data, model,
training config, seed, example ids); an unlearning run's checkpoints live under a key of
everything that determines its result (the method's config group, the data, model and
training config, the forget and retain ids), so a rerun with other settings never resumes
or reports another run's model.
"""
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax import config as config_lib
from forgetmi_jax.data.forget_sets import make_forget_split
from forgetmi_jax.data.mimic_cxr import load_mimic_cxr, restrict_permissions
from forgetmi_jax.data.noise import TextNoiser
from forgetmi_jax.data.device_data import make_train_source
from forgetmi_jax.data.pipeline import make_source, noisy_token_table
from forgetmi_jax.data.synthetic import make_synthetic_cohort
from forgetmi_jax.data.tokenizer import load_tokenizer, train_wordpiece_tokenizer
from forgetmi_jax.data.trim import buckets_for
from forgetmi_jax.evaluation.report import write_json_atomic
from forgetmi_jax.evaluation.validation import ValidationMonitor
from forgetmi_jax.models.bert import load_bert_params_into
from forgetmi_jax.models.multimodal import build_model, init_variables
from forgetmi_jax.train import cache as cache_lib
from forgetmi_jax.train import loop, parallel
from forgetmi_jax.train.checkpoints import load_variables, save_variables
from forgetmi_jax.train.tensorboard import EventWriter
from forgetmi_jax.train.trainer import TrainMethod
from forgetmi_jax.unlearning import registry
from forgetmi_jax.unlearning.method import UnlearnContext
from forgetmi_jax.unlearning.repair import RepairMethod, forget_rows, repair_group
from forgetmi_jax.unlearning.trunk import Trunk, TrunkSource, cut_modules, trunk_group
from forgetmi_jax.unlearning.trunk import compute_outputs as compute_trunk

log = logging.getLogger('forgetmi_jax')
# The split, not the data (a model's cache key holds its example ids instead).
_DATA_KEYS_OF_SPLIT = ('forget_csv', 'forget_seed', 'val_fraction', 'val_seed', 'data_dir')
# Where the data lives changes no batch (device_data.make_train_source), hence no result.
_DATA_KEYS_OF_PLACEMENT = ('placement',)


@dataclasses.dataclass
class Prepared:
  """What every stage after data preparation needs."""
  config: Any
  cohort: Any
  split: Any
  tokenizer: Any
  source: Any
  model: Any
  mesh: Any
  data_key: str
  workdir: str
  cache_dir: str
  init_variables: Callable  # seed -> fresh {'params', 'batch_stats'} (pretrained text loaded)
  # What the training and unlearning loops read: `source`, or its copy on the accelerator
  # (config.data.placement); evaluation reads `source`.
  train_source: Any = None

  @property
  def text_buckets(self):
    """Each step's text is cut to one of these lengths (config.model.text_buckets)."""
    return buckets_for(self.config.model.text_buckets, int(self.config.data.max_text_len))

  @property
  def non_test_idx(self):
    return np.sort(np.concatenate([self.split.forget_idx, self.split.retain_idx]))

  @property
  def forget_fraction(self):
    """Of all images: the configured fraction, or the given forget list's share."""
    if self.config.data.forget_csv:
      return float(len(self.split.forget_idx) / len(self.cohort))
    return float(self.config.forget_fraction)


def default_dirs(config, config_name='run'):
  workdir = config.workdir or os.path.join('runs', config_name)
  cache_dir = config.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), 'cache')
  return os.path.abspath(workdir), os.path.abspath(cache_dir)


# ------------------------------------------------------------------------------ data
def build_cohort(config, cache_dir):
  d = config.data
  if d.source == 'synthetic':
    knobs = {k: v for k, v in d.synthetic.items() if not (isinstance(v, float) and v < 0)}
    return make_synthetic_cohort(seed=int(config.seed), image_size=int(d.image_size),
                                 split_csv=d.split_csv or None, **knobs)
  return load_mimic_cxr(d.split_csv, d.mimic_root, d.data_dir or os.path.join(cache_dir, 'tfds'),
                        image_size=int(d.image_size), reports_tsv=d.reports_tsv or None,
                        image_fit=d.image_fit, content_hash=bool(d.content_hash))


def build_tokenizer(config, cohort, cache_dir, data_key):
  """The pretrained checkpoint's tokenizer, or a WordPiece vocabulary trained on the cohort."""
  if config.model.text.pretrained_path:
    return load_tokenizer(config.model.text.pretrained_path)
  d = config.data
  out_dir = os.path.join(cache_dir, f'tokenizer-{data_key}-{d.tokenizer_vocab_size}')
  with cache_lib.lock(out_dir):
    if cache_lib.is_complete(out_dir):
      return load_tokenizer(out_dir)
    patients = {}
    for text, subject in zip(cohort.reports, cohort.subject_id.tolist()):
      patients.setdefault(text, set()).add(subject)
    texts = sorted(patients)
    tok = train_wordpiece_tokenizer(texts, int(d.tokenizer_vocab_size), out_dir,
                                    groups=[patients[t] for t in texts],
                                    min_groups=int(d.tokenizer_min_patients))
    cache_lib.mark_complete(out_dir, {'vocab_size': len(tok)})
  return tok


def data_key(config, cohort):
  """What the cohort's examples are (not how they are split into forget and retain)."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in _DATA_KEYS_OF_SPLIT + _DATA_KEYS_OF_PLACEMENT}
  return config_lib.fingerprint(data, int(config.seed), len(cohort),
                                getattr(cohort, 'content_key', None))


def prepare(config, config_name='run', make_split=None) -> Prepared:
  """Resolve and validate the config, then build data, tokens and the model.

  `make_split(cohort)` replaces the configured forget split (a forget request's patients).
  """
  config_lib.resolve(config)
  workdir, cache_dir = default_dirs(config, config_name)
  with config.unlocked():
    config.workdir, config.cache_dir = workdir, cache_dir
  for key, path in (('workdir', workdir), ('cache_dir', cache_dir)):
    _check_writable(key, path)
  use_compile_cache(config.get('compile_cache_dir', ''), cache_dir)
  t0 = time.time()
  cohort = build_cohort(config, cache_dir)
  key = data_key(config, cohort)
  if make_split is not None:
    split = make_split(cohort)
  else:
    split = make_forget_split(cohort, float(config.forget_fraction),
                              seed=int(config.data.forget_seed),
                              forget_csv=config.data.forget_csv or None,
                              val_fraction=float(config.data.val_fraction),
                              val_seed=int(config.data.val_seed))
  check_split(config, split)
  tokenizer = build_tokenizer(config, cohort, cache_dir, key)
  source = make_source(cohort, tokenizer, int(config.data.max_text_len))
  model_cfg = config.model.to_dict()
  if not config.model.text.pretrained_path:
    model_cfg['text']['vocab_size'] = max(int(model_cfg['text']['vocab_size']), len(tokenizer))
  model, pretrained_text, _ = build_model(model_cfg)
  image_size, text_len = int(config.data.image_size), int(config.data.max_text_len)
  made = {}

  def fresh_variables(seed):
    if seed not in made:
      v = init_variables(model, jax.random.PRNGKey(int(seed)), image_size, text_len)
      made[seed] = load_bert_params_into(v, pretrained_text) if pretrained_text else v
    return made[seed]
  log.info('data ready in %.1fs: %d images, forget %d, retain %d, validation %d, test %d',
           time.time() - t0, len(cohort), len(split.forget_idx), len(split.retain_idx),
           len(split.val_idx), len(split.test_idx))
  return Prepared(config, cohort, split, tokenizer, source, model, parallel.make_mesh(), key,
                  workdir, cache_dir, fresh_variables,
                  make_train_source(source, config.data.placement))


def use_compile_cache(setting, cache_dir):
  """Keep XLA's compiled programs in a directory (`config.compile_cache_dir`: '' =
  `<cache_dir>/xla`, 'none' = off), so a rerun with the same shapes loads them instead of
  compiling. Returns the directory in use, or None.

  Process-wide (a jax setting, fixed at the first compilation that sees it): a directory
  already set, by an earlier call or JAX_COMPILATION_CACHE_DIR, is kept. The programs hold
  code only: the data and the weights are their arguments (tests/test_repair.py checks that
  no image's bytes are in an entry). jax runs whatever it finds there, so the directory is
  made owner-only (0700).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    if setting == 'none' or (setting and os.path.abspath(setting) != os.path.abspath(current)):
      log.info('compile_cache_dir=%s ignored: this process already caches compiled programs '
               'in %s', setting, current)
    return current
  if setting == 'none':
    return None
  path = os.path.abspath(setting or os.path.join(cache_dir, 'xla'))
  _check_writable('compile_cache_dir', path)
  try:
    os.chmod(path, 0o700)
  except OSError as e:
    raise ValueError(f'compile_cache_dir={path!r} cannot be made owner-only ({e.strerror}); '
                     'choose a folder of your own with --config.compile_cache_dir') from None
  jax.config.update('jax_compilation_cache_dir', path)
  # Every program, not only those that take jax's default second to compile: a run's many
  # small ones (the original's outputs, the pushed logits, stacking and sharding, the rng
  # keys) otherwise compile again in every process, about 2 s of a 50 s Forget-MI+ final
  # run (README "What limits it"). An environment variable the user set wins.
  for option, env in (('jax_persistent_cache_min_compile_time_secs',
                       'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'),
                      ('jax_persistent_cache_min_entry_size_bytes',
                       'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')):
    if env not in os.environ:
      jax.config.update(option, 0)
  return path


def _check_writable(key, path):
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write-test-{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'{key}={path!r} is not writable ({e.strerror}); choose another folder '
                     f'with --{key if key == "workdir" else "config." + key}') from None


def check_split(config, split):
  """Errors that would otherwise surface only after training, named by their cause."""
  source = (f'data.forget_csv={config.data.forget_csv!r}' if config.data.forget_csv
            else f'forget_fraction={config.forget_fraction}')
  if len(split.forget_idx) == 0:
    raise ValueError(f'{source} selects no image (an empty list, or a fraction too small for '
                     'one patient)')
  if len(split.retain_idx) == 0:
    raise ValueError(f'{source} leaves no retain set')
  n_retain = len(split.retain_idx)
  batch_keys = ['train.batch_size'] + [f'{m}.batch_size' for m in ('cf_k', 'eu_k')
                                       if config.method == m]
  for key in batch_keys:
    if int(config_lib.get(config, key)) > n_retain:
      raise ValueError(f'{key}={config_lib.get(config, key)} is larger than the {n_retain} '
                       'retain images it batches')


# ------------------------------------------------------------------------------ reference models
def reference_key(prep: Prepared, kind: str, seed: int, indices) -> str:
  config = prep.config
  return config_lib.fingerprint(kind, prep.data_key, config.model.to_dict(),
                                config.train.to_dict(), int(seed),
                                np.sort(np.asarray(indices)).tolist())


def train_or_load(prep: Prepared, kind: str, seeds=None, allow_training=True):
  """The original ('original', all non-TEST) or retrained ('retrain', retain only) models for
  `seeds` (default: the config's seed), loaded from the cache or trained as stacked copies.

  Each seed is its own cache entry, so asking for seeds 0..4 after 0..2 trains only 3 and 4.
  Returns (variables per seed, seconds per seed: each model's share of the program that
  trained it, i.e. the program's wall time over the copies it trained together).
  """
  seeds, indices, paths = _entries(prep, kind, seeds)
  missing = [s for s in seeds if not cache_lib.is_complete(paths[s])]
  if missing and not allow_training:
    raise FileNotFoundError(f'the cached {kind} model is missing: {paths[missing[0]]} (a moved '
                            'or cleaned cache?); pass --cache_dir or rerun the training command')
  if missing:
    group = cache_lib.entry_dir(prep.cache_dir, f'{kind}-train',
                                config_lib.fingerprint([paths[s] for s in missing]))
    with cache_lib.lock(group):
      missing = [s for s in missing if not cache_lib.is_complete(paths[s])]
      if missing:
        _train(prep, kind, indices, missing, paths, group)
  variables, seconds = [], []
  like = prep.init_variables(seeds[0])
  for s in seeds:
    variables.append(load_variables(os.path.join(paths[s], 'variables'), like))
    meta = cache_lib.read_meta(paths[s])
    seconds.append(float(meta['seconds']) / int(meta.get('stacked_copies', 1)))
    log.info('%s model (seed %d) from cache %s', kind, s, paths[s])
  return variables, seconds


def _entries(prep: Prepared, kind: str, seeds=None):
  """(seeds, the examples a `kind` model trains on, {seed: its cache entry folder})."""
  seeds = [int(prep.config.seed)] if seeds is None else [int(s) for s in seeds]
  indices = prep.non_test_idx if kind == 'original' else prep.split.retain_idx
  paths = {s: cache_lib.entry_dir(prep.cache_dir, kind, reference_key(prep, kind, s, indices))
           for s in seeds}
  return seeds, indices, paths


def timing_stamp() -> dict:
  """When and on what hardware a run was timed: seconds timed on other hardware, or on the
  same on another day, are not comparable to within their spread (README, "Where the goal
  stands": one retraining's seconds moved by about 10 % between runs)."""
  devices = jax.devices()
  return {'at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'devices': f'{len(devices)} x {devices[0].device_kind}', 'cpus': os.cpu_count()}


def cached_timing(prep: Prepared, kind: str, seeds=None) -> list:
  """The `timing_stamp` of each seed's cached `kind` model (None: cached before stamps)."""
  seeds, _, paths = _entries(prep, kind, seeds)
  return [cache_lib.read_meta(paths[s]).get('timed') for s in seeds]


def run_timing(prep: Prepared, seeds) -> dict:
  """A run's `timing` (metrics.json, comparison.json): this run's stamp and those of the
  cached original and retrained models whose seconds it reports."""
  return {'this_run': timing_stamp(), 'original': cached_timing(prep, 'original')[0],
          'retrain': cached_timing(prep, 'retrain', seeds)}


def _train(prep, kind, indices, seeds, paths, group_dir):
  copies = [loop.Copy(s, prep.config.train) for s in seeds]
  method = TrainMethod(copies, apply_fn=prep.model.apply, source=prep.train_source,
                       indices=indices, init_variables=prep.init_variables,
                       data_seed_offset=0 if kind == 'original' else 1,
                       text_buckets=prep.text_buckets)
  result = loop.run(method, None, os.path.join(group_dir, 'ckpt'), mesh=prep.mesh,
                    desc=f'train {kind}' + (f' x{len(seeds)}' if len(seeds) > 1 else ''),
                    chunk_size=int(prep.config.copies_per_program),
                    checkpoint_every_s=float(prep.config.checkpoint_every_s),
                    tb_dir=os.path.join(prep.workdir, 'tensorboard', f'train_{kind}'))
  timed = timing_stamp()
  for s, state in zip(seeds, result.states):
    save_variables(os.path.join(paths[s], 'variables'), state.variables)
    cache_lib.mark_complete(paths[s], {
        'kind': kind, 'seed': s, 'seconds': result.seconds, 'stacked_copies': len(seeds),
        'timed': timed,
        'examples': len(indices),  # the patients it saw, so a purge can find it (ids only)
        'subjects': np.unique(prep.cohort.subject_id[indices]).tolist()})
    restrict_permissions(paths[s])
  shutil.rmtree(group_dir, ignore_errors=True)  # the per-epoch checkpoints are done with


# ------------------------------------------------------------------------------ methods
def make_context(prep: Prepared, with_noisy_text=True, name='forgetmi') -> UnlearnContext:
  """What method `name` reads; the noisy reports follow its `noise` group (Forget-MI's when
  it has none)."""
  noisy = noisy_forget_tokens(prep, name) if with_noisy_text else None
  size, length = int(prep.config.data.image_size), int(prep.config.data.max_text_len)

  def init_fusion(key):
    """Fresh fusion gates, traceable inside a jitted step (XLA drops the rest of the init)."""
    ids = jnp.zeros((1, length), jnp.int32)
    return prep.model.init(key, jnp.zeros((1, size, size, 1), jnp.float32), ids,
                           jnp.ones_like(ids), train=False)['params']['fusion']
  return UnlearnContext(prep.model, prep.train_source, prep.split, noisy,
                        lambda key: init_variables(prep.model, key, size, length)['params'],
                        init_fusion, prep.text_buckets)


def noisy_forget_tokens(prep: Prepared, name='forgetmi'):
  """Noisy report copies of the forget set, drawn once per run and tokenised once."""
  group = config_lib.method_config(prep.config, name)
  noise = (group if 'noise' in group else prep.config.forgetmi).noise
  noiser = TextNoiser(noise.text_mode, float(noise.text_p), seed=int(prep.config.seed))
  return noisy_token_table(prep.source, prep.cohort, prep.split.forget_idx, noiser,
                           int(noise.num_draws), prep.tokenizer, int(prep.config.data.max_text_len))


def copies_of(config, name, seeds=None, cfgs=None):
  """The method's copies: one per seed (default the config's), each with its config group."""
  seeds = [int(config.seed)] if seeds is None else list(seeds)
  cfgs = [config_lib.method_config(config, name)] * len(seeds) if cfgs is None else list(cfgs)
  return [loop.Copy(int(s), c) for s, c in zip(seeds, cfgs)]


def run_fingerprint(prep: Prepared, name: str, copies, time_budget_s=None) -> tuple[str, dict]:
  """(key, what it hashes): everything that determines an unlearning run's result."""
  config = prep.config
  what = {'method': name, 'copies': [(c.seed, _as_run(prep, c.cfg)) for c in copies],
          'data': prep.data_key, 'model': config.model.to_dict(), 'train': config.train.to_dict(),
          'text_noise_seed': int(config.seed), 'stop': _stop_as_run(config.stop),
          'forget_idx': np.asarray(prep.split.forget_idx).tolist(),
          'retain_idx': np.asarray(prep.split.retain_idx).tolist(),
          'val_idx': np.asarray(prep.split.val_idx).tolist()}
  if time_budget_s is not None:
    what['time_budget_s'] = float(time_budget_s)
  return config_lib.fingerprint(what), what


def _stop_as_run(stop) -> dict:
  """config.stop as it runs: scores counted in the budget (the default) hash as before the
  option existed, so earlier runs still resume."""
  stop = stop.to_dict()
  if stop.get('scores_in_budget', True):
    stop.pop('scores_in_budget', None)
  return stop


def _as_run(prep: Prepared, method_cfg) -> dict:
  """A copy's config as it runs: the repair's forget rows resolved for this split and mesh
  (0 and the rows it means hash alike; another device count never resumes a run)."""
  cfg = method_cfg.to_dict()
  group = repair_group(method_cfg)
  if group is not None:
    cfg['repair']['forget_batch_size'] = forget_rows(
        group, len(prep.split.forget_idx), len(prep.split.retain_idx), prep.mesh.devices.size)
  return cfg


def run_method(prep: Prepared, original, name=None, copies=None, ckpt_root=None, ctx=None,
               **loop_kwargs) -> loop.Result:
  """Unlearn with method `name` from `original` ({'params', 'batch_stats'}): its checkpoints go
  under `<ckpt_root>/<name>/<fingerprint>` so only the same config ever resumes them."""
  name = name or prep.config.method
  copies = copies or copies_of(prep.config, name)
  repair_cfgs = [repair_group(c.cfg) for c in copies]  # checked before any long work
  if len({r is None for r in repair_cfgs}) > 1:
    raise ValueError(f'{name}: copies disagree on repair.epochs > 0')
  budget = example_budget(prep, name, copies)
  ctx = ctx or make_context(prep, name=name)
  trunk = frozen_trunk(prep, original, name, copies)
  if trunk is not None:  # every step, score and the repair read its outputs
    ctx = dataclasses.replace(ctx, source=TrunkSource(ctx.source, trunk), trunk=trunk)
  method = registry.get(name)(ctx, copies)
  key, _ = run_fingerprint(prep, name, copies, loop_kwargs.get('time_budget_s'))
  ckpt_dir = os.path.join(ckpt_root or os.path.join(prep.workdir, 'checkpoints'), name, key)
  loop_kwargs.setdefault('tb_dir', os.path.join(prep.workdir, 'tensorboard', name, key))
  loop_kwargs.setdefault('chunk_size', int(prep.config.copies_per_program))
  loop_kwargs.setdefault('checkpoint_every_s', float(prep.config.checkpoint_every_s))
  if 'stopping' not in loop_kwargs:
    loop_kwargs['stopping'] = stopping_rule(prep, original, name, trunk)
  if budget is not None:  # the push leaves the repair its share
    share = float(repair_cfgs[0].budget_share) if repair_cfgs[0] is not None else 0.0
    loop_kwargs['example_budget'] = budget * (1.0 - share)
  result = loop.run(method, original, ckpt_dir, mesh=prep.mesh, desc=f'unlearn {name}',
                    **loop_kwargs)
  steps = [sum(e['steps'] for e in h) for h in result.histories]
  stopped_at_start = result.stopping is not None and any(
      s['best_epoch'] == -1 and s['epochs_scored'] == 1 for s in result.stopping)
  if stopped_at_start:
    log.info('%s: the forget set already looks like the validation non-members (attack at '
             'chance) for some copies: they keep the original', name)
  elif method.epochs > 0 and min(steps, default=0) == 0:
    raise RuntimeError(f'{name}: no step was taken in {method.epochs} epochs (an empty forget '
                       f'or retain stream?); see {ckpt_dir}')
  if repair_cfgs[0] is not None:
    if budget is not None:
      loop_kwargs['example_budget'] = budget - result.spent
    result = run_repair(prep, original, name, ctx, copies, result, repair_cfgs, ckpt_dir,
                        loop_kwargs)
  if trunk is not None:  # its outputs were computed for this run: part of its cost
    result.seconds += trunk.seconds
  if budget is not None:
    log.info('%s: %.0f of its budget of %.0f trained examples per copy (%.3f of retraining\'s '
             '%d)', name, result.spent, budget, result.spent / retrain_examples(prep),
             retrain_examples(prep))
  result.fingerprint = key
  # A finished run records its time once: a rerun that only reloads reports the run's seconds.
  done = os.path.join(ckpt_dir, 'DONE.json')
  if os.path.exists(done):
    with open(done) as f:
      result.seconds = float(json.load(f)['seconds'])
  else:
    write_json_atomic({'seconds': result.seconds, 'fingerprint': key,
                       'examples_per_copy': result.spent}, done)
  return result


def frozen_trunk(prep: Prepared, original, name, copies):
  """The frozen trunk of the copies' `trunk` group (unlearning/trunk.py), its outputs on the
  forget, retain and validation images computed once from `original`; None when off."""
  ks = {trunk_group(c.cfg) for c in copies}
  if len(ks) > 1:
    raise ValueError(f'{name}: copies disagree on trunk ({sorted(map(str, ks))})')
  k = ks.pop()
  if k is None:
    return None
  t0 = time.time()
  cut = cut_modules(original['params'], *k)
  split = prep.split
  rows = np.unique(np.concatenate([split.forget_idx, split.retain_idx, split.val_idx]))
  outputs, row = compute_trunk(prep.model.apply, original, prep.source, rows, cut,
                               int(prep.config.eval.batch_size), desc=f'trunk {name}')
  trunk = Trunk(*k, cut, outputs, row)
  trunk.seconds = time.time() - t0
  log.info('%s: frozen trunk up to %s, outputs on %d images in %.1fs', name, ', '.join(cut),
           len(rows), trunk.seconds)
  return trunk


def retrain_examples(prep: Prepared) -> int:
  """What retraining costs in trained examples: train.epochs passes over the retain set."""
  return int(prep.config.train.epochs) * len(prep.split.retain_idx)


def example_budget(prep: Prepared, name, copies):
  """A run's example budget per copy (loop.run's `example_budget`): `<method>.budget` x what
  retraining costs, so a run's cost is set before it starts from the original's schedule and
  the retain set's size (never from a retrained model or a gap); None when the budget is 0."""
  fractions = {float(c.cfg.get('budget', 0.0)) for c in copies}
  if len(fractions) > 1:
    raise ValueError(f'{name}: copies disagree on budget ({sorted(fractions)})')
  fraction = fractions.pop()
  if not (math.isfinite(fraction) and fraction >= 0):
    raise ValueError(f'{name}.budget={fraction} must be >= 0 (a fraction of retraining\'s '
                     'cost; 0 = no budget)')
  return fraction * retrain_examples(prep) if fraction > 0 else None


def run_repair(prep: Prepared, original, name, ctx, copies, pushed: loop.Result, repair_cfgs,
               ckpt_dir, loop_kwargs) -> loop.Result:
  """Forget-MI+'s second phase (unlearning/repair.py) from each copy's pushed model, on the
  same loop and stopping rule; its checkpoints sit beside the push's (`<fingerprint>.repair`).
  Returns one Result for both phases: the repaired variables, both phases' seconds, the
  histories and scores of both (repair rows marked `phase: 'repair'`)."""
  names = [f'copy{j}' for j in range(len(repair_cfgs))]
  repair_copies = [loop.Copy(c.seed, r, n) for c, r, n in zip(copies, repair_cfgs, names)]
  method = RepairMethod(ctx, repair_copies, {n: s.variables for n, s in zip(names, pushed.states)},
                        batch_size=int(prep.config.eval.batch_size),
                        num_devices=prep.mesh.devices.size)
  kwargs = dict(loop_kwargs)
  stopping = kwargs.get('stopping')
  score_cost = loop.SCORE_COST * stopping.score_rows if stopping is not None else 0.0
  if kwargs.get('example_budget') is not None and kwargs['example_budget'] <= score_cost:
    log.info('repair %s: the push left no budget for it (%.0f trained examples per copy)',
             name, kwargs['example_budget'])
    return pushed
  if kwargs.get('tb_dir'):
    kwargs['tb_dir'] = os.path.join(kwargs['tb_dir'], 'repair')
  if pushed.stopping is not None and stopping is not None:  # its start: the push's selection
    kwargs['start_scores'] = [best_scores(s) for s in pushed.stopping]
  repaired = loop.run(method, original, ckpt_dir + '.repair', mesh=prep.mesh,
                      desc=f'repair {name}', **kwargs)
  mark = lambda rows: [dict(r, phase='repair') for r in rows]  # noqa: E731
  stops = None
  if pushed.stopping is not None:
    stops = [dict(p, repair_epoch=r['best_epoch'], best_score=r['best_score'],
                  epochs_scored=p['epochs_scored'] + r['epochs_scored'],
                  stopped=r['stopped'], scores=p['scores'] + mark(r['scores']))
             for p, r in zip(pushed.stopping, repaired.stopping)]
  return loop.Result(repaired.states, pushed.seconds + repaired.seconds,
                     [h + mark(r) for h, r in zip(pushed.histories, repaired.histories)],
                     pushed.memory, resumed_from=pushed.resumed_from + repaired.resumed_from,
                     stopping=stops, spent=pushed.spent + repaired.spent)


def best_scores(stop: dict) -> dict:
  """The scores of a run's selected model from its stopping record: the best epoch's, or with
  a repair phase the repair's best epoch's."""
  phase = 'repair' if 'repair_epoch' in stop else None
  epoch = stop['repair_epoch'] if phase else stop['best_epoch']
  return next((r for r in stop['scores'] if r.get('phase') == phase and r['epoch'] == epoch),
              {'val_gap': float('inf')})


def stop_summary(stop: dict | None) -> dict | None:
  """What reports keep of a stopping record: best epoch (and the repair's), score, epochs."""
  if stop is None:
    return None
  keys = ('best_epoch', 'best_score', 'epochs_scored', 'repair_epoch')
  return {k: stop[k] for k in keys if k in stop}


def epochs_run(stop: dict) -> int:
  """Epochs a stopped run trained over its phases (each phase scores its start once)."""
  return stop['epochs_scored'] - (2 if 'repair_epoch' in stop else 1)


def stopping_rule(prep: Prepared, original, name, trunk=None):
  """`config.stop`: every method ends at the epoch whose validation gap (forget vs validation
  non-members, evaluation/validation.py) is lowest, or runs its epochs ('none'). With a
  frozen `trunk` the scores read its cached outputs (the same numbers, a fraction of the cost)."""
  rule = prep.config.stop
  if rule.rule == 'none' or config_lib.method_config(prep.config, name).get('fixed_schedule'):
    return None
  if len(prep.split.val_idx) == 0:
    raise ValueError('stop.rule=validation needs validation non-members, and this split has '
                     'none (data.val_fraction=0, or a forget request): set --config.stop.rule=none')
  monitor = validation_monitor(prep, original, trunk)
  done = (lambda scores: monitor.at_chance(scores, float(rule.z))) if rule.at_chance else None
  return loop.Stopping(monitor, patience=int(rule.patience), min_delta=float(rule.min_delta),
                       done_fn=done,
                       score_rows=monitor.rows if rule.get('scores_in_budget', True) else 0)


def validation_monitor(prep: Prepared, original, trunk=None):
  """The validation gap of variables (forget vs validation non-members, against `original`)."""
  config = prep.config
  source = prep.source if trunk is None else TrunkSource(prep.source, trunk)
  monitor = ValidationMonitor(prep.model.apply, source, prep.split, prep.cohort.labels,
                              head=config.eval.head, batch_size=int(config.eval.batch_size),
                              attack=config.stop.attack,
                              retain_images=int(config.stop.retain_images),
                              seed=int(config.eval.mia_seed))
  monitor.set_reference(original)
  return monitor


def log_eval_metrics(prep: Prepared, results: dict):
  """The evaluation metrics of a run's models as TensorBoard scalars (`eval/<model>/<metric>`)."""
  numbers = {m: {k: v for k, v in r.items() if isinstance(v, (int, float)) and
                 not isinstance(v, bool)} for m, r in results.items()}
  with EventWriter(os.path.join(prep.workdir, 'tensorboard', 'eval')) as writer:
    writer.scalars(0, {'eval': numbers}, strict=False)
