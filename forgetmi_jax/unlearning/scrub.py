"""SCRUB (Kurmanji et al., NeurIPS 2023): a student that disobeys its teacher on the forget set
and obeys it on the retain set.

Teacher = the frozen original in eval mode; student = the model being unlearned (train mode).
KL_T(t, s) = KL(softmax(t/T) || softmax(s/T)) * T^2 per sample, summed over the image, text and
joint heads (all three are trained, like the CE). Epoch e runs
  max steps on every forget batch (loss = -KL_T)              while e < msteps, then
  min steps on the retain sample (loss = gamma*CE + alpha*KL_T)  every epoch,
as whole passes in that order (SCRUB's algorithm); the min phase covers the whole retain set
(`retain_pass='full'`, SCRUB's) or the shared forget-sized retain sample ('sample'). Which
passes an epoch runs is `epoch_phases(epoch, msteps)`.
"""
import jax
import jax.numpy as jnp

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.apply import eval_outputs, forward, model_inputs
from forgetmi_jax.train.losses import distill_kl, heads_ce, masked_mean
from forgetmi_jax.unlearning.method import UnlearningMethod

LOGIT_FIELDS = ('logits_img', 'logits_txt', 'logits_joint')


def epoch_phases(epoch, msteps):
  """('max', 'min') for the first `msteps` epochs, then ('min',)."""
  return ('max', 'min') if int(epoch) < int(msteps) else ('min',)


def heads_kl(student_out, teacher_out, temperature):
  return sum(distill_kl(getattr(student_out, f), getattr(teacher_out, f), temperature)
             for f in LOGIT_FIELDS)


def _student_and_teacher(params, batch_stats, original, x, rng, apply_fn):
  teacher = jax.lax.stop_gradient(eval_outputs(apply_fn, original, model_inputs(x)))
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(x), train=True,
                       rng=jax.random.fold_in(rng, rng_lib.SCRUB_DROPOUT))
  return out, teacher, stats


def scrub_max_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """-KL on the forget batch: push the student's predictions away from the teacher's."""
  x = batch['forget']
  out, teacher, stats = _student_and_teacher(params, batch_stats, original, x, rng, apply_fn)
  kl = masked_mean(heads_kl(out, teacher, hp['temperature']), x['mask'])
  return -kl, (stats, {'loss': -kl, 'kl_forget': kl})


def scrub_min_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  """gamma*CE + alpha*KL on the retain batch: stay accurate and close to the teacher."""
  x = batch['retain']
  out, teacher, stats = _student_and_teacher(params, batch_stats, original, x, rng, apply_fn)
  kl = masked_mean(heads_kl(out, teacher, hp['temperature']), x['mask'])
  ce = masked_mean(heads_ce(out, x['label']), x['mask'])
  loss = hp['gamma'] * ce + hp['alpha'] * kl
  return loss, (stats, {'loss': loss, 'ce_retain': ce, 'kl_retain': kl})


class ScrubMethod(UnlearningMethod):
  name = 'scrub'

  def __init__(self, ctx, copies):
    super().__init__(ctx, copies)
    if len({int(c.cfg.msteps) for c in self.copies}) > 1:
      raise ValueError('scrub: copies disagree on msteps; they cannot share a program')
    for c in self.copies:
      if float(c.cfg.temperature) <= 0:
        raise ValueError(f'scrub.temperature must be > 0, got {c.cfg.temperature}')

  def hparams(self, copy):
    return {k: jnp.float32(copy.cfg[k]) for k in ('temperature', 'gamma', 'alpha')}

  def seed_batches(self, epoch, seed):
    """Whole passes: {'forget': ...} batches (max phase), then {'retain': ...} (min phase).
    The paired stream is a pure function of the epoch, so each pass re-reads it."""
    for phase in epoch_phases(epoch, self.cfg.msteps):
      if phase == 'min' and self.full_retain_pass():  # SCRUB's min phase: the whole retain set
        for batch in self.retain_batches(epoch, seed):
          yield {'retain': batch}
        continue
      part = 'forget' if phase == 'max' else 'retain'
      for batch in self.paired_batches(epoch, seed):
        yield {part: batch[part]}

  def step(self, state, original, batch, rng, hparams):
    loss = scrub_max_loss if 'forget' in batch else scrub_min_loss
    return self.descend(lambda *a: loss(*a, apply_fn=self.ctx.apply_fn), state, original, batch,
                        rng, hparams)
