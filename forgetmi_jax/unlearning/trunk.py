"""A frozen trunk computed once (beyond the paper): Forget-MI+ trains only the top of the model.

With `forgetmi.trunk.k_image` / `k_text` >= 0, Forget-MI+ (push and repair) trains the last
k residual blocks of the image encoder, the last k layers of the text encoder and everything
after them (pooler, fusion, heads), like CF-k. Everything before them is the frozen original in
eval mode (running BatchNorm statistics, no dropout), so its output on an image is a constant
of the run: it is computed once, for the forget, retain and validation images, and every
step, every validation score and the repair read it instead of running the trunk again.

The cut is made at run time, not in the model: `models.apply.forward` substitutes a batch's
`trunk` entry ({'<encoder>/<module>': activation}) for the output of the named modules (flax
`intercept_methods`), and XLA drops the computation that fed them. The result is the model's
own forward with the trunk frozen, bit-for-bit the original's trunk on every image; the
evaluation afterwards runs the whole model on the plain data.
"""
import dataclasses

import jax
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax.data.pipeline import batches
from forgetmi_jax.models.apply import TRUNK_KEY, model_inputs
from forgetmi_jax.unlearning.blocks import BEFORE_BLOCKS, ENCODERS, encoder_blocks, last_k_mask


def trunk_group(method_cfg):
  """(k_image, k_text) of a method's `trunk` group, or None when off (either k < 0)."""
  trunk = method_cfg.get('trunk')
  if trunk is None:
    return None
  k_image, k_text = int(trunk.k_image), int(trunk.k_text)
  if (k_image < 0) != (k_text < 0):
    raise ValueError(f'trunk.k_image={k_image} and trunk.k_text={k_text}: set both >= 0 '
                     '(a frozen trunk) or both -1 (the whole model trains)')
  return None if k_image < 0 else (k_image, k_text)


def cut_modules(params, k_image, k_text):
  """('<encoder>/<module>', ...): the last frozen module of each encoder, the block before its
  last k (or the module before its first block when k covers them all)."""
  cut = []
  for encoder, k in zip(ENCODERS, (k_image, k_text)):
    blocks = encoder_blocks(params, encoder)
    if not blocks:
      raise ValueError(f'trunk: no blocks found in {encoder}')
    frozen = blocks[:max(len(blocks) - int(k), 0)]
    cut.append(f'{encoder}/{frozen[-1] if frozen else BEFORE_BLOCKS[encoder][-1]}')
  return tuple(cut)


@dataclasses.dataclass
class Trunk:
  """The frozen trunk of one original: which leaves it holds and its outputs per image."""
  k_image: int
  k_text: int
  cut: tuple  # module paths whose outputs are cached
  outputs: dict  # path -> [n computed images, ...]
  row: np.ndarray  # [len(source)]: an image's row in `outputs`, -1 where none was computed
  seconds: float = 0.0

  def trainable(self, tree):
    """True for leaves after the cut (the top); a params or batch_stats tree."""
    return last_k_mask(tree, self.k_image, self.k_text)


def outputs_fn(apply_fn, cut):
  """A jitted (params, batch_stats, inputs) -> {path: eval-mode output of module `path`}."""
  capture = lambda module, method: (method == '__call__'  # noqa: E731
                                    and '/'.join(module.path) in cut)

  @jax.jit
  def run(params, batch_stats, inputs):
    _, state = apply_fn({'params': params, 'batch_stats': batch_stats}, inputs['image'],
                        inputs['input_ids'], inputs['attention_mask'], train=False,
                        capture_intermediates=capture, mutable=['intermediates'])
    out = {}
    for path in cut:
      node = state['intermediates']
      for name in path.split('/'):
        node = node[name]
      out[path] = node['__call__'][0]
    return out
  return run


def compute_outputs(apply_fn, variables, source, indices, cut, batch_size=128, desc=None):
  """(outputs, row): eval-mode outputs of the modules `cut` on images `indices`, {path:
  [len(indices), ...]} in the order of `indices` (text activations at the source's full length;
  padded positions are masked downstream), and each source image's row in them (-1: none).
  Only the images asked for are stored: the cached text activations are the large part."""
  run = outputs_fn(apply_fn, cut)
  indices = np.asarray(indices, np.int64)
  row = np.full(len(source), -1, np.int64)
  row[indices] = np.arange(len(indices))
  outputs = None
  total = -(-len(indices) // batch_size)
  it = batches(source, indices, batch_size, seed=None, pad_to_batch=True)
  for batch in tqdm(it, total=total, desc=desc, leave=False, disable=desc is None):
    got = jax.device_get(run(variables['params'], variables['batch_stats'],
                             model_inputs(batch)))
    if outputs is None:
      outputs = {p: np.zeros((len(indices),) + v.shape[1:], v.dtype) for p, v in got.items()}
    real = np.asarray(batch['mask']) > 0
    rows = row[np.asarray(batch['id'])[real]]
    for p, v in got.items():
      outputs[p][rows] = v[real]
  return outputs, row


class TrunkSource:
  """A data source whose batches carry the cached trunk outputs of their rows (`trunk`), cut
  to the batch's text length; everything else is the wrapped source's."""

  def __init__(self, source, trunk: Trunk):
    self.source, self.trunk = source, trunk

  def __getattr__(self, name):  # cohort, labels, lengths, max_len, on_device: the source's
    if name in ('source', 'trunk'):
      raise AttributeError(name)
    return getattr(self.source, name)

  def __len__(self):
    return len(self.source)

  def get_batch(self, idx, pad_to=None, text_len=None):
    batch = self.source.get_batch(idx, pad_to=pad_to, text_len=text_len)
    ids = np.asarray(batch['id'])
    rows = self.trunk.row[ids]
    if np.any(rows < 0):
      raise ValueError(f'frozen trunk: no cached outputs for images {sorted(set(ids[rows < 0]))[:10]}'
                       ' (computed for the forget, retain and validation images only)')
    length = batch['input_ids'].shape[1]
    batch[TRUNK_KEY] = {p: (v[rows, :length] if p.startswith('text_encoder') else v[rows])
                        for p, v in self.trunk.outputs.items()}
    return batch
