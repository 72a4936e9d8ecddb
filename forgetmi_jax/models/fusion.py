"""Multimodal adaptation gate (MAG, Rahman et al. 2020) with the image as dominant modality.

  g       = sigmoid(W_g [z_img; z_txt] + b_g)           (dim of z_txt)
  H       = W_h [z_img; g * z_txt] + b_h                (dim of z_img)
  alpha   = min(beta * ||z_img|| / (||H|| + eps), 1)
  z_joint = Dropout(LayerNorm(z_img + alpha * H))

variant='per_sample' is MAG proper (per-sample L2 norms, fixed beta hyper-parameter), so one
sample's joint embedding does not depend on the rest of its batch. variant='reference' is the
Forget-MI public code (REFERENCE 3, 8): one Frobenius norm over the whole batch for each of z_img
and H, and a learnable scalar beta drawn from N(0, 1) at init (like torch.randn).

Parameter names: gate/{kernel,bias}, displacement/{kernel,bias}, layer_norm/{scale,bias} and,
for 'reference', beta.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _safe_norm(x, axis=None, keepdims=False):
  """L2 norm whose gradient at 0 is 0 rather than nan (value exact)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


class MAG(nn.Module):
  """(z_img [B, Di], z_txt [B, Dt]) -> z_joint [B, Di]; alpha is sown to 'intermediates'."""
  variant: str = 'per_sample'
  beta: float = 1.0  # 'per_sample' only; 'reference' learns its own
  eps: float = 1e-6
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as in MAG's code
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_img, z_txt, train: bool, return_alpha: bool = False):
    if self.variant not in ('per_sample', 'reference'):
      raise ValueError(f"unknown MAG variant {self.variant!r} (expected 'per_sample' or "
                       "'reference')")
    d_img, d_txt = z_img.shape[-1], z_txt.shape[-1]
    g = nn.sigmoid(nn.Dense(d_txt, dtype=self.dtype, name='gate')(
        jnp.concatenate([z_img, z_txt], axis=-1)))
    h = nn.Dense(d_img, dtype=self.dtype, name='displacement')(
        jnp.concatenate([z_img, g * z_txt], axis=-1))
    # Norms in float32 whatever the compute dtype.
    zi32, h32 = z_img.astype(jnp.float32), h.astype(jnp.float32)
    if self.variant == 'per_sample':
      beta = self.beta
      ratio = _safe_norm(zi32, axis=-1, keepdims=True) / (
          _safe_norm(h32, axis=-1, keepdims=True) + self.eps)  # [B, 1]
    else:
      beta = self.param('beta', nn.initializers.normal(1.0), (1,), jnp.float32)
      ratio = _safe_norm(zi32) / (_safe_norm(h32) + self.eps)  # scalar over the batch
      ratio = jnp.broadcast_to(ratio, (z_img.shape[0], 1))
    alpha = jnp.minimum(beta * ratio, 1.0)
    self.sow('intermediates', 'alpha', alpha)
    z = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='layer_norm')(
        z_img + alpha.astype(h.dtype) * h)
    z = nn.Dropout(self.dropout_rate, deterministic=not train)(z)
    return (z, alpha) if return_alpha else z
