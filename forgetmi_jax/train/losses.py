"""The losses every method is built from, each written like its formula (per-sample values;
callers average over real rows with `masked_mean`)."""
import jax
import jax.numpy as jnp
import optax


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


def heads_ce(out, labels):
  """Per-sample CE summed over the image, text and joint heads (the training loss's CE)."""
  return (cross_entropy(out.logits_img, labels) + cross_entropy(out.logits_txt, labels)
          + cross_entropy(out.logits_joint, labels))


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


def distance(z, target):
  """Per-sample Euclidean distance (not squared) to targets with a leading draw axis [K, B, D],
  averaged over the K draws (REFERENCE 4)."""
  return jnp.mean(safe_norm(z[None] - target), axis=0)


def mse(a, b):
  """Per-sample mean squared error over the embedding dimensions."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


def distill_kl(student_logits, teacher_logits, temperature):
  """Per-sample KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton's scaling keeps gradients
  comparable across T)."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
