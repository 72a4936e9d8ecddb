"""Device-resident data: batches gathered on the device equal the host pipeline's, bit for bit
(against the host pipeline fed the same quantised images; lossless for 8- and 16-bit sources).
Both sources go through the same `pipeline` iterators."""
import dataclasses

import numpy as np
import pytest

from forgetmi_jax.data.device_data import (DeviceSource, dequantise, device_memory_bytes,
                                           fits_on_device, image_bytes, make_train_source,
                                           quantise)
from forgetmi_jax.data.forget_sets import RetainSampler
from forgetmi_jax.data.pipeline import (BATCH_KEYS, NoisyTokens, batches, make_source,
                                        pad_indices, target_batches, unlearning_batches)
from forgetmi_jax.data.synthetic import make_synthetic_cohort
from forgetmi_jax.data.tokenizer import train_wordpiece_tokenizer
from forgetmi_jax.data.trim import real_lengths, trim_batch

MAX_LEN = 96


@pytest.fixture(scope='module')
def cohort_and_tokenizer(tmp_path_factory):
  cohort = make_synthetic_cohort(seed=0, image_size=32, num_subjects=20)
  tok = train_wordpiece_tokenizer(sorted(set(cohort.reports)), 300,
                                  tmp_path_factory.mktemp('tok') / 'tok')
  return cohort, tok


def _with_images(cohort, images):
  return dataclasses.replace(cohort, images=images)


def _assert_same_batch(dev, host):
  assert set(dev) == set(host) == set(BATCH_KEYS)
  for k in BATCH_KEYS:
    d, h = np.asarray(dev[k]), np.asarray(host[k])
    assert d.dtype == h.dtype and d.shape == h.shape, (k, d.dtype, h.dtype, d.shape, h.shape)
    np.testing.assert_array_equal(d, h, err_msg=k)


def test_uint8_batches_equal_host_pipeline_on_quantised_images(cohort_and_tokenizer):
  cohort, tok = cohort_and_tokenizer
  source = make_source(cohort, tok, MAX_LEN)
  dev = DeviceSource.from_source(source, dtype='uint8', chunk=24)  # 24 does not divide N
  # The host reference: the same cohort with its images replaced by their 8-bit version.
  q = quantise(np.asarray(cohort.images), 'uint8')
  host_source = make_source(_with_images(cohort, dequantise(q, 'uint8')), tok, MAX_LEN)
  np.testing.assert_array_equal(np.asarray(dev.images), q)
  assert 0 < dev.quantisation_error <= 0.5 / 255 + 1e-7
  assert dev.nbytes == q.nbytes + 2 * source.input_ids.nbytes + source.labels.nbytes
  idx = np.random.default_rng(0).permutation(len(source))[:27]
  host = list(batches(host_source, idx, 8, seed=3, epoch=1))
  devb = list(batches(dev, idx, 8, seed=3, epoch=1))
  assert len(host) == len(devb) == 4 and host[-1]['mask'].sum() == 3  # padded last batch
  for d, h in zip(devb, host):
    _assert_same_batch(d, h)
  _assert_same_batch(dev.get_batch(idx[:5], pad_to=8), host_source.get_batch(idx[:5], pad_to=8))


@pytest.mark.parametrize('dtype', ['uint8', 'uint16'])
def test_integer_sources_are_stored_losslessly(cohort_and_tokenizer, dtype):
  """k / 255 (8-bit files) with uint8, k / 65535 (the MIMIC-CXR build's uint16 records) with
  uint16: the device batch equals the host pipeline on the original images."""
  cohort, tok = cohort_and_tokenizer
  images = dequantise(quantise(np.asarray(cohort.images), dtype), dtype)
  source = make_source(_with_images(cohort, images), tok, MAX_LEN)
  dev = DeviceSource.from_source(source, dtype=dtype)
  assert dev.quantisation_error == 0.0 and dev.images.dtype == np.dtype(dtype)
  idx = np.arange(0, len(source), 3)
  for d, h in zip(batches(dev, idx, 16), batches(source, idx, 16)):
    _assert_same_batch(d, h)


def test_float32_storage_is_exact(cohort_and_tokenizer):
  cohort, tok = cohort_and_tokenizer
  source = make_source(cohort, tok, MAX_LEN)
  dev = DeviceSource.from_source(source, dtype='float32')
  assert dev.quantisation_error == 0.0
  _assert_same_batch(dev.get_batch([4, 1, 7]), source.get_batch([4, 1, 7]))


def test_unlearning_batches_equal_host_and_trimmed_host(cohort_and_tokenizer):
  cohort, tok = cohort_and_tokenizer
  images = dequantise(quantise(np.asarray(cohort.images), 'uint16'), 'uint16')
  source = make_source(_with_images(cohort, images), tok, MAX_LEN)
  dev = DeviceSource.from_source(source, dtype='uint16')
  subjects = np.unique(cohort.subject_id)
  forget_subjects = subjects[:4]
  is_forget = np.isin(cohort.subject_id, forget_subjects)
  forget_idx = np.flatnonzero(is_forget & ~cohort.is_test)
  retain_idx = np.flatnonzero(~is_forget & ~cohort.is_test)
  sampler = RetainSampler(cohort.subject_id, retain_idx, forget_subjects, seed=1)
  rng = np.random.default_rng(2)
  lengths = rng.integers(3, 40, (2, len(forget_idx)))  # K = 2 noisy draws, shorter texts
  mask = (np.arange(MAX_LEN)[None, None] < lengths[..., None]).astype(np.int32)
  noisy = NoisyTokens(ids=forget_idx, attention_mask=mask,
                      input_ids=(rng.integers(5, 300, mask.shape) * mask).astype(np.int32))
  buckets = (32, 48, 64, 80)  # the reports here have 36-88 tokens
  for epoch in (0, 1):
    host = list(unlearning_batches(source, forget_idx, sampler, epoch, 4, noisy, seed=5))
    plain = list(unlearning_batches(dev, forget_idx, sampler, epoch, 4, noisy, seed=5))
    cut = list(unlearning_batches(dev, forget_idx, sampler, epoch, 4, noisy, seed=5,
                                  buckets=buckets))
    host_cut = list(unlearning_batches(source, forget_idx, sampler, epoch, 4, noisy, seed=5,
                                       buckets=buckets))
    assert len(host) == len(plain) == len(cut) == len(host_cut) > 1
    for h, p, c, hc in zip(host, plain, cut, host_cut):
      t = trim_batch(h, buckets)  # cutting the padded host batch afterwards
      for s in ('forget', 'retain'):
        _assert_same_batch(p[s], h[s])
        _assert_same_batch(c[s], t[s])
        _assert_same_batch(hc[s], t[s])
      for k in ('input_ids', 'attention_mask'):
        np.testing.assert_array_equal(np.asarray(p['forget_noisy'][k]), h['forget_noisy'][k])
        np.testing.assert_array_equal(np.asarray(c['forget_noisy'][k]), t['forget_noisy'][k])
        np.testing.assert_array_equal(hc['forget_noisy'][k], t['forget_noisy'][k])
    widths = {c['forget']['input_ids'].shape[1] for c in cut}
    assert widths <= {64, 80, MAX_LEN} and min(widths) < MAX_LEN, widths
  # The frozen model's targets are read in the same batches from either source.
  for d, h in zip(target_batches(dev, forget_idx, 4, noisy, buckets=buckets),
                  target_batches(source, forget_idx, 4, noisy, buckets=buckets)):
    _assert_same_batch(d['forget'], h['forget'])
    np.testing.assert_array_equal(d['forget_noisy']['input_ids'], h['forget_noisy']['input_ids'])


def test_device_batches_carry_host_ids_and_masks(cohort_and_tokenizer):
  """The step's bookkeeping (real rows, cached-target lookups by id) reads host arrays: the
  device is never read back per step."""
  cohort, tok = cohort_and_tokenizer
  dev = DeviceSource.from_source(make_source(cohort, tok, MAX_LEN), dtype='float32')
  b = dev.get_batch([3, 1], pad_to=4)
  assert isinstance(b['id'], np.ndarray) and isinstance(b['mask'], np.ndarray)
  assert not isinstance(b['image'], np.ndarray)  # a device array


def test_pad_indices_and_lengths():
  idx, mask = pad_indices([5, 2], 4)
  np.testing.assert_array_equal(idx, [5, 2, 5, 5])
  np.testing.assert_array_equal(mask, [1, 1, 0, 0])
  m = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(real_lengths(m), [2, 3, 0, 4])


def test_fits_on_device_arithmetic():
  # The paper's cohort at 2048 px: 6,742 * 2048^2 pixels = 28.28e9 (uint8) / 56.56e9 (uint16)
  # bytes. Half of an H200's 141 GB holds either; half of an 80 GB H100 only the uint8 copy.
  assert image_bytes(6742, 2048, 1) == 6742 * 2048 * 2048 == 28_277_997_568
  h200, h100 = 141 * 10 ** 9, 80 * 10 ** 9
  assert fits_on_device(6742, 2048, 2, h200) and fits_on_device(6742, 2048, 1, h100)
  assert not fits_on_device(6742, 2048, 2, h100)
  assert fits_on_device(6742, 2048, 2, h100, fraction=0.75)
  assert fits_on_device(6742, 64, 4, 2 ** 30)  # the synthetic default: 110 MB in float32
  with pytest.raises(ValueError, match='fraction'):
    fits_on_device(1, 1, 1, 1, fraction=0)


def test_make_train_source_placement(cohort_and_tokenizer):
  cohort, tok = cohort_and_tokenizer
  source = make_source(cohort, tok, MAX_LEN)
  limit = device_memory_bytes()
  assert limit is not None and limit > 2 ** 28
  assert make_train_source(source, 'host') is source
  assert make_train_source(source, 'auto') is source  # a CPU: no transfer to save
  dev = make_train_source(source, 'device')
  assert isinstance(dev, DeviceSource) and dev.dtype == 'float32'  # synthetic floats: exact
  assert dev.cohort is cohort and np.array_equal(dev.lengths, source.lengths)
  with pytest.raises(ValueError, match='data.placement'):
    make_train_source(source, 'gpu')
  with pytest.raises(ValueError, match='image dtype'):
    DeviceSource.from_source(source, dtype='int8')
