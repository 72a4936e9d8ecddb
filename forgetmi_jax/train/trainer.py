"""One trainer for the original model (all non-TEST data) and the retrained model (retain only).

Loss (Chauhan et al. 2020 recipe): CE of the image, text and joint heads plus the image-text
ranking loss. The same pure `train_step` serves both; only the example indices differ.
"""
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from forgetmi_jax.train import parallel
from forgetmi_jax.train.checkpoints import Checkpoints
from forgetmi_jax.train.common import cross_entropy, forward, masked_mean, ranking_loss, step_rng
from forgetmi_jax.train.state import TrainState, make_optimizer

DROPOUT = 1


def create_train_state(params, batch_stats, train_cfg, steps_per_epoch: int, seed: int):
  """AdamW with linear warm-up and cosine decay over the whole run."""
  total = max(1, int(train_cfg.epochs) * steps_per_epoch)
  warmup = min(int(train_cfg.warmup_steps), total // 2)
  lr = optax.warmup_cosine_decay_schedule(0.0, float(train_cfg.lr), max(warmup, 1), total,
                                          end_value=float(train_cfg.lr) * 0.05)
  tx = make_optimizer(params, lr, weight_decay=float(train_cfg.weight_decay), eps=1e-8)
  return TrainState.create(params, batch_stats, tx, jax.random.PRNGKey(seed))


def train_loss(params, batch_stats, batch, rng, apply_fn, ranking_weight):
  out, new_stats = forward(apply_fn, params, batch_stats, batch, train=True, rng=rng)
  labels, mask = batch['label'], batch['mask']
  ce = (cross_entropy(out.logits_img, labels) + cross_entropy(out.logits_txt, labels)
        + cross_entropy(out.logits_joint, labels))
  rank = ranking_loss(out.z_img, out.z_txt, labels, batch['input_ids'])
  loss = masked_mean(ce, mask) + ranking_weight * masked_mean(rank, mask)
  acc = masked_mean((jnp.argmax(out.logits_img, -1) == labels).astype(jnp.float32), mask)
  return loss, (new_stats, {'loss': loss, 'ce': masked_mean(ce, mask), 'acc_img': acc})


def make_train_step(apply_fn, ranking_weight: float):
  @jax.jit
  def train_step(state: TrainState, batch):
    rng = step_rng(state.rng, state.step, DROPOUT)
    grads, (new_stats, metrics) = jax.grad(train_loss, has_aux=True)(
        state.params, state.batch_stats, batch, rng, apply_fn, ranking_weight)
    return state.apply_gradients(grads, batch_stats=new_stats), metrics
  return train_step


def fit(state: TrainState, train_step, epoch_batches, epochs: int, mesh, ckpt_dir: str,
        desc: str = 'train', num_examples: int | None = None):
  """Epoch loop with per-epoch checkpoints; resumes from the last one.

  `epoch_batches(epoch)` must be a pure function of the epoch (seeded shuffling), so a resumed
  run replays exactly the batches an uninterrupted one would have seen.
  """
  ckpt = Checkpoints(ckpt_dir)
  start = 0
  if ckpt.latest_epoch() is not None:
    state, _ = ckpt.restore(state)
    start = ckpt.latest_epoch() + 1
  state = parallel.replicate(state, mesh)
  t0 = time.time()
  seen = 0
  with tqdm(total=epochs, initial=start, desc=desc, unit='epoch', dynamic_ncols=True) as bar:
    for epoch in range(start, epochs):
      losses = []
      for batch in epoch_batches(epoch):
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
        losses.append(metrics)
        seen += int(np.sum(batch['mask']))
      last = jax.device_get(losses[-1]) if losses else {}
      ckpt.save(epoch, state)
      bar.set_postfix(loss=f"{float(last.get('loss', np.nan)):.3f}",
                      acc=f"{float(last.get('acc_img', np.nan)):.2f}",
                      ex_s=f'{seen / max(time.time() - t0, 1e-9):.0f}')
      bar.update(1)
  ckpt.close()
  return jax.device_get(state)
