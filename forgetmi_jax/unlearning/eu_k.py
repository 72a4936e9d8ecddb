"""EU-k (Goel et al. 2022, "exact unlearning of the last k layers"): re-initialise the last k
blocks and everything downstream, keep the rest frozen, retrain them on the retain set.

Same blocks and loss as CF-k (see cf_k.py); the re-initialised leaves take a fresh model
init (`ctx.init_params`, key from the copy's seed) and their BatchNorm running statistics
restart at flax's init (mean 0, variance 1), so nothing in them comes from the original.
"""
import jax
import jax.numpy as jnp

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.train.optim import path_names
from forgetmi_jax.unlearning.cf_k import CFkMethod


def reinitialise(params, batch_stats, fresh_params, trainable_fn):
  """Params with the trainable leaves taken from `fresh_params`; their BN stats reset."""
  p_mask = trainable_fn(params)
  params = jax.tree_util.tree_map(lambda p, f, t: jnp.array(f if t else p), params,
                                  fresh_params, p_mask)

  def reset(path, s, t):
    if not t:
      return jnp.array(s)
    return jnp.ones_like(s) if path_names(path)[-1] == 'var' else jnp.zeros_like(s)
  batch_stats = jax.tree_util.tree_map_with_path(reset, batch_stats, trainable_fn(batch_stats))
  return params, batch_stats


class EUkMethod(CFkMethod):
  name = 'eu_k'

  def start_variables(self, original, copy):
    if self.ctx.init_params is None:
      raise ValueError('EU-k needs ctx.init_params to draw fresh parameters')
    fresh = self.ctx.init_params(rng_lib.key(copy.seed, rng_lib.EU_K_REINIT))
    params, stats = reinitialise(original['params'], original['batch_stats'], fresh,
                                 self.trainable)
    return {'params': params, 'batch_stats': stats}
