"""Run a model over index sets in eval mode and keep what the metrics need."""
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax.data.pipeline import batches
from forgetmi_jax.models.apply import forward, model_inputs

HEAD_FIELDS = {'image': 'logits_img', 'joint': 'logits_joint', 'text': 'logits_txt'}


def make_predict_fn(apply_fn, head='image'):
  """A jitted eval-mode forward giving one head's logits [B, C], or for a tuple of heads
  their logits stacked [B, len(heads), C]."""
  heads = (head,) if isinstance(head, str) else tuple(head)
  for h in heads:
    if h not in HEAD_FIELDS:
      raise ValueError(f'eval.head must be one of {sorted(HEAD_FIELDS)}, got {h!r}')
  fields = [HEAD_FIELDS[h] for h in heads]

  @jax.jit
  def predict(params, batch_stats, batch):
    out, _ = forward(apply_fn, params, batch_stats, batch, train=False)
    if isinstance(head, str):
      return getattr(out, fields[0])
    return jnp.stack([getattr(out, f) for f in fields], axis=1)
  return predict


def predict_logits(predict, variables, source, indices, batch_size, desc=None):
  """Logits [len(indices), ...] in the order of `indices`."""
  outs, ids = [], []
  total = -(-len(indices) // batch_size)
  it = batches(source, np.asarray(indices), batch_size, seed=None, pad_to_batch=True)
  for batch in tqdm(it, total=total, desc=desc, leave=False, disable=desc is None):
    logits = np.asarray(predict(variables['params'], variables['batch_stats'],
                                model_inputs(batch)))
    real = np.asarray(batch['mask']) > 0
    outs.append(logits[real])
    ids.append(np.asarray(batch['id'])[real])
  logits, ids = np.concatenate(outs), np.concatenate(ids)
  order = {int(i): r for r, i in enumerate(ids)}
  return logits[[order[int(i)] for i in indices]]
