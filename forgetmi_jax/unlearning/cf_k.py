"""CF-k (Goel et al. 2022, "catastrophic forgetting of the last k layers"): fine-tune only the
last k blocks on the retain set, hoping the forget set's traces there fade.

Blocks: ResNet residual blocks `stage{i}_block{j}` (the last `k_image` in forward order) and
BERT layers `layer_{i}` (the last `k_text`). Everything downstream of them trains too (BERT
pooler, fusion, the three heads); the stem, the text embeddings and the earlier blocks are
frozen, parameters and BatchNorm running statistics bit-identical. Loss: the CE of the three
heads (as in training); one pass over the whole retain set per epoch.
"""
import jax

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.train.losses import heads_ce, masked_mean
from forgetmi_jax.unlearning.blocks import last_k_mask
from forgetmi_jax.unlearning.method import UnlearningMethod


def retain_ce_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  del original, hp
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(batch), train=True,
                       rng=jax.random.fold_in(rng, rng_lib.CF_K_DROPOUT))
  ce = masked_mean(heads_ce(out, batch['label']), batch['mask'])
  return ce, (stats, {'loss': ce})


class CFkMethod(UnlearningMethod):
  name = 'cf_k'

  def __init__(self, ctx, copies):
    super().__init__(ctx, copies)
    for key in ('k_image', 'k_text'):
      if len({int(c.cfg[key]) for c in self.copies}) > 1:
        raise ValueError(f'{self.name}: copies disagree on {key}')
    self.k_image, self.k_text = int(self.cfg.k_image), int(self.cfg.k_text)

  def trainable(self, tree):
    return last_k_mask(tree, self.k_image, self.k_text)

  def seed_batches(self, epoch, seed):
    return self.retain_batches(epoch, seed)

  def step(self, state, original, batch, rng, hparams):
    loss = lambda *a: retain_ce_loss(*a, apply_fn=self.ctx.apply_fn)  # noqa: E731
    return self.descend(loss, state, original, batch, rng, hparams)
