"""SCRUB (Kurmanji et al., NeurIPS 2023): a student that disobeys its teacher on the forget set
and obeys it on the retain set.

Teacher = the frozen original in eval mode; student = the model being unlearned (train mode).
KL_T(t, s) = KL(softmax(t/T) || softmax(s/T)) * T^2 per sample, summed over the image, text and
joint heads (all three are trained, like the CE). Epoch e runs
  max steps on every forget batch (loss = -KL_T)              while e < msteps, then
  min steps on the retain sample (loss = gamma*CE + alpha*KL_T)  every epoch,
as whole passes in that order (SCRUB's algorithm); the retain sample is the shared one of the
forget set's size. Which passes an epoch runs is `epoch_phases(epoch, msteps)`.
"""
import jax
import jax.numpy as jnp

from forgetmi_jax.train.common import forward, masked_mean
from forgetmi_jax.unlearning.baselines_common import (BaselineMethod, as_f32, heads_ce,
                                                      make_step, model_inputs, original_of,
                                                      teacher_outputs)

DROPOUT = 31
LOGIT_FIELDS = ('logits_img', 'logits_txt', 'logits_joint')


def epoch_phases(epoch, msteps):
  """('max', 'min') for the first `msteps` epochs, then ('min',)."""
  return ('max', 'min') if int(epoch) < int(msteps) else ('min',)


def distill_kl(student_logits, teacher_logits, temperature):
  """Per-sample KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton's scaling keeps gradients
  comparable across T)."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2


def heads_kl(student_out, teacher_out, temperature):
  return sum(distill_kl(getattr(student_out, f), getattr(teacher_out, f), temperature)
             for f in LOGIT_FIELDS)


def scrub_max_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """-KL on the forget batch: push the student's predictions away from the teacher's."""
  x = batch['forget']
  teacher = teacher_outputs(apply_fn, original, model_inputs(x))
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(x), train=True,
                       rng=jax.random.fold_in(rng, DROPOUT))
  kl = masked_mean(heads_kl(out, teacher, hp['temperature']), x['mask'])
  return -kl, (stats, {'loss': -kl, 'kl_forget': kl})


def scrub_min_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """gamma*CE + alpha*KL on the retain batch: stay accurate and close to the teacher."""
  x = batch['retain']
  teacher = teacher_outputs(apply_fn, original, model_inputs(x))
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(x), train=True,
                       rng=jax.random.fold_in(rng, DROPOUT))
  kl = masked_mean(heads_kl(out, teacher, hp['temperature']), x['mask'])
  ce = masked_mean(heads_ce(out, x['label']), x['mask'])
  loss = hp['gamma'] * ce + hp['alpha'] * kl
  return loss, (stats, {'loss': loss, 'ce_retain': ce, 'kl_retain': kl})


class ScrubMethod(BaselineMethod):
  name = 'scrub'

  def __init__(self, ctx, method_cfg):
    super().__init__(ctx, method_cfg)
    if float(method_cfg.temperature) <= 0:
      raise ValueError(f'scrub.temperature must be > 0, got {method_cfg.temperature}')
    apply_fn = ctx.apply_fn
    self.max_step = make_step(lambda *a: scrub_max_loss(*a, apply_fn=apply_fn))
    self.min_step = make_step(lambda *a: scrub_min_loss(*a, apply_fn=apply_fn))

  def hparams(self):
    return {'temperature': as_f32(self.cfg.temperature), 'gamma': as_f32(self.cfg.gamma),
            'alpha': as_f32(self.cfg.alpha)}

  def epoch_batches(self, epoch):
    """Whole passes: {'forget': ...} batches (max phase), then {'retain': ...} (min phase).
    The paired stream is a pure function of the epoch, so each pass re-reads it."""
    for phase in epoch_phases(epoch, self.cfg.msteps):
      part = 'forget' if phase == 'max' else 'retain'
      for batch in super().epoch_batches(epoch):
        yield {part: batch[part]}

  def step(self, state, original, batch, rng, hparams):
    fn = self.max_step if 'forget' in batch else self.min_step
    return fn(state, original_of(original), batch, rng, hparams)
