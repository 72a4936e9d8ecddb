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

`DeviceSource.get_batch` gives the dict of `ExampleSource.get_batch` (keys image, input_ids,
attention_mask, label, id, mask; same dtypes and values): image, text and labels as device
arrays, id and mask as the host arrays they were made from (known on the host, so a step's
bookkeeping never reads the device back). `data/pipeline.py`'s `batches`,
`unlearning_batches` and `target_batches` take either source: one batching code path.
`make_train_source` picks the placement from `config.data.placement`.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax.data.pipeline import pad_indices
from forgetmi_jax.data.trim import real_lengths

log = logging.getLogger('forgetmi_jax')
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
def _gather(images, input_ids, attention_mask, labels, table, idx, text_len):
  # Normalising through a table of the host's own float32 values (value k -> k / max, 256 or
  # 65536 entries) keeps the batch bit-identical to the host pipeline: XLA's float division
  # may differ from numpy's by an ulp (it does on CPU). float32 storage has no table.
  x = images[idx]
  x = x if table is None else table[x.astype(jnp.int32)]
  return {'image': x, 'input_ids': input_ids[idx, :text_len],
          'attention_mask': attention_mask[idx, :text_len], 'label': labels[idx]}


@functools.partial(jax.jit, donate_argnums=(0,))
def _write(images, chunk, start):
  return jax.lax.dynamic_update_slice(images, chunk, (start, 0, 0, 0))


class DeviceSource:
  """A cohort's images (quantised), tokens, labels and ids resident on one device."""
  on_device = True

  def __init__(self, cohort, images, input_ids, attention_mask, labels, dtype: str, lengths,
               quantisation_error: float, device=None):
    self.cohort = cohort  # subjects, labels and metadata stay on the host
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
    return cls(source.cohort, images, put(source.input_ids), put(source.attention_mask), put(source.labels),
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
    batch = _gather(self.images, self.input_ids, self.attention_mask, self.labels, self._table,
                    jax.device_put(idx, self.device), text_len=text_len)
    return {**batch, 'id': idx, 'mask': mask}

  def get_batch(self, idx, pad_to: int | None = None, text_len: int | None = None) -> dict:
    """`ExampleSource.get_batch` on the device (same padding rule)."""
    idx, mask = pad_indices(idx, pad_to)
    return self.gather(idx, mask, text_len)

PLACEMENTS = ('auto', 'host', 'device')


def storage_dtype(cohort) -> str:
  """The dtype that holds the cohort's images losslessly: 'uint16' for MIMIC-CXR builds
  (stored as k / 65535), 'float32' otherwise (synthetic images are floats)."""
  return str(getattr(cohort.images, 'storage_dtype', 'float32'))


def make_train_source(source, placement: str = 'auto', fraction: float = 0.5, device=None):
  """The source the training and unlearning loops read (`config.data.placement`).

  'host': `source` itself (grain reads each batch on the host). 'device': the cohort copied
  to the accelerator once (`DeviceSource`, stored losslessly: `storage_dtype`), batches
  gathered there. 'auto': the device when its backend is not the CPU (on a CPU there is no
  transfer to save, only a second copy) and the images take at most `fraction` of its memory.
  Either way the batches, hence the results, are the same.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f'data.placement must be one of {PLACEMENTS}, got {placement!r}')
  if placement == 'host':
    return source
  device = device or jax.devices()[0]
  dtype = storage_dtype(source.cohort)
  needed = image_bytes(len(source), source.cohort.image_size, np.dtype(dtype).itemsize)
  limit = device_memory_bytes(device)
  fits = limit is not None and fits_on_device(len(source), source.cohort.image_size,
                                              np.dtype(dtype).itemsize, limit, fraction)
  if placement == 'auto' and (device.platform == 'cpu' or not fits):
    return source
  if not fits:
    log.warning('data.placement=device: the images take %.1f GB, more than %.0f %% of the '
                'device memory (%s); expect out-of-memory errors', needed / 1e9, 100 * fraction,
                'unknown' if limit is None else f'{limit / 1e9:.1f} GB')
  out = DeviceSource.from_source(source, dtype=dtype, device=device)
  log.info('data on the device (%s): %d images as %s, %.1f MB', device, len(out), dtype,
           out.nbytes / 1e6)
  return out
