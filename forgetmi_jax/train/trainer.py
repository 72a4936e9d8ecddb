"""Training the original model (all non-TEST data) and the retrained model (retain only).

Loss (Chauhan et al. 2020 recipe): CE of the image, text and joint heads plus the image-text
ranking loss. Training is a method of the one loop (train/loop.py): N stacked copies, one per
seed, so N retrained models train in one program.
"""
import jax
import jax.numpy as jnp
import optax

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.data.pipeline import batches
from forgetmi_jax.models.apply import forward
from forgetmi_jax.train import optim
from forgetmi_jax.train.loop import Method
from forgetmi_jax.train.losses import heads_ce, masked_mean, ranking_loss
from forgetmi_jax.train.state import TrainState


def learning_rate_schedule(train_cfg, steps_per_epoch: int):
  """Linear warm-up, then cosine decay to 5 % over the whole run."""
  total = max(1, int(train_cfg.epochs) * steps_per_epoch)
  warmup = min(int(train_cfg.warmup_steps), total // 2)
  return optax.warmup_cosine_decay_schedule(0.0, float(train_cfg.lr), max(warmup, 1), total,
                                            end_value=float(train_cfg.lr) * 0.05)


def make_train_tx(train_cfg, steps_per_epoch: int):
  """AdamW (eps 1e-8) with the warm-up cosine schedule."""
  return optim.adamw(learning_rate_schedule(train_cfg, steps_per_epoch),
                     weight_decay=float(train_cfg.weight_decay), eps=1e-8)


def create_train_state(variables, train_cfg, steps_per_epoch: int):
  """A training state from `{'params', 'batch_stats'}`."""
  return TrainState.create(variables, make_train_tx(train_cfg, steps_per_epoch))


def train_loss(params, batch_stats, batch, rng, apply_fn, ranking_weight):
  out, new_stats = forward(apply_fn, params, batch_stats, batch, train=True, rng=rng)
  labels, mask = batch['label'], batch['mask']
  ce = heads_ce(out, labels)
  rank = ranking_loss(out.z_img, out.z_txt, labels, batch['input_ids'])
  loss = masked_mean(ce, mask) + ranking_weight * masked_mean(rank, mask)
  acc = masked_mean((jnp.argmax(out.logits_img, -1) == labels).astype(jnp.float32), mask)
  return loss, (new_stats, {'loss': loss, 'ce': masked_mean(ce, mask), 'acc_img': acc})


def train_step(state: TrainState, batch, rng, apply_fn, ranking_weight):
  grads, (new_stats, metrics) = jax.grad(train_loss, has_aux=True)(
      state.params, state.batch_stats, batch, rng, apply_fn, ranking_weight)
  return state.apply_gradients(grads, batch_stats=new_stats), metrics


class TrainMethod(Method):
  """Train from fresh variables on `indices`: copy seed s draws its init from the loop's
  `init_variables(key(s))` and its data order from s + `data_seed_offset` (0 original, 1
  retrained), its dropout from (s, TRAIN_DROPOUT, global step)."""
  name = 'train'

  def __init__(self, copies, *, apply_fn, source, indices, init_variables, data_seed_offset=0,
               text_buckets=None):
    super().__init__(copies)
    cfg = self.copies[0].cfg
    self.apply_fn, self.source, self.indices = apply_fn, source, indices
    self.batch_size = int(cfg.batch_size)
    self.steps_per_epoch = len(indices) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'train.batch_size={self.batch_size} is larger than the '
                       f'{len(indices)} training examples')
    self.init_variables = init_variables
    self.data_seed_offset = int(data_seed_offset)
    self.text_buckets = text_buckets  # each batch's text cut to a length bucket (data/trim.py)
    self.ranking_weight = float(cfg.ranking_weight)
    self.tx = make_train_tx(cfg, self.steps_per_epoch)

  def init_state(self, original, copy):
    del original  # trained from scratch
    return TrainState.create(self.init_variables(int(copy.seed)), self.tx)

  def seed_batches(self, epoch, seed):
    return batches(self.source, self.indices, self.batch_size,
                   seed=int(seed) + self.data_seed_offset, epoch=epoch, drop_remainder=True,
                   buckets=self.text_buckets)

  def step_rng(self, seed, epoch, index):
    return rng_lib.key(seed, rng_lib.TRAIN_DROPOUT, epoch * self.steps_per_epoch + index)

  def step(self, state, original, batch, rng, hparams):
    del original, hparams
    return train_step(state, batch, rng, self.apply_fn, self.ranking_weight)
