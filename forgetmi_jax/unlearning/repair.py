"""Forget-MI+'s repair phase (beyond the paper): re-memorise the retain set, keep the forget set
where the push left it.

Measured (README "What limits it"): the push that brings the forget patients to non-member
level also stops the model memorising its retain set, so the paper's SVC calls almost every
image a member; a retain-only repair brings the retain set back and relearns the forget set
with it. The repair therefore anchors each forget image's outputs to those of the pushed model
it starts from:

  loss = CE(retain) + anchor * KL_T( pushed(x_f) || model(x_f) )

CE and KL each summed over the image, text and joint heads, every module trained (the heads
too: both terms live on the logits), AdamW at `lr_ratio` x the push's learning rate. An epoch
pairs `retain_examples` retain images (0 = the whole retain set) with the forget set, cycled,
`forget_rows` of them per step beside `batch_size` retain images (by default the forget set
once per epoch). The pushed model's forget logits are computed
once per copy (eval mode) and travel in the copy's hyperparameters, so stacked copies with
different pushed models share one program. `setup.run_method` runs it after a method whose
group has `repair.epochs > 0`, under the same stopping rule.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.evaluation.evaluator import HEAD_FIELDS, make_predict_fn, predict_logits
from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.train.losses import distill_kl, heads_ce, masked_mean
from forgetmi_jax.unlearning.method import UnlearningMethod

HEADS = ('image', 'text', 'joint')  # the order of the pushed logits' head axis
_FIELDS = tuple(HEAD_FIELDS[h] for h in HEADS)


def repair_group(method_cfg):
  """The repair's own config group from a method's (`<method>.repair`), or None when off."""
  repair = method_cfg.get('repair')
  if repair is None or int(repair.epochs) <= 0:
    return None
  for key in ('lr_ratio', 'anchor', 'temperature'):
    if not float(repair[key]) > 0:
      raise ValueError(f'repair.{key}={repair[key]} must be > 0')
  share = float(repair.get('budget_share', 0.5))
  if not 0 <= share < 1:
    raise ValueError(f'repair.budget_share={share} must be in [0, 1)')
  forget_batch = int(repair.get('forget_batch_size', 0))
  if not 0 <= forget_batch <= int(method_cfg.batch_size):
    raise ValueError(f'repair.forget_batch_size={forget_batch} must be in [0, batch_size='
                     f'{method_cfg.batch_size}] (0 = the forget set once per epoch)')
  if int(repair.retain_examples) < 0:
    raise ValueError(f'repair.retain_examples={repair.retain_examples} must be >= 0 '
                     '(0 = the whole retain set)')
  return ml_collections.ConfigDict({
      # tied to the push's rate, so the tuning rule's lr trials set both (one trial each)
      'epochs': int(repair.epochs), 'lr': float(method_cfg.lr) * float(repair.lr_ratio),
      'batch_size': int(method_cfg.batch_size), 'optimizer': 'adamw',
      'weight_decay': float(method_cfg.weight_decay),
      'adam_eps': float(method_cfg.get('adam_eps', 1e-6)),
      'retain_examples': int(repair.retain_examples), 'anchor': float(repair.anchor),
      'temperature': float(repair.temperature), 'budget_share': share,
      'forget_batch_size': forget_batch})


def retain_examples(repair_cfg, n_retain: int) -> int:
  """Retain images per repair epoch: `retain_examples`, 0 = the whole retain set."""
  return min(int(repair_cfg.retain_examples) or n_retain, n_retain)


def forget_rows(repair_cfg, n_forget: int, n_retain: int, num_devices: int = 1):
  """Forget rows per repair step beside `batch_size` retain rows, or None for the plain epoch
  (the forget set once in full batches: `retain_examples` no more than the forget set).

  `forget_batch_size` 0: the forget set once per epoch (ceil(forget / steps) rows); the rows
  only anchor, and cycling the forget set several times an epoch (at 3 % and 6 %) costs
  steps the validation gap does not repay (README "What limits it"). Rounded up to a multiple
  of the `num_devices` that split each step (4 rows on an 8-device TPU: 8)."""
  retain = retain_examples(repair_cfg, n_retain)
  if retain <= n_forget:
    return None
  batch_size = int(repair_cfg.batch_size)
  rows = int(repair_cfg.forget_batch_size) or -(-n_forget // -(-retain // batch_size))
  return min(-(-rows // num_devices) * num_devices, batch_size)


def heads_kl(out, teacher_logits, mask, temperature):
  """KL_T(teacher || model) summed over the image, text and joint heads (`teacher_logits`
  [B, 3, C] in HEADS order, held fixed), masked mean over the rows."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  kl = sum(distill_kl(getattr(out, f), teacher_logits[:, h], temperature)
           for h, f in enumerate(_FIELDS))
  return masked_mean(kl, mask)


def repair_loss(params, batch_stats, batch, rng, hp, apply_fn):
  """(loss, (batch_stats, metrics)): CE on the retain batch + anchor * KL to the pushed model's
  logits on the forget batch (`batch['forget']['pushed']` [B, 3, C])."""
  forget, retain = batch['forget'], batch['retain']
  out_f, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.REPAIR_FORGET_DROPOUT))
  out_r, stats = forward(apply_fn, params, stats, model_inputs(retain), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.REPAIR_RETAIN_DROPOUT))
  kl = heads_kl(out_f, forget['pushed'], forget['mask'], hp['temperature'])
  ce = masked_mean(heads_ce(out_r, retain['label']), retain['mask'])
  loss = ce + hp['anchor'] * kl
  return loss, (stats, {'loss': loss, 'ce_retain': ce, 'kl_forget': kl})


class RepairMethod(UnlearningMethod):
  """The repair on the loop; copy `name`s key the pushed variables each copy starts from."""
  name = 'repair'

  def __init__(self, ctx, copies, pushed: dict, batch_size=128, num_devices=1):
    super().__init__(ctx, copies)
    missing = sorted({c.name for c in self.copies} - set(pushed))
    if missing:
      raise ValueError(f'repair: no pushed model for copies {missing}')
    self.num_devices = int(num_devices)
    forget_idx = np.asarray(ctx.split.forget_idx)
    self.pushed = pushed
    self._predict = make_predict_fn(ctx.apply_fn, HEADS)
    self._forget_idx, self._batch_size = forget_idx, batch_size
    self._pushed_logits = {}
    self.position = np.zeros(len(ctx.source), np.int32)
    self.position[forget_idx] = np.arange(len(forget_idx), dtype=np.int32)

  def pushed_logits(self, name):
    """[n_forget, 3, C], rows in forget_idx order: copy `name`'s pushed model on the forget
    set (eval mode), computed at its first use, inside the loop's timer (the run's seconds)."""
    if name not in self._pushed_logits:
      self._pushed_logits[name] = predict_logits(self._predict, self.pushed[name],
                                                 self.ctx.source, self._forget_idx,
                                                 self._batch_size)
    return self._pushed_logits[name]

  def start_variables(self, original, copy):
    return self.pushed[copy.name]

  def hparams(self, copy):
    return {'anchor': jnp.float32(copy.cfg.anchor),
            'temperature': jnp.float32(copy.cfg.temperature),
            'pushed_forget_logits': jnp.asarray(self.pushed_logits(copy.name), jnp.float32)}

  def seed_batches(self, epoch, seed):
    return self.paired_batches(epoch, seed, self.retain_examples(), self.forget_batch_size())

  def epoch_examples(self, epoch):
    return self.paired_examples(self.retain_examples(), self.forget_batch_size())

  def retain_examples(self):
    return retain_examples(self.cfg, len(self.ctx.split.retain_idx))

  def forget_batch_size(self):
    return forget_rows(self.cfg, len(self.ctx.split.forget_idx), len(self.ctx.split.retain_idx),
                       self.num_devices)

  def prepare_batch(self, batch, epoch, seed):
    batch = super().prepare_batch(batch, epoch, seed)
    forget = dict(batch['forget'])
    forget['position'] = self.position[np.asarray(forget['id'])]  # padded rows: masked out
    return {**batch, 'forget': forget}

  def step(self, state, original, batch, rng, hparams):
    forget = dict(batch['forget'])
    forget['pushed'] = jnp.take(hparams['pushed_forget_logits'], forget.pop('position'), axis=0)
    batch = {**batch, 'forget': forget}
    return self.descend(lambda p, s, o, b, r, h: repair_loss(p, s, b, r, h, self.ctx.apply_fn),
                        state, original, batch, rng, hparams)
