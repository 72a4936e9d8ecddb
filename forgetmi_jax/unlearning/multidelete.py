"""MultiDelete (Cheng & Amiri, ECCV 2024): decouple the forget pairs' modalities while keeping
multimodal and unimodal knowledge, all with equal-weight MSE terms against the frozen original.

  MD  = MSE( f_u.joint(I_f, T_f),         f_o.joint(I_f, T_pi(f)) )   modality decoupling
  MKR = MSE( f_u.joint(I_r, T_r),         f_o.joint(I_r, T_r) )       multimodal retention
  UKR = MSE( f_u.img(I_r),                f_o.img(I_r) )              unimodal retention
  loss = w_md*MD + w_mkr*MKR + w_ukr*UKR   (1, 1, 1 by default), every term minimised.

Direction (MultiDelete's paper): the unlearned model's joint embedding of a true forget pair is
pulled *towards* what the original makes of a mismatched (unrelated) pair, so the forget pairs
lose their image-text association; both retention terms pull retain embeddings towards the
original's. T_pi permutes the texts within the forget batch by a random cyclic shift of the
real rows (a derangement when the batch holds 2+ real rows). MSE = mean over embedding dims,
then over real rows. The original runs in eval mode. Only the encoders and fusion get a
gradient; the heads are frozen (bit-identical, as for Forget-MI), since weight decay alone
would otherwise move them.
"""
import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax.train.common import forward, masked_mean
from forgetmi_jax.train.state import HEAD_NAMES
from forgetmi_jax.unlearning.baselines_common import (BaselineMethod, make_step, model_inputs,
                                                      original_of, teacher_outputs)

DROPOUT_FORGET, DROPOUT_RETAIN, PERMUTE = 51, 52, 53
TERMS = ('md', 'mkr', 'ukr')


def mismatch_permutation(mask, key):
  """perm [B]: real row i takes the text of another real row (cyclic shift by s in
  [1, n-1] over the real rows, in order); padded rows map to themselves."""
  b = mask.shape[0]
  real = mask > 0
  n = jnp.sum(real.astype(jnp.int32))
  order = jnp.argsort(~real, stable=True)  # real rows first, in order
  shift = 1 + jax.random.randint(key, (), 0, jnp.maximum(n - 1, 1))
  j = jnp.arange(b)
  src = jnp.where(j < n, order[(j + shift) % jnp.maximum(n, 1)], order)
  return jnp.zeros((b,), jnp.int32).at[order].set(src.astype(jnp.int32))


def mse(a, b):
  """Per-sample mean squared error over the embedding dimensions."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


def multidelete_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  forget, retain = batch['forget'], batch['retain']
  perm = mismatch_permutation(forget['mask'], jax.random.fold_in(rng, PERMUTE))
  mismatched = {'image': forget['image'], 'input_ids': forget['input_ids'][perm],
                'attention_mask': forget['attention_mask'][perm]}
  t_mis = teacher_outputs(apply_fn, original, mismatched)
  t_ret = teacher_outputs(apply_fn, original, model_inputs(retain))
  out_f, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, DROPOUT_FORGET))
  out_r, stats = forward(apply_fn, params, stats, model_inputs(retain), train=True,
                         rng=jax.random.fold_in(rng, DROPOUT_RETAIN))
  md = masked_mean(mse(out_f.z_joint, t_mis.z_joint), forget['mask'])
  mkr = masked_mean(mse(out_r.z_joint, t_ret.z_joint), retain['mask'])
  ukr = masked_mean(mse(out_r.z_img, t_ret.z_img), retain['mask'])
  w = hp['weights']
  loss = w[0] * md + w[1] * mkr + w[2] * ukr
  return loss, (stats, {'loss': loss, 'md': md, 'mkr': mkr, 'ukr': ukr})


class MultiDeleteMethod(BaselineMethod):
  name = 'multidelete'
  frozen = HEAD_NAMES

  def __init__(self, ctx, method_cfg):
    super().__init__(ctx, method_cfg)
    w = np.array([float(method_cfg.weights[k]) for k in TERMS], np.float32)
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'multidelete.weights must be >= 0 with a positive sum, got {w}')
    self.weights = w
    apply_fn = ctx.apply_fn
    self._step = make_step(lambda *a: multidelete_loss(*a, apply_fn=apply_fn))

  def hparams(self):
    return {'weights': jnp.asarray(self.weights)}

  def step(self, state, original, batch, rng, hparams):
    return self._step(state, original_of(original), batch, rng, hparams)
