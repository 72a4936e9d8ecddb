"""Optimisers and the masks that say which parameters move.

Every optimiser injects its learning rate as a hyperparameter (`optax.inject_hyperparams`), so
stacked copies carry their own rate inside their optimiser state and a grid of rates reuses one
compiled step; frozen leaves get an exact zero update (the heads stay bit-identical).
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

HEAD_NAMES = ('image_head', 'text_head', 'joint_head')


def path_names(path):
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def decay_mask(params):
  """Weight decay on kernels and embeddings only: not on biases, LayerNorm or BatchNorm."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_names(path)[-1] in ('kernel', 'embedding'), params)


def prefix_mask(params, prefixes: Sequence[str]):
  """True for leaves under any of the top-level submodules named in `prefixes`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_names(path)[0] in prefixes,
                                          params)


def _frozen(chain, frozen_mask):
  if frozen_mask is not None:
    chain.append(optax.masked(optax.set_to_zero(), frozen_mask))
  return optax.chain(*chain)


def adamw(lr, weight_decay=0.01, eps=1e-6, frozen_mask=None, b1=0.9, b2=0.999):
  """AdamW (decay off biases and norms) with an injected learning rate (a float or schedule)."""
  chain = [optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
      learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)]
  return _frozen(chain, frozen_mask)


def sgd(lr, momentum=0.9, weight_decay=0.0, frozen_mask=None):
  """SGD (+ momentum, + L2 on kernels/embeddings only), as in the SCRUB code base."""
  chain = []
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  chain.append(optax.inject_hyperparams(optax.sgd, static_args=('momentum', 'nesterov'))(
      learning_rate=lr, momentum=float(momentum) or None))
  return _frozen(chain, frozen_mask)


def from_config(cfg, frozen_mask=None, lr=None):
  """The optimiser a method's config group names: `optimizer` 'adamw' (default) or 'sgd'."""
  kind = str(cfg.get('optimizer', 'adamw'))
  lr = float(cfg.lr) if lr is None else lr
  if kind == 'sgd':
    return sgd(lr, float(cfg.get('momentum', 0.9)), float(cfg.weight_decay), frozen_mask)
  if kind == 'adamw':
    return adamw(lr, float(cfg.weight_decay), float(cfg.get('adam_eps', 1e-6)), frozen_mask)
  raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")


def _injected(s):
  return isinstance(s, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def set_learning_rate(opt_state, lr):
  """opt_state with every injected learning rate replaced by `lr` (works under vmap).

  optax keeps injected hyperparameters in an InjectStatefulHyperparamsState (older versions:
  InjectHyperparamsState); both are handled, and a state without one is an error, so a copy can
  never silently train at another rate.
  """
  found = []

  def visit(s):
    if not _injected(s):
      return s
    found.append(s)
    hp = dict(s.hyperparams)
    hp['learning_rate'] = jnp.asarray(lr, dtype=jnp.asarray(hp['learning_rate']).dtype)
    return s._replace(hyperparams=hp)
  out = jax.tree_util.tree_map(visit, opt_state, is_leaf=_injected)
  if not found:
    raise ValueError('the optimiser state has no injected learning rate '
                     '(build it with forgetmi_jax.train.optim)')
  return out


def learning_rates(opt_state):
  """Every injected learning rate in an optimiser state, as floats."""
  found = []
  jax.tree_util.tree_map(
      lambda s: found.append(s.hyperparams['learning_rate']) if _injected(s) else None,
      opt_state, is_leaf=_injected)
  return [float(v) for x in found for v in jnp.ravel(jnp.asarray(x))]


def freeze_mask(params, frozen_modules: Sequence[str] = (),
                trainable: Callable | None = None):
  """Bool pytree, True where a leaf must not move: under a `frozen_modules` prefix, or outside
  `trainable(params)` (a mask, or None for all). None when nothing is frozen."""
  frozen = prefix_mask(params, frozen_modules) if frozen_modules else None
  trained = trainable(params) if trainable is not None else None
  if trained is not None:
    not_trained = jax.tree_util.tree_map(lambda t: not t, trained)
    frozen = not_trained if frozen is None else jax.tree_util.tree_map(
        lambda f, n: f or n, frozen, not_trained)
  if frozen is not None and not any(jax.tree_util.tree_leaves(frozen)):
    return None
  return frozen
