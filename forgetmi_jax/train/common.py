"""Pieces every step shares: model forward in train/eval mode, masked means, safe norms."""
import jax
import jax.numpy as jnp
import optax


def forward(apply_fn, params, batch_stats, inputs, *, train: bool, rng=None):
  """Run the multimodal model; returns (ModelOutputs, new batch_stats).

  In eval mode BatchNorm uses running statistics and dropout is off, so the frozen original
  gives the same outputs on every call; in train mode the batch statistics are updated.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  args = (inputs['image'], inputs['input_ids'], inputs['attention_mask'])
  if train:
    out, mutated = apply_fn(variables, *args, train=True, rngs={'dropout': rng},
                            mutable=['batch_stats'])
    return out, mutated['batch_stats']
  return apply_fn(variables, *args, train=False), batch_stats


def masked_mean(x, mask):
  """Mean over real examples; padded rows (mask 0) neither count nor get gradient."""
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def safe_norm(x, axis=-1):
  """Euclidean norm whose gradient at 0 is 0 instead of nan (value is exact)."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def ranking_loss(z_img, z_txt, labels, input_ids, min_margin=0.5):
  """Chauhan et al.'s image-text ranking loss with imposter j = i+1 in the batch.

  Margin max(min_margin, |y_i - y_j|), 0 when the imposter carries the same report;
  dot-product similarity, hinge in both directions (imposter text and imposter image).
  Returns per-example losses.
  """
  imp_txt = jnp.roll(z_txt, -1, axis=0)
  imp_img = jnp.roll(z_img, -1, axis=0)
  imp_labels = jnp.roll(labels, -1, axis=0)
  same_report = jnp.all(input_ids == jnp.roll(input_ids, -1, axis=0), axis=-1)
  margin = jnp.maximum(min_margin, jnp.abs(labels - imp_labels).astype(jnp.float32))
  margin = jnp.where(same_report, 0.0, margin)
  pos = jnp.sum(z_img * z_txt, -1)
  loss_txt = jax.nn.relu(margin - pos + jnp.sum(z_img * imp_txt, -1))
  loss_img = jax.nn.relu(margin - pos + jnp.sum(imp_img * z_txt, -1))
  return loss_txt + loss_img


def step_rng(rng, step, purpose: int):
  """Per-step key: fold in the purpose, then the step, so any draw can be replayed alone."""
  return jax.random.fold_in(jax.random.fold_in(rng, purpose), step)
