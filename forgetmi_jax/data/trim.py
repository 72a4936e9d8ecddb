"""Cut padded text to the batch's longest real sequence, rounded up to a few fixed lengths.

Why: reports are shorter than `max_text_len` (the synthetic cohort's median is about 62 tokens
at 80), yet a batch padded to `max_text_len` pays for every position in every BERT layer.
Padded positions change nothing: BERT's position embeddings are absolute (position p gets
row p whatever the length) and masked keys get a -inf-like bias, so their attention weights
are exactly 0; the pooled output reads position 0. Cutting trailing padding therefore gives the
same outputs (to float rounding), and rounding the length up to a bucket keeps the number of
shapes, hence of jit compilations, at `len(buckets)`.

One caveat: in train mode dropout masks are drawn per position, so a trimmed batch draws
different (equally distributed) masks than the padded one. Runs stay deterministic for a given
bucket list; with dropout off (eval mode) the results are the same.

Entry points: `buckets_for(kind, max_len)` turns `config.model.text_buckets` into a bucket list;
the input pipelines (`data/pipeline.py` on the host, `data/device_data.py` on the device) cut
each batch with it; `stack_batches` stacks per-copy batches cut to different lengths (the loop's
copies of different seeds).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TEXT_KEYS = ('input_ids', 'attention_mask')


def length_buckets(max_len: int, kind: str = 'pow2', multiple: int = 16,
                   min_len: int = 16) -> tuple[int, ...]:
  """Sorted bucket lengths ending at max_len.

  kind='pow2': min_len, 2*min_len, 4*min_len, ... below max_len, then max_len.
  kind='multiple': multiples of `multiple` below max_len, then max_len.
  """
  max_len, min_len, multiple = int(max_len), int(min_len), int(multiple)
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  if kind == 'pow2':
    if min_len < 1:
      raise ValueError(f'min_len must be >= 1, got {min_len}')
    out, b = [], min_len
    while b < max_len:
      out.append(b)
      b *= 2
  elif kind == 'multiple':
    if multiple < 1:
      raise ValueError(f'multiple must be >= 1, got {multiple}')
    out = list(range(multiple, max_len, multiple))
  else:
    raise ValueError(f"kind must be 'pow2' or 'multiple', got {kind!r}")
  return tuple(out) + (max_len,)


BUCKET_KINDS = ('pow2', 'multiple', 'none')


def buckets_for(kind: str, max_len: int) -> tuple[int, ...] | None:
  """`config.model.text_buckets` -> the bucket list, or None ('none': every batch keeps
  `max_len`). 'pow2': 16, 32, 64, ... up to max_len; 'multiple': every multiple of 16."""
  if kind not in BUCKET_KINDS:
    raise ValueError(f'model.text_buckets must be one of {BUCKET_KINDS}, got {kind!r}')
  return None if kind == 'none' else length_buckets(max_len, kind)


def real_length(mask) -> int:
  """1 + the last position holding a real token in any row of a mask [..., L] (0: none)."""
  mask = np.asarray(mask)
  if mask.ndim == 0:
    raise ValueError('an attention mask needs a length axis')
  any_real = np.any(mask.reshape(-1, mask.shape[-1]) != 0, axis=0)
  where = np.flatnonzero(any_real)
  return int(where[-1]) + 1 if len(where) else 0


def real_lengths(attention_mask) -> np.ndarray:
  """Per row of a mask [..., L]: 1 + the last position with a real token (0 for an empty row)."""
  mask = np.asarray(attention_mask) != 0
  last = mask.shape[-1] - np.argmax(mask[..., ::-1], axis=-1)
  return np.where(mask.any(axis=-1), last, 0).astype(np.int64)


def bucket_length(lengths_or_mask, buckets: Sequence[int]) -> int:
  """The smallest bucket >= the longest real sequence.

  `lengths_or_mask`: an int, an array of lengths [B], or an attention mask [..., L] (2-D or
  more: the longest is the last real position over all rows). A length above every bucket is
  an error naming both.
  """
  x = np.asarray(lengths_or_mask)
  longest = real_length(x) if x.ndim >= 2 else int(np.max(x, initial=0))
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] < 1:
    raise ValueError(f'buckets must be positive lengths, got {buckets}')
  for b in buckets:
    if b >= longest:
      return b
  raise ValueError(f'longest sequence has {longest} tokens, above the largest bucket '
                   f'{buckets[-1]}')


def _text_leaves(batch, path=()):
  """(path, array) of every input_ids / attention_mask leaf in a nested batch dict."""
  out = []
  for k, v in batch.items():
    if isinstance(v, Mapping):
      out.extend(_text_leaves(v, path + (k,)))
    elif k in TEXT_KEYS:
      out.append((path + (k,), v))
  return out


def usable_buckets(buckets: Sequence[int], padded: int) -> list[int]:
  """The buckets below the padded length, then the padded length itself (trimming never pads)."""
  return sorted({int(b) for b in buckets if int(b) < padded} | {int(padded)})


def trim_length(batch: Mapping, buckets: Sequence[int]) -> int:
  """The one text length `trim_batch` cuts every set of `batch` to.

  All text leaves (a plain batch's, or an unlearning step's 'forget', 'retain' and
  'forget_noisy' [K, B, L]) share it, so a step compiles once per bucket, not once per
  combination. Buckets at or above the current padded length L are replaced by L itself
  (trimming never pads).
  """
  leaves = _text_leaves(batch)
  if not leaves:
    raise ValueError('batch has no input_ids / attention_mask to trim')
  lengths = {np.shape(v)[-1] for _, v in leaves}
  if len(lengths) != 1:
    shapes = {'/'.join(p): np.shape(v) for p, v in leaves}
    raise ValueError(f'text leaves have different padded lengths: {shapes}')
  padded = lengths.pop()
  masks = [v for p, v in leaves if p[-1] == 'attention_mask']
  if not masks:
    raise ValueError('batch has input_ids but no attention_mask: the length is read from masks')
  longest = max(real_length(m) for m in masks)
  return bucket_length(longest, usable_buckets(buckets, padded))


def trim_batch(batch: Mapping, buckets: Sequence[int]) -> dict:
  """`batch` with every input_ids / attention_mask cut to `trim_length(batch, buckets)`.

  Works on nested dicts (plain batches and unlearning steps); other leaves (images, labels,
  cached targets) are passed through untouched. Each text set needs its attention_mask: the
  length is read from the masks, never from token values.
  """
  for path, _ in _text_leaves(batch):
    if path[-1] == 'input_ids':
      parent = batch
      for k in path[:-1]:
        parent = parent[k]
      if 'attention_mask' not in parent:
        raise ValueError(f"{'/'.join(path[:-1]) or 'batch'} has input_ids but no "
                         'attention_mask')
  length = trim_length(batch, buckets)

  def cut(tree):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = cut(v)
      elif k in TEXT_KEYS:
        out[k] = v[..., :length]
      else:
        out[k] = v
    return out
  return cut(batch)


def stack_batches(batches: Sequence[Mapping]) -> dict:
  """Stack same-structure batches on a new leading axis; text leaves cut to different lengths
  are first padded (ids and mask 0) to the longest. Padding changes nothing (module
  docstring), so each copy computes what it would on its own batch. Device arrays stay on
  the device."""
  def length(b):
    leaves = _text_leaves(b)
    return np.shape(leaves[0][1])[-1] if leaves else None
  longest = max((length(b) or 0) for b in batches)

  def pad(path, x):
    if getattr(path[-1], 'key', None) not in TEXT_KEYS or x.shape[-1] == longest:
      return x
    widths = [(0, 0)] * (x.ndim - 1) + [(0, longest - x.shape[-1])]
    return (jnp.pad if isinstance(x, jax.Array) else np.pad)(x, widths)
  padded = [jax.tree_util.tree_map_with_path(pad, dict(b)) for b in batches]
  return jax.tree_util.tree_map(
      lambda *x: (jnp.stack if isinstance(x[0], jax.Array) else np.stack)(x), *padded)
