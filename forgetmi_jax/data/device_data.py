"""The cohort on the accelerator: images as integers, batches gathered there by index.

Why: the host pipeline reads, converts and ships every batch's float32 pixels each step; with
the data resident on the device the host ships only indices. Images are stored quantised
(uint8: 1 byte a pixel, uint16: 2) and normalised on the device (k -> k / 255 or k / 65535,
float32 in [0, 1], through a table of the host's values); tokens, labels and ids are stored as
they are.

Quantisation is lossless where the source already is: MIMIC-CXR images built by
`data/mimic_cxr.py` are stored as uint16 (k / 65535), so `dtype='uint16'` gives the host
pipeline's floats bit for bit, and 8-bit sources (k / 255) are exact with 'uint8'. Synthetic
float images lose up to half a quantisation step (0.5 / 255 with uint8); `quantisation_error`
says how much was lost, and 'float32' stores them exactly (4 bytes a pixel).

`DeviceSource.get_batch` / `batches` / `unlearning_batches` give the same dicts (keys image,
input_ids, attention_mask, label, id, mask; same dtypes, same order of examples) as
`data/pipeline.py`'s functions of the same names, as device arrays, optionally with the text
already cut to a length bucket (`data/trim.py`). One device; for a mesh, shard the outputs.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax.data.pipeline import _epoch_rng
from forgetmi_jax.data.trim import bucket_length

IMAGE_DTYPES = {'uint8': 255, 'uint16': 65535, 'float32': 1}


def image_bytes(num_images: int, image_size: int, bytes_per_pixel: int) -> int:
  """Bytes of a cohort's 1-channel square images."""
  return int(num_images) * int(image_size) ** 2 * int(bytes_per_pixel)


def fits_on_device(num_images: int, image_size: int, bytes_per_pixel: int, device_bytes: int,
                   fraction: float = 0.5) -> bool:
  """Whether the images take at most `fraction` of the device's memory (the rest is left to
  the models, optimiser state and activations)."""
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction must be in (0, 1], got {fraction}')
  return image_bytes(num_images, image_size, bytes_per_pixel) <= fraction * int(device_bytes)


def device_memory_bytes(device=None) -> int | None:
  """The device's memory limit; on CPU the host's physical memory; None when unknown."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
    except (ValueError, OSError, AttributeError):
      return None
  return None


def real_lengths(attention_mask) -> np.ndarray:
  """Per row: 1 + the last position with a real token (0 for an empty row)."""
  mask = np.asarray(attention_mask) != 0
  last = mask.shape[-1] - np.argmax(mask[..., ::-1], axis=-1)
  return np.where(mask.any(axis=-1), last, 0).astype(np.int64)


def pad_indices(idx, pad_to: int | None = None):
  """(indices, mask) exactly as `ExampleSource.get_batch` pads a short batch: by repeating its
  first index, with mask 0 on the copies."""
  idx = np.asarray(idx, np.int64).reshape(-1)
  if len(idx) == 0:
    raise ValueError('empty batch')
  mask = np.ones(len(idx), np.float32)
  if pad_to is not None and len(idx) < pad_to:
    extra = pad_to - len(idx)
    idx = np.concatenate([idx, np.repeat(idx[:1], extra)])
    mask = np.concatenate([mask, np.zeros(extra, np.float32)])
  return idx, mask


def quantise(images: np.ndarray, dtype: str) -> np.ndarray:
  """float [0, 1] -> round(x * max) as `dtype` (clipped); float32 is returned unchanged."""
  if dtype not in IMAGE_DTYPES:
    raise ValueError(f'image dtype must be one of {sorted(IMAGE_DTYPES)}, got {dtype!r}')
  images = np.asarray(images, np.float32)
  if dtype == 'float32':
    return images
  return np.round(np.clip(images, 0.0, 1.0) * IMAGE_DTYPES[dtype]).astype(dtype)


def dequantise(q: np.ndarray, dtype: str) -> np.ndarray:
  """The host's float32 of stored values: what the device gather computes, in numpy."""
  return np.asarray(q).astype(np.float32) / np.float32(IMAGE_DTYPES[dtype])


@functools.partial(jax.jit, static_argnames=('text_len',))
def _gather(images, input_ids, attention_mask, labels, table, idx, mask, text_len):
  # Normalising through a table of the host's own float32 values (value k -> k / max, 256 or
  # 65536 entries) keeps the batch bit-identical to the host pipeline: XLA's float division
  # may differ from numpy's by an ulp (it does on CPU). float32 storage has no table.
  x = images[idx]
  x = x if table is None else table[x.astype(jnp.int32)]
  return {'image': x, 'input_ids': input_ids[idx, :text_len],
          'attention_mask': attention_mask[idx, :text_len], 'label': labels[idx],
          'id': idx.astype(jnp.int32), 'mask': mask}


@functools.partial(jax.jit, donate_argnums=(0,))
def _write(images, chunk, start):
  return jax.lax.dynamic_update_slice(images, chunk, (start, 0, 0, 0))


class DeviceSource:
  """A cohort's images (quantised), tokens, labels and ids resident on one device."""

  def __init__(self, images, input_ids, attention_mask, labels, dtype: str, lengths,
               quantisation_error: float, device=None):
    self.images = images
    self.input_ids = input_ids
    self.attention_mask = attention_mask
    self.labels = labels
    self.dtype = dtype
    self.lengths = np.asarray(lengths, np.int64)  # host copy: picks text buckets per step
    self.quantisation_error = float(quantisation_error)
    self.device = device
    self._table = None if dtype == 'float32' else jax.device_put(
        dequantise(np.arange(IMAGE_DTYPES[dtype] + 1), dtype), device)

  @classmethod
  def from_source(cls, source, dtype: str = 'uint8', device=None,
                  chunk: int = 256) -> 'DeviceSource':
    """Copy an `ExampleSource` (pipeline.py) to the device, reading images in chunks (lazy
    cohorts are never materialised as float32 on the host)."""
    if dtype not in IMAGE_DTYPES:
      raise ValueError(f'image dtype must be one of {sorted(IMAGE_DTYPES)}, got {dtype!r}')
    device = device or jax.devices()[0]
    n = len(source)
    if n == 0:
      raise ValueError('empty source')
    first = source.cohort.get_images(np.zeros(1, np.int64))
    shape = (n,) + tuple(first.shape[1:])
    images = jax.device_put(jnp.zeros(shape, dtype), device)
    chunk = max(1, min(int(chunk), n))
    err = 0.0
    for start in range(0, n, chunk):
      idx = np.arange(start, min(start + chunk, n))
      x = source.cohort.get_images(idx)
      q = quantise(x, dtype)
      err = max(err, float(np.max(np.abs(dequantise(q, dtype) - x), initial=0.0)))
      if len(idx) < chunk:  # fixed chunk shape: one compilation; the tail overwrites rows
        start = n - chunk      # that are rewritten with the same values
        q = quantise(source.cohort.get_images(np.arange(start, n)), dtype)
      images = _write(images, jax.device_put(q, device), jnp.int32(start))
    put = lambda x: jax.device_put(np.asarray(x), device)  # noqa: E731
    return cls(images, put(source.input_ids), put(source.attention_mask), put(source.labels),
               dtype, real_lengths(source.attention_mask), err, device)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def max_len(self) -> int:
    return int(self.input_ids.shape[1])

  @property
  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in (self.images, self.input_ids, self.attention_mask,
                                       self.labels))

  def text_length(self, indices, buckets: Sequence[int] | None = None) -> int:
    """The padded length a batch of these rows needs: the longest real one, rounded up to a
    bucket (buckets at or above max_len are replaced by max_len); max_len without buckets."""
    if buckets is None:
      return self.max_len
    longest = int(np.max(self.lengths[np.asarray(indices, np.int64)], initial=0))
    usable = sorted({int(b) for b in buckets if int(b) < self.max_len} | {self.max_len})
    return bucket_length(longest, usable)

  def gather(self, indices, mask=None, text_len: int | None = None) -> dict:
    """The batch of rows `indices` (mask: float32 [b], 1 real, 0 padding; default all real),
    text cut to `text_len` positions (default max_len), gathered on the device."""
    idx = np.asarray(indices, np.int32).reshape(-1)
    mask = np.ones(len(idx), np.float32) if mask is None else np.asarray(mask, np.float32)
    if mask.shape != idx.shape:
      raise ValueError(f'mask has shape {mask.shape}, indices {idx.shape}')
    text_len = self.max_len if text_len is None else int(text_len)
    if not 1 <= text_len <= self.max_len:
      raise ValueError(f'text_len must be in [1, {self.max_len}], got {text_len}')
    return _gather(self.images, self.input_ids, self.attention_mask, self.labels, self._table,
                   jax.device_put(idx, self.device), jax.device_put(mask, self.device),
                   text_len=text_len)

  def get_batch(self, idx, pad_to: int | None = None, text_len: int | None = None) -> dict:
    """`ExampleSource.get_batch` on the device (same padding rule)."""
    idx, mask = pad_indices(idx, pad_to)
    return self.gather(idx, mask, text_len)

  def batches(self, indices, batch_size: int, *, seed: int | None = None, epoch: int = 0,
              drop_remainder: bool = False, pad_to_batch: bool = True,
              buckets: Sequence[int] | None = None) -> Iterator[dict]:
    """`pipeline.batches` (same order, padding and shapes) gathered on the device; with
    `buckets`, each batch's text is cut like `trim.trim_batch` would."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if seed is not None:
      indices = indices[_epoch_rng(seed, epoch, 1).permutation(len(indices))]
    n = len(indices)
    steps = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    for s in range(steps):
      idx = indices[s * batch_size:(s + 1) * batch_size]
      yield self.get_batch(idx, batch_size if pad_to_batch else None,
                           self.text_length(idx, buckets))

  def unlearning_batches(self, forget_idx, retain_sampler, epoch: int, batch_size: int,
                         noisy_tokens=None, seed: int = 0,
                         buckets: Sequence[int] | None = None) -> Iterator[dict]:
    """`pipeline.unlearning_batches` gathered on the device: {'forget', 'retain',
    'forget_noisy'} per step, the same examples in the same order. With `buckets`, every
    set's text is cut to one shared length, as `trim.trim_batch` cuts the host batch."""
    forget = np.asarray(forget_idx, np.int64).reshape(-1)
    if len(forget) == 0:
      return
    forget = forget[_epoch_rng(seed, epoch, 2).permutation(len(forget))]
    retain = np.asarray(retain_sampler.epoch(epoch, len(forget)), np.int64)
    noisy = noisy_tokens(epoch) if callable(noisy_tokens) else noisy_tokens
    for s in range(math.ceil(len(forget) / batch_size)):
      f_idx, f_mask = pad_indices(forget[s * batch_size:(s + 1) * batch_size], batch_size)
      r_idx, r_mask = pad_indices(retain[s * batch_size:(s + 1) * batch_size], batch_size)
      fn = None if noisy is None else noisy.lookup(f_idx)
      length = self.max_len
      if buckets is not None:
        longest = int(max(self.lengths[f_idx].max(), self.lengths[r_idx].max(),
                          0 if fn is None else real_lengths(fn['attention_mask']).max()))
        usable = sorted({int(b) for b in buckets if int(b) < self.max_len} | {self.max_len})
        length = bucket_length(longest, usable)
      f = self.gather(f_idx, f_mask, length)
      r = self.gather(r_idx, r_mask, length)
      if fn is None:
        fn = {'input_ids': f['input_ids'][None], 'attention_mask': f['attention_mask'][None]}
      else:
        fn = {k: jax.device_put(np.asarray(v)[..., :length], self.device)
              for k, v in fn.items()}
      yield {'forget': f, 'retain': r, 'forget_noisy': fn}


def maybe_device_source(source, dtype: str = 'uint8', fraction: float = 0.5,
                        device=None) -> DeviceSource | None:
  """A DeviceSource when the quantised images fit in `fraction` of the device's memory
  (`fits_on_device`), else None (keep the host pipeline)."""
  device = device or jax.devices()[0]
  limit = device_memory_bytes(device)
  if limit is None:
    return None
  size = source.cohort.image_size
  bpp = np.dtype(dtype).itemsize
  if not fits_on_device(len(source), size, bpp, limit, fraction):
    return None
  return DeviceSource.from_source(source, dtype=dtype, device=device)
