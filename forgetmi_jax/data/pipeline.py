"""Tokenise once, then serve fixed-shape batches with grain.

Shapes are fixed for jit: every batch has exactly `batch_size` rows. A final partial batch is
padded by repeating its first real example and carries `mask` float32 [b] (1 real, 0 padding);
losses and metrics must weight rows by `mask` (padding rows have valid ids and labels, so any
lookup by `id` stays in range). `drop_remainder=True` drops the partial batch instead.

Batch dict: image float32 [b,H,W,1] in [0,1], input_ids / attention_mask int32 [b,L],
label int32 [b], id int32 [b] (the image's row in the cohort), mask float32 [b].
Unlearning steps: {'forget': batch, 'retain': batch, 'forget_noisy': {'input_ids',
'attention_mask': int32 [K,b,L]}} (K noisy text draws; the clean tokens with K=1 when no noisy
tokens are given).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
from typing import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
import pandas as pd

from forgetmi_jax.data.tokenizer import tokenizer_fingerprint
from forgetmi_jax.data.trim import bucket_length, real_lengths, usable_buckets
from forgetmi_jax.io_utils import atomic_write

BATCH_KEYS = ('image', 'input_ids', 'attention_mask', 'label', 'id', 'mask')
_CACHE: 'collections.OrderedDict[tuple, dict]' = collections.OrderedDict()
_CACHE_SIZE = 8


# ------------------------------------------------------------------------------- tokenising
def tokenize(tokenizer, texts: Sequence[str], max_len: int, cache_dir=None) -> dict:
  """{'input_ids', 'attention_mask'}: int32 [N, max_len], padded / truncated ([CLS] ... [SEP]).

  Each distinct text is tokenised once (studies share their report). Results are cached in
  memory by (tokenizer fingerprint, max_len, texts) and, with `cache_dir`, on disk (.npz,
  written atomically; holds token ids only).
  """
  texts = [str(t) for t in texts]
  codes, uniq = pd.factorize(pd.Series(texts, dtype=object), sort=False)
  h = hashlib.sha1()
  for t in uniq:
    h.update(t.encode('utf-8', 'surrogatepass'))
    h.update(b'\x00')
  key = (tokenizer_fingerprint(tokenizer), int(max_len), h.hexdigest())
  enc = _CACHE.get(key)
  path = None
  if enc is None and cache_dir:
    path = os.path.join(os.fspath(cache_dir), f'tokens-{key[0]}-{key[1]}-{key[2][:16]}.npz')
    if os.path.exists(path):
      with np.load(path) as z:
        enc = {'input_ids': z['input_ids'], 'attention_mask': z['attention_mask']}
  if enc is None:
    enc = _encode(tokenizer, list(uniq), max_len)
    if path:
      _atomic_savez(path, **enc)
  _CACHE[key] = enc
  _CACHE.move_to_end(key)
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return {k: v[codes] for k, v in enc.items()}


def _encode(tokenizer, texts, max_len, chunk=4096):
  ids, mask = [], []
  for s in range(0, len(texts), chunk):
    e = tokenizer(texts[s:s + chunk], max_length=int(max_len), padding='max_length',
                  truncation=True, return_tensors='np', return_token_type_ids=False)
    ids.append(np.asarray(e['input_ids'], np.int32))
    mask.append(np.asarray(e['attention_mask'], np.int32))
  if not ids:
    return {'input_ids': np.zeros((0, max_len), np.int32),
            'attention_mask': np.zeros((0, max_len), np.int32)}
  return {'input_ids': np.concatenate(ids), 'attention_mask': np.concatenate(mask)}


def _atomic_savez(path, **arrays):
  atomic_write(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------------- source
class ExampleSource:
  """The cohort plus per-image tokens: a grain RandomAccessDataSource (len, getitem).

  `get_batch(idx, pad_to)` is the fast path used by the iterators (one vectorised read).
  """

  def __init__(self, cohort, input_ids: np.ndarray, attention_mask: np.ndarray):
    if len(input_ids) != len(cohort) or len(attention_mask) != len(cohort):
      raise ValueError(f'{len(input_ids)} token rows for a cohort of {len(cohort)} images')
    self.cohort = cohort
    self.input_ids = np.asarray(input_ids, np.int32)
    self.attention_mask = np.asarray(attention_mask, np.int32)
    self.labels = np.asarray(cohort.labels, np.int32)
    self._lengths = None

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i) -> dict:
    b = self.get_batch(np.asarray([int(i)]))
    return {k: v[0] for k, v in b.items()}

  def __getitems__(self, idx) -> list:
    b = self.get_batch(np.asarray(idx))
    return [{k: v[j] for k, v in b.items()} for j in range(len(idx))]

  @property
  def max_len(self) -> int:
    return self.input_ids.shape[1]

  @property
  def lengths(self) -> np.ndarray:
    """Per image: its report's real token count (host side: picks each batch's text length)."""
    if self._lengths is None:
      self._lengths = real_lengths(self.attention_mask)
    return self._lengths

  def get_batch(self, idx, pad_to: int | None = None, text_len: int | None = None) -> dict:
    """Rows `idx` (padded to `pad_to` by `pad_indices`), text cut to `text_len` positions."""
    idx, mask = pad_indices(idx, pad_to)
    text = slice(None) if text_len is None else slice(0, int(text_len))
    return {'image': self.cohort.get_images(idx), 'input_ids': self.input_ids[idx, text],
            'attention_mask': self.attention_mask[idx, text], 'label': self.labels[idx],
            'id': idx.astype(np.int32), 'mask': mask}


def pad_indices(idx, pad_to: int | None = None):
  """(indices, mask) of a batch padded to `pad_to` rows by repeating its first index, mask 0
  on the copies (padding rows keep valid ids, so lookups by id stay in range)."""
  idx = np.asarray(idx, np.int64).reshape(-1)
  if len(idx) == 0:
    raise ValueError('empty batch')
  mask = np.ones(len(idx), np.float32)
  if pad_to is not None and len(idx) < pad_to:
    extra = pad_to - len(idx)
    idx = np.concatenate([idx, np.repeat(idx[:1], extra)])
    mask = np.concatenate([mask, np.zeros(extra, np.float32)])
  return idx, mask


def make_arrays(cohort, tokenized: dict) -> ExampleSource:
  """Wrap a cohort and its per-image tokens (from `tokenize(tok, cohort.reports, L)`)."""
  return ExampleSource(cohort, tokenized['input_ids'], tokenized['attention_mask'])


def make_source(cohort, tokenizer, max_len: int, cache_dir=None) -> ExampleSource:
  return make_arrays(cohort, tokenize(tokenizer, cohort.reports, max_len, cache_dir=cache_dir))


# ------------------------------------------------------------------------------ noisy text
@dataclasses.dataclass
class NoisyTokens:
  """K tokenised noisy copies of the forget reports: arrays [K, n, L] for image ids `ids`."""
  ids: np.ndarray
  input_ids: np.ndarray
  attention_mask: np.ndarray

  def __post_init__(self):
    self.ids = np.asarray(self.ids, np.int64)
    self._row = {int(i): r for r, i in enumerate(self.ids)}

  @property
  def num_draws(self) -> int:
    return self.input_ids.shape[0]

  def lookup(self, image_ids) -> dict:
    try:
      rows = np.asarray([self._row[int(i)] for i in np.asarray(image_ids).reshape(-1)])
    except KeyError as e:
      raise KeyError(f'image {e.args[0]} has no noisy tokens (not in the forget set)') from None
    return {'input_ids': self.input_ids[:, rows], 'attention_mask': self.attention_mask[:, rows]}


def make_noisy_tokens(tokenizer, cohort, forget_idx, noiser, max_len: int, num_draws: int = 1,
                      epoch: int = 0) -> NoisyTokens:
  """Noise each forget image's report K times (`TextNoiser`, keyed by image id) and tokenise."""
  forget_idx = np.asarray(forget_idx, np.int64)
  texts = [cohort.reports[int(i)] for i in forget_idx]
  draws = noiser.apply(texts, forget_idx, num_draws=num_draws, epoch=epoch)
  enc = [_encode(tokenizer, d, max_len) for d in draws]
  return NoisyTokens(ids=forget_idx, input_ids=np.stack([e['input_ids'] for e in enc]),
                     attention_mask=np.stack([e['attention_mask'] for e in enc]))


def noisy_token_table(source, cohort, forget_idx, noiser, num_draws: int, tokenizer,
                      max_len: int, epoch: int = 0) -> NoisyTokens:
  """`make_noisy_tokens` in the argument order the run pipeline uses (source is unused)."""
  del source
  return make_noisy_tokens(tokenizer, cohort, forget_idx, noiser, max_len, num_draws=num_draws,
                           epoch=epoch)


# -------------------------------------------------------------------------------- iterators
def _read_options(source, num_threads: int, prefetch: int):
  # A device-resident source gathers on the device: its reads are asynchronous already.
  threads = 0 if getattr(source, 'on_device', False) else num_threads
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


def _epoch_rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(epoch), purpose])


def step_length(source, buckets, rows, noisy=None) -> int | None:
  """The text length of a step over `rows` (arrays of image rows) and its noisy tokens: the
  longest real report rounded up to a bucket (trim.py), read from host-side lengths only (a
  device-resident batch is never read back). None without buckets (keep max_len)."""
  if buckets is None:
    return None
  longest = max(int(np.max(source.lengths[np.asarray(r, np.int64)], initial=0)) for r in rows)
  if noisy is not None:
    longest = max(longest, int(np.max(real_lengths(noisy['attention_mask']), initial=0)))
  return bucket_length(longest, usable_buckets(buckets, source.max_len))


def batches(source, indices, batch_size: int, *, seed: int | None = None,
            epoch: int = 0, drop_remainder: bool = False, pad_to_batch: bool = True,
            num_threads: int = 1, prefetch: int = 2, buckets=None) -> Iterator[dict]:
  """Batches over `indices` (shuffled by (seed, epoch) when seed is given), via grain.

  `source`: an ExampleSource, or a device_data.DeviceSource (same batches, on the device).
  Pipeline: grain MapDataset over batch numbers -> map(slice of the permuted index array ->
  source.get_batch, one vectorised read per batch) -> IterDataset with `num_threads` reader
  threads prefetching `prefetch` batches (num_threads=0: read in the caller's thread).
  `buckets` (trim.py): each batch's text is cut to its longest report's bucket.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if seed is not None:
    indices = indices[_epoch_rng(seed, epoch, 1).permutation(len(indices))]
  n = len(indices)
  steps = n // batch_size if drop_remainder else math.ceil(n / batch_size)
  if steps == 0:
    return iter(())
  pad = batch_size if pad_to_batch else None

  def read(s):
    s = int(s)
    rows = indices[s * batch_size:(s + 1) * batch_size]
    return source.get_batch(rows, pad_to=pad, text_len=step_length(source, buckets, [rows]))

  ds = grain.MapDataset.range(steps).map(read)
  return iter(ds.to_iter_dataset(_read_options(source, num_threads, prefetch)))


def _forget_part(source, rows, batch_size: int, noisy, buckets, other_rows=()):
  """A step's forget rows as (batch, 'forget_noisy', text length): the K noisy draws looked up
  for them (host arrays) or, without `noisy`, the clean tokens with K = 1; all cut to one length
  shared with the step's `other_rows` (e.g. its retain rows)."""
  ids, _ = pad_indices(rows, batch_size)
  looked_up = None if noisy is None else noisy.lookup(ids)
  length = step_length(source, buckets, [rows, *other_rows], looked_up)
  forget = source.get_batch(rows, pad_to=batch_size, text_len=length)
  if looked_up is None:
    forget_noisy = {'input_ids': forget['input_ids'][None],
                    'attention_mask': forget['attention_mask'][None]}
  else:  # length None (no buckets) keeps every position
    forget_noisy = {k: v[..., :length] for k, v in looked_up.items()}
  return forget, forget_noisy, length


def unlearning_batches(source, forget_idx, retain_sampler, epoch: int,
                       batch_size: int, noisy_tokens=None, seed: int = 0,
                       num_threads: int = 1, prefetch: int = 2,
                       retain_examples: int | None = None, buckets=None,
                       forget_batch_size: int | None = None) -> Iterator[dict]:
  """One unlearning epoch: the whole forget set once (shuffled by (seed, epoch)), each forget
  batch paired with as many retain examples, `retain_sampler.epoch(epoch, len(forget))`.

  `retain_examples` > len(forget) pairs that many retain examples instead (a whole retain
  pass: NegGrad+'s zip(retain, cycle(forget))): the shuffled forget set is cycled, full
  batches, and only the last retain batch is padded. There `forget_batch_size` (default
  `batch_size`) sets the forget rows per step: fewer than the retain rows cycle the forget set
  fewer times per epoch (Forget-MI+'s repair, whose forget rows only anchor).

  `noisy_tokens`: a NoisyTokens, a callable epoch -> NoisyTokens (text noise redrawn per
  epoch), or None (then 'forget_noisy' holds the clean tokens with K = 1).
  Every step has exactly `batch_size` rows per set (the forget set `forget_batch_size` when
  given; padding masked, see module docstring).
  `buckets`: all of a step's text (forget, retain, noisy draws) is cut to one length.
  """
  forget = np.asarray(forget_idx, np.int64).reshape(-1)
  if len(forget) == 0:
    return iter(())
  forget = forget[_epoch_rng(seed, epoch, 2).permutation(len(forget))]
  cycle = retain_examples is not None and int(retain_examples) > len(forget)
  forget_rows = batch_size if forget_batch_size is None else int(forget_batch_size)
  if forget_rows != batch_size and not cycle:
    raise ValueError(f'forget_batch_size={forget_batch_size} needs a cycled forget set '
                     f'(retain_examples > {len(forget)} forget examples), got '
                     f'retain_examples={retain_examples}')
  if forget_rows < 1:
    raise ValueError(f'forget_batch_size={forget_batch_size} must be >= 1')
  retain = np.asarray(retain_sampler.epoch(epoch, int(retain_examples) if cycle else len(forget)),
                      np.int64)
  noisy = noisy_tokens(epoch) if callable(noisy_tokens) else noisy_tokens
  steps = math.ceil(len(retain if cycle else forget) / batch_size)

  def step(s):
    s = int(s)
    rows = (forget[(s * forget_rows + np.arange(forget_rows)) % len(forget)] if cycle
            else forget[s * batch_size:(s + 1) * batch_size])
    retain_rows = retain[s * batch_size:(s + 1) * batch_size]
    forget_batch, forget_noisy, length = _forget_part(source, rows, forget_rows, noisy, buckets,
                                                      [retain_rows])
    retain_batch = source.get_batch(retain_rows, pad_to=batch_size, text_len=length)
    return {'forget': forget_batch, 'retain': retain_batch, 'forget_noisy': forget_noisy}

  ds = grain.MapDataset.range(steps).map(step)
  return iter(ds.to_iter_dataset(_read_options(source, num_threads, prefetch)))


def target_batches(source, indices, batch_size: int, noisy_tokens=None,
                   buckets=None) -> Iterator[dict]:
  """All of `indices` in order, in padded batches shaped like an unlearning step's forget part:
  {'forget': batch, 'forget_noisy': [K,b,L] tokens} (for caching the frozen model's outputs).
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  noisy = noisy_tokens(0) if callable(noisy_tokens) else noisy_tokens
  for s in range(math.ceil(len(indices) / batch_size)):
    rows = indices[s * batch_size:(s + 1) * batch_size]
    forget_batch, forget_noisy, _ = _forget_part(source, rows, batch_size, noisy, buckets)
    yield {'forget': forget_batch, 'forget_noisy': forget_noisy}


# ---------------------------------------------------------------------------------- devices
def shard(batch, num_devices: int, batch_axis: Callable[[tuple], int] | None = None):
  """Split the example axis over devices: leaves [b, ...] -> [D, b/D, ...].

  Leaves under a 'forget_noisy' key have the example axis second ([K, b, L]) and become
  [D, K, b/D, L]. Pass `batch_axis(path) -> axis` to override.
  """
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}')

  def axis_of(path):
    if batch_axis is not None:
      return batch_axis(path)
    keys = [getattr(p, 'key', None) for p in path]
    return 1 if 'forget_noisy' in keys else 0

  def split(path, x):
    x = np.asarray(x)
    ax = axis_of(path)
    n = x.shape[ax]
    if n % num_devices:
      name = '/'.join(str(getattr(p, 'key', p)) for p in path)
      raise ValueError(f'batch axis of {name!r} has {n} rows, not divisible by {num_devices} '
                       f'devices; use a batch size that is a multiple of the device count')
    shape = x.shape[:ax] + (num_devices, n // num_devices) + x.shape[ax + 1:]
    return np.moveaxis(x.reshape(shape), ax, 0)

  return jax.tree_util.tree_map_with_path(split, batch)
