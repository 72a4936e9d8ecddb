"""Train state with BatchNorm statistics and an explicit rng, and the shared optimiser."""
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

HEAD_NAMES = ('image_head', 'text_head', 'joint_head')


class TrainState(struct.PyTreeNode):
  """Everything a step changes, as one pytree (what a checkpoint holds)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, batch_stats, tx, rng):
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), rng=rng, tx=tx)

  def apply_gradients(self, grads, **changes):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def checkpoint_items(self):
    return dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                opt_state=self.opt_state, rng=self.rng)

  def restore_items(self, items):
    return self.replace(**items)


def _path_names(path):
  return [getattr(k, 'key', getattr(k, 'name', str(k))) for k in path]


def decay_mask(params):
  """Weight decay on kernels and embeddings only: not on biases, LayerNorm or BatchNorm."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_names(path)[-1] in ('kernel', 'embedding'), params)


def prefix_mask(params, prefixes: Sequence[str]):
  """True for leaves under any of the top-level submodules named in `prefixes`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_names(path)[0] in prefixes, params)


def make_optimizer(params, lr, weight_decay=0.01, eps=1e-6, frozen: Sequence[str] = (),
                   frozen_mask: Callable | None = None, b1=0.9, b2=0.999,
                   clip_norm: float | None = None):
  """AdamW with the learning rate as an injected hyperparameter (so grids can vary it
  without recompiling) and exact zero updates for frozen submodules (heads stay bit-identical)."""
  chain = []
  if clip_norm:
    chain.append(optax.clip_by_global_norm(clip_norm))
  chain.append(optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
      learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  mask = frozen_mask(params) if frozen_mask is not None else None
  if mask is None and frozen:
    mask = prefix_mask(params, frozen)
  if mask is not None:
    chain.append(optax.masked(optax.set_to_zero(), mask))
  return optax.chain(*chain)


def set_learning_rate(opt_state, lr):
  """Return opt_state with the injected learning rate replaced (works under vmap)."""
  def visit(s):
    if isinstance(s, optax.InjectHyperparamsState):
      hp = dict(s.hyperparams)
      hp['learning_rate'] = jnp.asarray(lr, dtype=jnp.asarray(hp['learning_rate']).dtype)
      return s._replace(hyperparams=hp)
    return s
  return jax.tree_util.tree_map(
      visit, opt_state, is_leaf=lambda s: isinstance(s, optax.InjectHyperparamsState))
