"""The train state: everything a step changes, as one pytree (what a checkpoint holds)."""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """params, BatchNorm statistics, optimiser state and the step count of one model copy.

  `grad_acc` holds summed gradients for methods that step once per epoch (REFERENCE 8.2);
  None otherwise. Copies are stacked on a leading axis by the loop (train/loop.py); all copies
  share one `tx` object (static data: an equal but new one would recompile the step).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  grad_acc: Any = None
  tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, variables, tx, accumulate: bool = False):
    """A fresh state from `{'params', 'batch_stats'}` (copied, so the source stays intact)."""
    params = jax.tree_util.tree_map(jnp.array, variables['params'])
    stats = jax.tree_util.tree_map(jnp.array, variables['batch_stats'])
    acc = jax.tree_util.tree_map(jnp.zeros_like, params) if accumulate else None
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
               opt_state=tx.init(params), grad_acc=acc, tx=tx)

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def apply_gradients(self, grads, **changes):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def accumulate(self, grads, **changes):
    return self.replace(grad_acc=jax.tree_util.tree_map(jnp.add, self.grad_acc, grads),
                        **changes)

  def apply_accumulated(self):
    """One optimiser step on the summed gradients, then start a new sum."""
    state = self.apply_gradients(self.grad_acc)
    return state.replace(grad_acc=jax.tree_util.tree_map(jnp.zeros_like, self.grad_acc))

  def checkpoint_items(self):
    items = dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                 opt_state=self.opt_state, grad_acc=self.grad_acc)
    return {k: v for k, v in items.items() if v is not None}

  def restore_items(self, items):
    return self.replace(**items)
