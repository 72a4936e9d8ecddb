"""Which parameters CF-k and EU-k train: "the last k blocks" of each encoder, found by name
(ResNet `stage{i}_block{j}`, BERT `layer_{i}`), plus everything downstream of them."""
import re

import jax

from forgetmi_jax.train.optim import path_names

ENCODERS = ('image_encoder', 'text_encoder')
# Per encoder: how a residual block / transformer layer is named, and the modules that run
# before the first block (always frozen by CF-k / EU-k). Anything else inside an encoder (the
# BERT pooler, an image projection) runs after the last block and counts as downstream.
_BLOCK_RE = {'image_encoder': re.compile(r'^stage(\d+)_block(\d+)$'),
             'text_encoder': re.compile(r'^layer_(\d+)$')}
BEFORE_BLOCKS = {'image_encoder': ('stem_conv', 'stem_bn'), 'text_encoder': ('embeddings',)}


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
      if n in BEFORE_BLOCKS[top]:
        return False
    return True  # after the blocks: pooler / projection
  return jax.tree_util.tree_map_with_path(leaf, tree)
