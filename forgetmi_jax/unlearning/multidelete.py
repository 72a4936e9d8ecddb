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

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.apply import eval_outputs, forward, model_inputs
from forgetmi_jax.train.losses import masked_mean, mse
from forgetmi_jax.train.optim import HEAD_NAMES
from forgetmi_jax.unlearning.method import UnlearningMethod

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


def multidelete_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  forget, retain = batch['forget'], batch['retain']
  perm = mismatch_permutation(forget['mask'], jax.random.fold_in(rng, rng_lib.MULTIDELETE_PERMUTE))
  mismatched = {'image': forget['image'], 'input_ids': forget['input_ids'][perm],
                'attention_mask': forget['attention_mask'][perm]}
  teacher = lambda x: jax.lax.stop_gradient(eval_outputs(apply_fn, original, x))  # noqa: E731
  t_mis, t_ret = teacher(mismatched), teacher(model_inputs(retain))
  out_f, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.MULTIDELETE_FORGET_DROPOUT))
  out_r, stats = forward(apply_fn, params, stats, model_inputs(retain), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.MULTIDELETE_RETAIN_DROPOUT))
  terms = {'md': masked_mean(mse(out_f.z_joint, t_mis.z_joint), forget['mask']),
           'mkr': masked_mean(mse(out_r.z_joint, t_ret.z_joint), retain['mask']),
           'ukr': masked_mean(mse(out_r.z_img, t_ret.z_img), retain['mask'])}
  loss = sum(hp['weights'][k] * terms[k] for k in TERMS)
  return loss, (stats, {'loss': loss, **terms})


class MultiDeleteMethod(UnlearningMethod):
  name = 'multidelete'
  frozen_modules = HEAD_NAMES

  def hparams(self, copy):
    w = np.array([float(copy.cfg.weights[k]) for k in TERMS], np.float32)
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'multidelete.weights must be >= 0 with a positive sum, got {w}')
    return {'weights': {k: jnp.float32(v) for k, v in zip(TERMS, w)}}

  def step(self, state, original, batch, rng, hparams):
    loss = lambda *a: multidelete_loss(*a, apply_fn=self.ctx.apply_fn)  # noqa: E731
    return self.descend(loss, state, original, batch, rng, hparams)
