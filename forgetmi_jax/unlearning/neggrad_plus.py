"""NegGrad+ (Kurmanji et al., NeurIPS 2023): descend on the retain CE, ascend on the forget CE.

loss = beta * CE(retain) - (1 - beta) * CE(forget), each CE the per-sample sum over the image,
text and joint heads (the training loss's CE) averaged over the real rows of the batch. Each
step pairs one forget batch with one retain batch (the shared unlearning epochs: the forget set
once, an equal-size retain sample). The whole model trains, heads included: the loss lives on
the logits. SGD with momentum, as in the SCRUB code base.
"""
import jax

from forgetmi_jax.train.common import forward, masked_mean
from forgetmi_jax.unlearning.baselines_common import (BaselineMethod, as_f32, heads_ce,
                                                      make_step, model_inputs, original_of)

DROPOUT_FORGET, DROPOUT_RETAIN = 21, 22


def neggrad_plus_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """(loss, (batch_stats, metrics)); `original` is unused (NegGrad+ needs no teacher)."""
  del original
  forget, retain = batch['forget'], batch['retain']
  out_f, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, DROPOUT_FORGET))
  out_r, stats = forward(apply_fn, params, stats, model_inputs(retain), train=True,
                         rng=jax.random.fold_in(rng, DROPOUT_RETAIN))
  ce_f = masked_mean(heads_ce(out_f, forget['label']), forget['mask'])
  ce_r = masked_mean(heads_ce(out_r, retain['label']), retain['mask'])
  beta = hp['beta']
  loss = beta * ce_r - (1.0 - beta) * ce_f
  return loss, (stats, {'loss': loss, 'ce_retain': ce_r, 'ce_forget': ce_f})


def make_neggrad_plus_step(apply_fn):
  return make_step(lambda *a: neggrad_plus_loss(*a, apply_fn=apply_fn))


class NegGradPlusMethod(BaselineMethod):
  name = 'neggrad_plus'

  def __init__(self, ctx, method_cfg):
    super().__init__(ctx, method_cfg)
    beta = float(method_cfg.beta)
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f'neggrad_plus.beta must be in [0, 1], got {beta}')
    self._step = make_neggrad_plus_step(ctx.apply_fn)

  def hparams(self):
    return {'beta': as_f32(self.cfg.beta)}

  def step(self, state, original, batch, rng, hparams):
    return self._step(state, original_of(original), batch, rng, hparams)
