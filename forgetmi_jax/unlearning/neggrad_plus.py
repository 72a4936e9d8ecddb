"""NegGrad+ (Kurmanji et al., NeurIPS 2023): descend on the retain CE, ascend on the forget CE.

loss = beta * CE(retain) - (1 - beta) * CE(forget), each CE the per-sample sum over the image,
text and joint heads (the training loss's CE) averaged over the real rows of the batch. Each
step pairs one forget batch with one retain batch (the shared unlearning epochs: the forget set
once, an equal-size retain sample). The whole model trains, heads included: the loss lives on
the logits. SGD with momentum, as in the SCRUB code base.
"""
import jax
import jax.numpy as jnp

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.train.losses import heads_ce, masked_mean
from forgetmi_jax.unlearning.method import UnlearningMethod


def neggrad_plus_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """(loss, (batch_stats, metrics)); `original` is unused (NegGrad+ needs no teacher)."""
  del original
  forget, retain = batch['forget'], batch['retain']
  out_f, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.NEGGRAD_FORGET_DROPOUT))
  out_r, stats = forward(apply_fn, params, stats, model_inputs(retain), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.NEGGRAD_RETAIN_DROPOUT))
  ce_f = masked_mean(heads_ce(out_f, forget['label']), forget['mask'])
  ce_r = masked_mean(heads_ce(out_r, retain['label']), retain['mask'])
  beta = hp['beta']
  loss = beta * ce_r - (1.0 - beta) * ce_f
  return loss, (stats, {'loss': loss, 'ce_retain': ce_r, 'ce_forget': ce_f})


class NegGradPlusMethod(UnlearningMethod):
  name = 'neggrad_plus'

  def __init__(self, ctx, copies):
    super().__init__(ctx, copies)
    for c in self.copies:
      if not 0.0 <= float(c.cfg.beta) <= 1.0:
        raise ValueError(f'neggrad_plus.beta must be in [0, 1], got {c.cfg.beta}')

  def hparams(self, copy):
    return {'beta': jnp.float32(copy.cfg.beta)}

  def step(self, state, original, batch, rng, hparams):
    loss = lambda *a: neggrad_plus_loss(*a, apply_fn=self.ctx.apply_fn)  # noqa: E731
    return self.descend(loss, state, original, batch, rng, hparams)
