"""The shared unlearning loop and what every method gets to see.

A method supplies its hyperparameters, its pure jitted step and (optionally) its own epoch
plan; the loop, checkpointing, resumption and progress are written once, here.
"""
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax.train import parallel
from forgetmi_jax.train.checkpoints import Checkpoints
from forgetmi_jax.train.state import TrainState, make_optimizer


@dataclasses.dataclass
class UnlearnContext:
  """Everything a method may read: the model, data, split and devices (no mutable state)."""
  config: Any  # the full ml_collections config
  model: Any
  source: Any  # the pipeline's example source (cohort + tokens)
  split: Any  # ForgetSplit
  retain_sampler: Any
  mesh: Any
  noisy_tokens: Any = None  # forget-set noisy tokens for Forget-MI
  init_params: Callable | None = None  # key -> fresh params (EU-k, reference quirk 8.1)

  @property
  def apply_fn(self):
    return self.model.apply


class Method:
  """Base class: Forget-MI and the baselines override what differs."""
  name = 'method'
  frozen = ()  # top-level submodules that must not change (e.g. the heads)

  def __init__(self, ctx: UnlearnContext, method_cfg):
    self.ctx, self.cfg = ctx, method_cfg

  # -- what the loop calls -------------------------------------------------------------------
  @property
  def epochs(self):
    return int(self.cfg.epochs)

  def frozen_mask(self, params):
    """A bool pytree of leaves that must not change, or None to freeze `frozen` modules."""
    return None

  def make_tx(self, params):
    return make_optimizer(params, float(self.cfg.lr), weight_decay=float(self.cfg.weight_decay),
                          eps=float(self.cfg.get('adam_eps', 1e-6)), frozen=self.frozen,
                          frozen_mask=self.frozen_mask)

  def init_state(self, original_state):
    params = jax.tree_util.tree_map(jnp.array, original_state.params)
    stats = jax.tree_util.tree_map(jnp.array, original_state.batch_stats)
    rng = jax.random.fold_in(jax.random.PRNGKey(int(self.ctx.config.seed)), 7919)
    return TrainState.create(params, stats, self.make_tx(params), rng)

  def hparams(self):
    return {}

  def epoch_batches(self, epoch):
    from forgetmi_jax.data.pipeline import unlearning_batches
    return unlearning_batches(self.ctx.source, self.ctx.split.forget_idx, self.ctx.retain_sampler,
                              epoch, int(self.cfg.batch_size),
                              noisy_tokens=self.ctx.noisy_tokens,
                              seed=int(self.ctx.config.seed))

  def prepare(self, original_state):
    """Once before the first epoch (e.g. cache the frozen original's outputs)."""

  def start_epoch(self, epoch, hparams, original_state):
    return hparams

  def prepare_batch(self, batch, epoch):
    return batch

  def step(self, state, original_state, batch, rng, hparams):
    raise NotImplementedError

  def end_epoch(self, epoch, state, hparams, last_metrics):
    return state, hparams

  def step_rng(self, epoch, index):
    root = jax.random.PRNGKey(int(self.ctx.config.seed))
    return jax.random.fold_in(jax.random.fold_in(root, 104729 + epoch), index)


def run_unlearning(method: Method, original_state, ckpt_dir: str, desc: str = 'unlearn'):
  """Run `method` from the original model; per-epoch checkpoints; resumes after a kill.

  Returns (final state on host, seconds spent in this call, per-epoch history).
  """
  mesh = method.ctx.mesh
  state = method.init_state(original_state)
  hparams = method.hparams()
  ckpt = Checkpoints(ckpt_dir)
  start, history = 0, []
  if ckpt.latest_epoch() is not None:
    state, extra = ckpt.restore(state)
    start = ckpt.latest_epoch() + 1
    history = list(extra.get('history', [])) if extra else []
    if extra and 'hparams' in extra:
      hparams.update({k: np.asarray(v, dtype=np.asarray(hparams[k]).dtype)
                      if k in hparams and not _is_key(hparams[k]) else v
                      for k, v in extra['hparams'].items()})
  t0 = time.time()
  original = parallel.replicate(original_state, mesh)
  state = parallel.replicate(state, mesh)
  if start < method.epochs:
    method.prepare(original)
  with tqdm(total=method.epochs, initial=start, desc=desc, unit='epoch',
            dynamic_ncols=True) as bar:
    for epoch in range(start, method.epochs):
      hparams = method.start_epoch(epoch, hparams, original)
      metrics, n = None, 0
      for i, batch in enumerate(method.epoch_batches(epoch)):
        batch = method.prepare_batch(batch, epoch)
        state, metrics = method.step(state, original, parallel.shard_batch(batch, mesh),
                                     method.step_rng(epoch, i), hparams)
        n += 1
      last = {k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {}
      state, hparams = method.end_epoch(epoch, state, hparams, last)
      history.append({'epoch': epoch, 'steps': n, **last})
      ckpt.save(epoch, state, extra={'history': history,
                                     'hparams': _jsonable(hparams)})
      bar.set_postfix({k: f'{v:.3f}' for k, v in list(last.items())[:5]})
      bar.update(1)
  ckpt.close()
  return jax.device_get(state), time.time() - t0, history


def _is_key(x):
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _jsonable(hparams):
  out = {}
  for k, v in hparams.items():
    if _is_key(v):
      continue
    a = np.asarray(jax.device_get(v))
    if a.dtype.kind in 'fiub':
      out[k] = a.tolist()
  return out
