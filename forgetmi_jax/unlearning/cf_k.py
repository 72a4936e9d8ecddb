"""CF-k (Goel et al. 2022, "catastrophic forgetting of the last k layers"): fine-tune only the
last k blocks on the retain set, hoping the forget set's traces there fade.

Blocks: ResNet residual blocks `stage{i}_block{j}` (the last `k_image` in forward order) and
BERT layers `layer_{i}` (the last `k_text`). Everything downstream of them trains too (BERT
pooler, fusion, the three heads); the stem, the text embeddings and the earlier blocks are
frozen, parameters and BatchNorm running statistics bit-identical. Loss: the CE of the three
heads (as in training); one pass over the whole retain set per epoch.
"""
import jax

from forgetmi_jax.train.common import forward, masked_mean
from forgetmi_jax.unlearning.baselines_common import (BaselineMethod, heads_ce, last_k_mask,
                                                      make_step, model_inputs, original_of)

DROPOUT = 41


def retain_ce_loss(params, batch_stats, original, batch, rng, hp, apply_fn):
  del original, hp
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(batch), train=True,
                       rng=jax.random.fold_in(rng, DROPOUT))
  ce = masked_mean(heads_ce(out, batch['label']), batch['mask'])
  return ce, (stats, {'loss': ce})


class CFkMethod(BaselineMethod):
  name = 'cf_k'

  def __init__(self, ctx, method_cfg):
    super().__init__(ctx, method_cfg)
    self.k_image, self.k_text = int(method_cfg.k_image), int(method_cfg.k_text)
    apply_fn = ctx.apply_fn
    self._step = make_step(lambda *a: retain_ce_loss(*a, apply_fn=apply_fn),
                           trainable_fn=self.trainable)

  def trainable(self, tree):
    return last_k_mask(tree, self.k_image, self.k_text)

  def epoch_batches(self, epoch):
    return self.retain_batches(epoch)

  def step(self, state, original, batch, rng, hparams):
    return self._step(state, original_of(original), batch, rng, hparams)
