"""Many Forget-MI settings in one jitted program: vmap over stacked model copies.

Why: an ablation grid (loss weights x image noise x lr x seed) trains the same model shape many
times. Settings that share a compiled shape run together: their TrainStates (params,
batch_stats, opt_state with the lr injected per copy) are stacked on a leading axis and one
`jax.vmap`ped step updates all copies, so the grid pays one compilation, one data pass and one
frozen-original forward instead of one per setting.

What is shared and what is per copy:
- the batch (in_axes None): every copy sees the same forget/retain examples;
- the step rng (in_axes None): settings are grouped by seed (one program run per seed group,
  the same compiled program for every group), because the seed sets the data order, the retain
  sample, the dropout masks and the image-noise draws (REFERENCE 4), all shared inside a group;
- the frozen original's retain targets: computed once per group (they do not depend on the
  setting); its forget targets depend on the noise (mu, sigma), so they are computed once per
  distinct noise setting and each copy picks its own by index (`noise_index`);
- per copy: loss_weights [S, 4], noise mu/sigma [S], retention_cap [S, 2], the learning rate
  (inside opt_state, via `set_learning_rate`, read back by `with_learning_rate`).

The per-setting objects are the normal `ForgetMIMethod`s (their hparams, epoch plan, step rngs
and cached targets), so a copy's trajectory is the one `run_unlearning` gives for that setting,
to float rounding of the batched ops (tests/test_ablation.py checks it).

Requires the cached-target path (eval-mode original, no fresh random gates: REFERENCE 8.1/8.4
give per-step original outputs that differ by setting); use the sequential mode for those.

Memory: `estimate_memory` compiles the step for 1 and 2 copies (abstract inputs, nothing runs)
and reads XLA's `memory_analysis()` (arguments + outputs + temporaries - aliased). The
difference is the bytes one more copy costs (its params, batch stats, AdamW moments, gradients
and activations), the rest is fixed (the frozen original, the batch, the cached targets);
`plan_chunks` fits as many copies as `budget - fixed` allows, in equal chunks.
"""
import copy
import dataclasses
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from forgetmi_jax.train import parallel
from forgetmi_jax.train.state import set_learning_rate

LOSS_KEYS = ('ur', 'uu', 'mu', 'mr')


# ------------------------------------------------------------------------------ settings
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
            'weights': dict(zip(LOSS_KEYS, map(float, self.weights))),
            'noise': None if self.no_noise else {'mu': float(self.mu), 'sigma': float(self.sigma)},
            'lr': float(self.lr), 'seed': int(self.seed)}

  def method_config(self, unlearn_cfg):
    """A copy of `config.unlearn` with this setting's weights, noise and lr."""
    cfg = copy.deepcopy(unlearn_cfg)
    with cfg.unlocked():
      cfg.setting = self.name
      for k, v in zip(LOSS_KEYS, self.weights):
        cfg.loss_weights[k] = float(v)
      if not self.no_noise:
        cfg.noise.image_mu = float(self.mu)
        cfg.noise.image_sigma = float(self.sigma)
      cfg.lr = float(self.lr)
    return cfg


def expand_grid(ablation_cfg, presets=None) -> list:
  """settings x noise x lr x seed, in that nesting order. no_noise ignores the image noise, so
  it appears once per (lr, seed) instead of once per noise setting."""
  if presets is None:
    from configs.base import LOSS_WEIGHT_PRESETS as presets
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
    w = tuple(float(presets[name][k]) for k in LOSS_KEYS)
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


def seeded_context(ctx, seed: int):
  """The context a run with `config.seed = seed` would get for unlearning: the seed drives the
  unlearning data order, retain sample, dropout and image noise. The cohort, forget split,
  original/retrained models and noisy report copies stay those of the run's own seed."""
  if int(seed) == int(ctx.config.seed):
    return ctx
  from forgetmi_jax.data.forget_sets import RetainSampler
  config = copy.deepcopy(ctx.config)
  with config.unlocked():
    config.seed = int(seed)
  sampler = RetainSampler(ctx.source.cohort.subject_id, ctx.split.retain_idx,
                          ctx.split.forget_subjects, seed=int(seed))
  return dataclasses.replace(ctx, config=config, retain_sampler=sampler)


def make_method(ctx, unlearn_cfg, setting):
  from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
  return ForgetMIMethod(seeded_context(ctx, setting.seed), setting.method_config(unlearn_cfg))


# ------------------------------------------------------------------------------ programs
def _injected(s):
  return isinstance(s, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def learning_rates(opt_state):
  """Every injected learning rate in an optimiser state (to verify a change took effect)."""
  found = []
  jax.tree.map(lambda s: found.append(s.hyperparams['learning_rate']) if _injected(s) else None,
               opt_state, is_leaf=_injected)
  return [float(v) for x in found for v in np.ravel(np.asarray(x))]


def with_learning_rate(opt_state, lr):
  """`set_learning_rate`, checked: optax >= 0.2 keeps injected hyperparameters in an
  InjectStatefulHyperparamsState, which train.state.set_learning_rate (looking for
  InjectHyperparamsState only) leaves unchanged. A grid must never silently train every copy
  at the base lr, so both state classes are handled and the result is read back."""
  out = set_learning_rate(opt_state, lr)
  if not np.allclose(learning_rates(out), float(lr), rtol=1e-6):
    def visit(s):
      if not _injected(s):
        return s
      hp = dict(s.hyperparams)
      hp['learning_rate'] = jnp.asarray(lr, dtype=jnp.asarray(hp['learning_rate']).dtype)
      return s._replace(hyperparams=hp)
    out = jax.tree.map(visit, opt_state, is_leaf=_injected)
  rates = learning_rates(out)
  if not rates or not np.allclose(rates, float(lr), rtol=1e-6):
    raise ValueError(f'could not set the learning rate to {lr} (found {rates}): the optimiser '
                     'needs optax.inject_hyperparams (train.state.make_optimizer)')
  return out


def stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack(tree, n):
  return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def _select_forget_targets(forget_targets, noise_index):
  """[B, N, K, D] per distinct noise setting -> [S, B, K, D] per copy."""
  return {k: jnp.moveaxis(jnp.take(v, noise_index, axis=1), 1, 0)
          for k, v in forget_targets.items()}


class VmappedForgetMI:
  """The jitted multi-copy programs for one static configuration (one compile per chunk size).

  step(states, original_params, original_batch_stats, batch, noise_index, rng, hparams)
    -> (states, metrics [S]);  batch = {'forget', 'retain', 'targets' (retain targets, shared),
    'forget_targets' (batch-first [B, N, K, D])}; states and hparams stacked on axis 0.
  grads(...) same inputs -> (grads, batch_stats, metrics) and apply(states, grads) for the
  epoch-accumulation quirk (REFERENCE 8.2).
  """

  def __init__(self, apply_fn, *, num_draws=1):
    from forgetmi_jax.unlearning.forgetmi import make_grads_fn
    # Targets always come cached in the batch, so the noise flags of the live path are unused.
    grads_fn = make_grads_fn(apply_fn, num_draws=num_draws)

    def one(state, op, ob, batch, ft, rng, hp):
      b = {'forget': batch['forget'], 'retain': batch['retain'],
           'targets': dict(batch['targets'], **ft)}
      return grads_fn(state, op, ob, b, rng, hp)

    def multi_grads(states, op, ob, batch, noise_index, rng, hp):
      ft = _select_forget_targets(batch['forget_targets'], noise_index)
      return jax.vmap(one, in_axes=(0, None, None, None, 0, None, 0))(
          states, op, ob, batch, ft, rng, hp)

    def multi_apply(states, grads, stats=None):
      if stats is None:
        return jax.vmap(lambda s, g: s.apply_gradients(g))(states, grads)
      return jax.vmap(lambda s, g, st: s.apply_gradients(g, batch_stats=st))(states, grads, stats)

    def multi_step(states, op, ob, batch, noise_index, rng, hp):
      grads, stats, metrics = multi_grads(states, op, ob, batch, noise_index, rng, hp)
      return multi_apply(states, grads, stats), metrics

    self.tx = None  # the optimiser every state run by this program shares (GroupRun sets it)
    # Donating the stacked states lets XLA update them in place (not implemented on CPU).
    donate = (0,) if jax.default_backend() != 'cpu' else ()
    self.step = jax.jit(multi_step, donate_argnums=donate)
    self.grads = jax.jit(multi_grads)
    self.apply = jax.jit(multi_apply, donate_argnums=donate)


def _abstract(tree, copies=None):
  def f(x):
    x = jnp.asarray(x) if not hasattr(x, 'shape') else x
    shape = tuple(x.shape) if copies is None else (copies,) + tuple(x.shape)
    return jax.ShapeDtypeStruct(shape, x.dtype)
  return jax.tree.map(f, tree)


def program_bytes(compiled):
  """Peak-ish device bytes of a compiled program: arguments + outputs + temporaries - aliases."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)


def estimate_memory(program, state, original_state, batch, hparams):
  """{'per_copy_bytes', 'fixed_bytes'} from compiling `program.step` for 1 and 2 copies.

  `state`/`hparams` are one copy's; `batch` a prepared step batch. Nothing is executed.
  The inputs carry no sharding, so on a data-parallel mesh this is the one-device program:
  the batch-dependent part is over-counted per device (a conservative estimate).
  Linear in the copies (checked: 1, 2 and 4 copies of the tiny model give 15.8, 31.2 and
  61.9 MB on CPU, i.e. 0.5 MB + 15.35 MB per copy).
  """
  # On CPU, LLVM codegen is most of the compile time and does not change XLA's buffer
  # assignment, so the measurement compiles without it (same numbers, about half the time).
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  measured = {}
  for c in (1, 2):
    args = (_abstract(state, c), _abstract(original_state.params),
            _abstract(original_state.batch_stats), _abstract(batch),
            jax.ShapeDtypeStruct((c,), jnp.int32), _abstract(jax.random.PRNGKey(0)),
            _abstract(hparams, c))
    measured[c] = program_bytes(program.step.lower(*args).compile(compiler_options=options))
  if measured[1] is None or measured[2] is None:
    return None
  per_copy = max(measured[2] - measured[1], 1)
  return {'per_copy_bytes': int(per_copy), 'fixed_bytes': int(max(measured[1] - per_copy, 0)),
          'measured_bytes': {str(k): v for k, v in measured.items()}}


def plan_chunks(n, per_copy_bytes=None, fixed_bytes=0, budget_bytes=None, chunk_size=0):
  """Split n settings into equal-size chunks (sizes differ by at most 1; the runner pads the
  smaller ones to the largest size so every chunk reuses one compiled program).

  chunk_size > 0 forces the size; otherwise as many copies as fit in `budget_bytes` given the
  measured per-copy and fixed bytes (at least 1, even when one copy exceeds the budget).
  """
  if n <= 0:
    return []
  if chunk_size and int(chunk_size) > 0:
    cap = int(chunk_size)
  elif per_copy_bytes and budget_bytes:
    cap = int((float(budget_bytes) - float(fixed_bytes)) // float(per_copy_bytes))
  else:
    cap = n
  cap = max(1, min(cap, n))
  chunks = math.ceil(n / cap)
  return [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]


# ------------------------------------------------------------------------------ running
def _check_compatible(methods):
  """Settings in one program must share everything that is compiled in (static flags)."""
  m0 = methods[0]
  for m in methods:
    if not m.cached:
      raise ValueError('the vmapped grid needs the cached original outputs (eval-mode '
                       'original, no random fusion gates, unlearn.cache_original_outputs=True); '
                       "use ablation.mode='sequential' for the reference quirks 8.1/8.4")
    for attr in ('accumulate', 'cap', 'replay', 'resample'):
      if getattr(m, attr) != getattr(m0, attr):
        raise ValueError(f'settings disagree on {attr}; they cannot share a program')
    if int(m.static['num_draws']) != int(m0.static['num_draws']):
      raise ValueError('settings disagree on noise.num_draws')
    if int(m.cfg.epochs) != int(m0.cfg.epochs) or int(m.cfg.batch_size) != int(m0.cfg.batch_size):
      raise ValueError('settings disagree on epochs / batch size')


class GroupRun:
  """One seed group's settings, set up once for any number of vmapped chunks.

  The frozen original's targets (retain: once; forget: once per distinct noise setting, again
  each epoch only when the noise is resampled) are computed here and shared by every chunk.
  """

  def __init__(self, ctx, unlearn_cfg, settings: Sequence[Setting], original_state):
    if len({s.seed for s in settings}) != 1:
      raise ValueError('a vmapped group must share one seed (it shares the data order)')
    self.ctx = ctx
    self.settings = list(settings)
    self.methods = [make_method(ctx, unlearn_cfg, s) for s in settings]
    _check_compatible(self.methods)
    self.lead = self.methods[0]
    keys = [s.noise_key for s in settings]
    self.noise_keys = list(dict.fromkeys(keys))
    self.noise_methods = {k: self.methods[keys.index(k)] for k in self.noise_keys}
    self.noise_index = np.asarray([self.noise_keys.index(k) for k in keys], np.int32)
    self.num_draws = int(self.lead.static['num_draws'])
    self.original_host = original_state
    self.original = None
    self.epochs = self.lead.epochs
    self.prepare_seconds = 0.0
    self._base = None

  # -- the frozen original's outputs ----------------------------------------------------------
  def prepare(self):
    """Retain targets once (setting-independent); every noise method shares them."""
    t0 = time.time()
    self.original = parallel.replicate(self.original_host, self.ctx.mesh)
    self.lead.prepare(self.original)
    for m in self.noise_methods.values():
      if m is not self.lead:
        m.targets = {'retain': self.lead.targets['retain']}
    self.noise_hp = {k: m.hparams() for k, m in self.noise_methods.items()}
    self.start_epoch(0)
    self.prepare_seconds = time.time() - t0

  def start_epoch(self, epoch):
    """Forget targets per distinct noise setting (recomputed only when noise is resampled)."""
    for k, m in self.noise_methods.items():
      self.noise_hp[k] = m.start_epoch(epoch, self.noise_hp[k], self.original)

  def step_batch(self, batch, epoch):
    """The shared batch: forget/retain, the retain targets and [B, N, K, D] forget targets."""
    per_noise = [self.noise_methods[k].prepare_batch(batch, epoch)['targets']
                 for k in self.noise_keys]
    forget_targets = {}
    for name in ('forget_uni', 'forget_joint'):
      parts = []
      for t in per_noise:
        x = np.asarray(t[name])  # [B, K, D]; the clean (no_noise) targets have K = 1
        if x.shape[1] != self.num_draws:
          x = np.repeat(x, self.num_draws // x.shape[1], axis=1)
        parts.append(x)
      forget_targets[name] = np.stack(parts, axis=1)
    retain = per_noise[0]
    return {'forget': batch['forget'], 'retain': batch['retain'],
            'targets': {'retain_uni': retain['retain_uni'],
                        'retain_joint': retain['retain_joint']},
            'forget_targets': forget_targets}

  # -- copies ---------------------------------------------------------------------------------
  def base_state(self, program=None):
    """The original as a fresh unlearning state. Its optimiser object is the program's (one
    per program): the optimiser is static pytree data, so a new but equal one would retrace
    and recompile the step for every chunk and seed group."""
    if self._base is None:
      self._base = self.lead.init_state(self.original_host)
    if program is not None:
      if program.tx is None:
        program.tx = self._base.tx
      self._base = self._base.replace(tx=program.tx)
    return self._base

  def initial(self, indices, program=None):
    """(stacked states, stacked hparams): every copy starts as the original with its own lr."""
    base = self.base_state(program)
    states = [base.replace(opt_state=with_learning_rate(base.opt_state, self.settings[i].lr))
              for i in indices]
    return stack(states), stack([self.methods[i].hparams() for i in indices])

  def example(self):
    """One copy's state and hparams and a prepared first batch (for `estimate_memory`)."""
    if self.original is None:
      self.prepare()
    batch = self.step_batch(next(iter(self.lead.epoch_batches(0))), 0)
    return self.base_state(), batch, self.lead.hparams()

  def run_chunk(self, indices, program, pad_to=None, desc='grid', position=1):
    """Train the settings at `indices` together; returns (host states, seconds, histories).

    `pad_to`: repeat the last setting up to this many copies so every chunk has the same
    shape and reuses one compiled program (the padded copies' results are dropped).
    `seconds` is the chunk's wall time (its epochs and compile; not the shared targets).
    """
    if self.original is None:
      self.prepare()
    indices = list(indices)
    real = len(indices)
    if pad_to and pad_to > real:
      indices = indices + [indices[-1]] * (pad_to - real)
    n, lead, ctx = len(indices), self.lead, self.ctx
    t0 = time.time()
    states, hparams = self.initial(indices, program)
    states = parallel.replicate(states, ctx.mesh)
    noise_index = jnp.asarray(self.noise_index[indices])
    histories = [[] for _ in range(real)]
    acc = None
    for epoch in tqdm(range(self.epochs), desc=desc, unit='epoch', leave=False,
                      position=position, dynamic_ncols=True):
      if epoch > 0:
        self.start_epoch(epoch)
      hparams = dict(hparams, epoch=jnp.full((n,), epoch, jnp.int32))
      metrics, steps = None, 0
      for i, batch in enumerate(lead.epoch_batches(epoch)):
        b = parallel.shard_batch(self.step_batch(batch, epoch), ctx.mesh)
        rng = lead.step_rng(epoch, i)
        if lead.accumulate:
          grads, stats, metrics = program.grads(states, self.original.params,
                                                self.original.batch_stats, b, noise_index, rng,
                                                hparams)
          acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
          states = states.replace(batch_stats=stats)
        else:
          states, metrics = program.step(states, self.original.params,
                                         self.original.batch_stats, b, noise_index, rng, hparams)
        steps += 1
      last = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()} if metrics else {}
      if lead.accumulate:  # REFERENCE 8.2: one step per epoch on summed grads, none in epoch 0
        if epoch > 0 and acc is not None:
          states = program.apply(states, acc)
        acc = None
      if lead.cap and epoch == 0:  # REFERENCE 8.3, per copy
        from forgetmi_jax.unlearning.forgetmi import NO_CAP
        cap = np.stack([last.get('ur', np.full(n, NO_CAP)) + 1.0,
                        last.get('mr', np.full(n, NO_CAP)) + 1.0], axis=1)
        hparams = dict(hparams, retention_cap=jnp.asarray(cap, jnp.float32))
      for j in range(real):
        histories[j].append({'epoch': epoch, 'steps': steps,
                             **{k: float(v[j]) for k, v in last.items()}})
    if self.epochs > 1 and self.lead.resample:
      self.start_epoch(0)  # the next chunk starts from epoch 0's targets again
    host = unstack(jax.device_get(states), n)[:real]
    return host, time.time() - t0, histories


def run_sequential(ctx, unlearn_cfg, setting, original_state, ckpt_dir, desc='setting'):
  """One setting through the normal ForgetMIMethod + run_unlearning (the debugging path)."""
  from forgetmi_jax.unlearning.common import run_unlearning
  method = make_method(ctx, unlearn_cfg, setting)
  return run_unlearning(method, original_state, ckpt_dir, desc=desc)
