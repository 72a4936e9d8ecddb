"""What the baseline methods (NegGrad+, SCRUB, CF-k, EU-k, MultiDelete) share.

- which parameters a method trains: "the last k blocks" of each encoder, found by name
  (ResNet `stage{i}_block{j}`, BERT `layer_{i}`), plus everything downstream of them;
- the optimiser (SGD as in the SCRUB code base, or the project's AdamW), with exact zero
  updates for frozen leaves so they stay bit-identical;
- the classification loss (CE of the image, text and joint heads, as in training);
- one pure, jitted gradient step built from a loss function;
- retain-only epochs for the fine-tuning baselines.
"""
import re

import jax
import jax.numpy as jnp
import optax

from forgetmi_jax.train.common import cross_entropy, forward
from forgetmi_jax.train.state import decay_mask, make_optimizer, prefix_mask
from forgetmi_jax.unlearning.common import Method

ENCODERS = ('image_encoder', 'text_encoder')
# Per encoder: how a residual block / transformer layer is named, and the modules that run
# before the first block (always frozen by CF-k / EU-k). Anything else inside an encoder (the
# BERT pooler, an image projection) runs after the last block and counts as downstream.
_BLOCK_RE = {'image_encoder': re.compile(r'^stage(\d+)_block(\d+)$'),
             'text_encoder': re.compile(r'^layer_(\d+)$')}
_BEFORE_BLOCKS = {'image_encoder': ('stem_conv', 'stem_bn'), 'text_encoder': ('embeddings',)}


def path_names(path):
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def model_inputs(x):
  return {'image': x['image'], 'input_ids': x['input_ids'], 'attention_mask': x['attention_mask']}


# ------------------------------------------------------------------------- last-k blocks
def encoder_blocks(tree, encoder):
  """Block names of `encoder` in forward order (numeric, so stage10 follows stage9)."""
  pattern, found = _BLOCK_RE[encoder], set()

  def visit(path, _):
    names = path_names(path)
    if names and names[0] == encoder:
      for n in names[1:]:
        m = pattern.match(n)
        if m:
          found.add((tuple(int(g) for g in m.groups()), n))
    return None
  jax.tree_util.tree_map_with_path(visit, tree)
  return [n for _, n in sorted(found)]


def last_blocks(tree, k_image, k_text):
  """{'image_encoder': last k_image block names, 'text_encoder': last k_text layer names}."""
  out = {}
  for enc, k in (('image_encoder', k_image), ('text_encoder', k_text)):
    if int(k) < 0:
      raise ValueError(f'k must be >= 0, got {k} for {enc}')
    blocks = encoder_blocks(tree, enc)
    out[enc] = tuple(blocks[len(blocks) - min(int(k), len(blocks)):]) if k else ()
  return out


def last_k_mask(tree, k_image, k_text):
  """True for leaves in the last k blocks of each encoder or downstream of them.

  Downstream = the BERT pooler (and an image projection, if any), the fusion and the three
  heads: they sit after the last blocks, so CF-k trains them and EU-k re-initialises them.
  Works on the params tree and on the batch_stats tree alike (same module paths).
  """
  chosen = last_blocks(tree, k_image, k_text)

  def leaf(path, _):
    names = path_names(path)
    top = names[0]
    if top not in ENCODERS:
      return True  # fusion, heads
    for n in names[1:]:
      if _BLOCK_RE[top].match(n):
        return n in chosen[top]
      if n in _BEFORE_BLOCKS[top]:
        return False
    return True  # after the blocks: pooler / projection
  return jax.tree_util.tree_map_with_path(leaf, tree)


def stop_frozen(params, trainable):
  """Frozen leaves become constants, so XLA skips their part of the backward pass."""
  if trainable is None:
    return params
  return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                trainable)


def keep_frozen_stats(old, new, trainable):
  """BatchNorm running statistics of frozen blocks stay as they were (truly frozen)."""
  if trainable is None:
    return new
  return jax.tree_util.tree_map(lambda o, n, t: n if t else o, old, new, trainable)


# ------------------------------------------------------------------------- optimisers
def make_sgd(params, lr, momentum=0.9, weight_decay=0.0, frozen_mask=None):
  """SGD (+ momentum, + L2 on kernels/embeddings only), lr injected so grids reuse it.

  Frozen leaves (`frozen_mask` True) get an exact zero update, weight decay included.
  """
  chain = []
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  chain.append(optax.inject_hyperparams(optax.sgd, static_args=('momentum', 'nesterov'))(
      learning_rate=lr, momentum=float(momentum) or None))
  if frozen_mask is not None:
    chain.append(optax.masked(optax.set_to_zero(), frozen_mask))
  return optax.chain(*chain)


def make_tx(cfg, params, frozen_mask=None):
  """The method's optimiser from its config group: `optimizer` is 'sgd' or 'adamw'."""
  kind = str(cfg.get('optimizer', 'adamw'))
  if kind == 'sgd':
    return make_sgd(params, float(cfg.lr), float(cfg.get('momentum', 0.9)),
                    float(cfg.weight_decay), frozen_mask)
  if kind == 'adamw':
    return make_optimizer(params, float(cfg.lr), weight_decay=float(cfg.weight_decay),
                          eps=float(cfg.get('adam_eps', 1e-6)),
                          frozen_mask=None if frozen_mask is None else (lambda _: frozen_mask))
  raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")


# ------------------------------------------------------------------------- losses and steps
def heads_ce(out, labels):
  """Per-sample CE summed over the image, text and joint heads (the training loss's CE)."""
  return (cross_entropy(out.logits_img, labels) + cross_entropy(out.logits_txt, labels)
          + cross_entropy(out.logits_joint, labels))


def teacher_outputs(apply_fn, original, inputs):
  """The frozen original in eval mode (running BN statistics, no dropout): deterministic."""
  out, _ = forward(apply_fn, original['params'], original['batch_stats'], inputs, train=False)
  return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def make_step(loss_fn, trainable_fn=None):
  """A pure jitted step(state, original, batch, rng, hparams) -> (state, metrics).

  loss_fn(params, batch_stats, original, batch, rng, hparams) -> (loss, (stats, metrics)),
  `original` = {'params', 'batch_stats'} of the frozen original (an argument, never closed
  over). `trainable_fn(tree)` -> bool mask (static: computed from the tree's paths) limits the
  gradient to those leaves and keeps the other BatchNorm statistics unchanged.
  """
  @jax.jit
  def step(state, original, batch, rng, hparams):
    trainable = trainable_fn(state.params) if trainable_fn else None

    def loss(params):
      return loss_fn(stop_frozen(params, trainable), state.batch_stats, original, batch, rng,
                     hparams)
    grads, (stats, metrics) = jax.grad(loss, has_aux=True)(state.params)
    if trainable_fn:
      stats = keep_frozen_stats(state.batch_stats, stats, trainable_fn(state.batch_stats))
    return state.apply_gradients(grads, batch_stats=stats), metrics
  return step


def original_of(original_state):
  return {'params': original_state.params, 'batch_stats': original_state.batch_stats}


class BaselineMethod(Method):
  """A Method whose optimiser comes from its config (`optimizer`, `lr`, `weight_decay`,
  `momentum`) and whose frozen leaves are `frozen` top-level modules plus anything
  `trainable()` leaves out."""

  def trainable(self, params):
    """Bool mask of the leaves this method trains; None = all of them."""
    return None

  def frozen_mask(self, params):
    frozen = prefix_mask(params, self.frozen) if self.frozen else None
    train = self.trainable(params)
    if train is not None:
      not_train = jax.tree_util.tree_map(lambda t: not t, train)
      frozen = not_train if frozen is None else jax.tree_util.tree_map(
          lambda f, n: f or n, frozen, not_train)
    return frozen

  def make_tx(self, params):
    mask = self.frozen_mask(params)
    if mask is not None and not any(jax.tree_util.tree_leaves(mask)):
      mask = None
    return make_tx(self.cfg, params, mask)

  def prepare_batch(self, batch, epoch):
    """Baselines never read the noisy forget copies: do not ship them to the devices."""
    return {k: v for k, v in batch.items() if k != 'forget_noisy'}

  def retain_batches(self, epoch):
    """One pass over the whole retain set, shuffled by (seed, epoch); full batches only."""
    from forgetmi_jax.data.pipeline import batches
    return batches(self.ctx.source, self.ctx.split.retain_idx, int(self.cfg.batch_size),
                   seed=int(self.ctx.config.seed) + 2, epoch=epoch, drop_remainder=True)


def as_f32(x):
  return jnp.asarray(x, jnp.float32)
