"""Tokenizer, tokenisation cache, grain batches, unlearning steps and sharding."""
import os

import numpy as np
import pytest

from forgetmi_jax.data import pipeline as P
from forgetmi_jax.data.forget_sets import RetainSampler, make_forget_split
from forgetmi_jax.data.noise import TextNoiser
from forgetmi_jax.data.synthetic import make_synthetic_cohort
from forgetmi_jax.data.tokenizer import load_tokenizer, train_wordpiece_tokenizer

L = 48


@pytest.fixture(scope='module')
def cohort():
  return make_synthetic_cohort(seed=0, image_size=16, num_subjects=60)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory, cohort):
  d = str(tmp_path_factory.mktemp('tok') / 'wordpiece')
  train_wordpiece_tokenizer(cohort.reports, 400, d)
  return d


@pytest.fixture(scope='module')
def tok(tok_dir):
  return load_tokenizer(tok_dir)


@pytest.fixture(scope='module')
def source(cohort, tok):
  return P.make_arrays(cohort, P.tokenize(tok, cohort.reports, L))


@pytest.fixture(scope='module')
def split(cohort):
  return make_forget_split(cohort, 0.10, seed=0)


def test_tokenizer_specials_and_reload(tok, tok_dir, cohort):
  assert tok.pad_token_id == 0
  for t in ('[UNK]', '[CLS]', '[SEP]', '[MASK]'):
    assert t in tok.get_vocab()
  noise_id = tok.convert_tokens_to_ids('[NOISE]')
  enc = tok(['Mild [NOISE] EDEMA'], max_length=16, padding='max_length', truncation=True)
  ids = enc['input_ids'][0]
  assert ids[0] == tok.cls_token_id and noise_id in ids and ids.count(noise_id) == 1
  assert ids[ids.index(tok.sep_token_id) + 1:] == [0] * (16 - ids.index(tok.sep_token_id) - 1)
  assert tok(['mild edema'])['input_ids'] == tok(['MILD Edema'])['input_ids']  # uncased
  again = load_tokenizer(tok_dir)
  assert again(cohort.reports[:5])['input_ids'] == tok(cohort.reports[:5])['input_ids']
  assert 200 < len(tok) <= 401
  assert not [f for f in os.listdir(os.path.dirname(tok_dir)) if f.startswith('.tokenizer')]


class _Counting:
  """Delegates to a tokenizer and counts the texts it is asked to encode."""

  def __init__(self, tok):
    self._tok, self.n = tok, 0

  def __call__(self, texts, **kw):
    self.n += len(texts)
    return self._tok(texts, **kw)

  def __getattr__(self, name):
    return getattr(self._tok, name)


def test_tokenize_dedups_and_caches(tok, cohort, tmp_path):
  counting = _Counting(tok)
  P._CACHE.clear()
  enc = P.tokenize(counting, cohort.reports, L, cache_dir=str(tmp_path))
  n_unique = len(set(cohort.reports))
  assert counting.n == n_unique < len(cohort.reports)
  assert enc['input_ids'].shape == (len(cohort), L) and enc['input_ids'].dtype == np.int32
  assert enc['attention_mask'].dtype == np.int32
  same = [i for i in range(1, len(cohort)) if cohort.reports[i] == cohort.reports[0]]
  for i in same:
    np.testing.assert_array_equal(enc['input_ids'][i], enc['input_ids'][0])
  direct = tok(cohort.reports[:3], max_length=L, padding='max_length', truncation=True)
  np.testing.assert_array_equal(enc['input_ids'][:3], direct['input_ids'])
  P.tokenize(counting, cohort.reports, L)  # memory cache
  assert counting.n == n_unique
  P._CACHE.clear()
  again = P.tokenize(counting, cohort.reports, L, cache_dir=str(tmp_path))  # disk cache
  assert counting.n == n_unique
  np.testing.assert_array_equal(again['input_ids'], enc['input_ids'])
  assert [f for f in os.listdir(tmp_path) if f.endswith('.npz') and not f.startswith('.tmp')]
  P.tokenize(counting, cohort.reports, L + 1)  # another length is another entry
  assert counting.n == 2 * n_unique


def _collect(it):
  out = list(it)
  ids = np.concatenate([b['id'][b['mask'] > 0] for b in out]) if out else np.zeros(0)
  return out, ids


def test_batches_cover_once_with_fixed_shapes(source, cohort):
  idx = np.arange(0, len(cohort), 2)
  out, ids = _collect(P.batches(source, idx, 32))
  np.testing.assert_array_equal(ids, idx)  # unshuffled: in order
  for b in out:
    assert b['image'].shape == (32, 16, 16, 1) and b['image'].dtype == np.float32
    assert b['input_ids'].shape == (32, L) and b['input_ids'].dtype == np.int32
    assert b['label'].dtype == np.int32 and b['id'].dtype == np.int32
    assert b['mask'].dtype == np.float32
    real = b['mask'] > 0
    np.testing.assert_array_equal(b['label'], cohort.labels[b['id']])
    np.testing.assert_array_equal(b['image'], cohort.get_images(b['id']))
    np.testing.assert_array_equal(b['input_ids'], source.input_ids[b['id']])
    assert real[:real.sum()].all()  # padding only at the end
  assert out[-1]['mask'].sum() == len(idx) % 32 or len(idx) % 32 == 0
  dropped, dids = _collect(P.batches(source, idx, 32, drop_remainder=True))
  assert len(dids) == (len(idx) // 32) * 32 and all(b['mask'].all() for b in dropped)


def test_batches_shuffle_by_seed_and_epoch(source, cohort):
  idx = np.arange(len(cohort))
  _, a = _collect(P.batches(source, idx, 16, seed=1, epoch=0))
  _, b = _collect(P.batches(source, idx, 16, seed=1, epoch=0))
  _, c = _collect(P.batches(source, idx, 16, seed=1, epoch=1))
  _, d = _collect(P.batches(source, idx, 16, seed=2, epoch=0))
  np.testing.assert_array_equal(a, b)
  assert sorted(a.tolist()) == idx.tolist()
  assert not np.array_equal(a, c) and not np.array_equal(a, d) and not np.array_equal(a, idx)


def test_unlearning_epoch_pairs_forget_with_retain(source, cohort, split, tok):
  sampler = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=0)
  noiser = TextNoiser('char', p=0.2, seed=0)
  noisy = P.make_noisy_tokens(tok, cohort, split.forget_idx, noiser, L, num_draws=2)
  n_forget = len(split.forget_idx)
  bs = 8
  for epoch in (0, 1):
    steps = list(P.unlearning_batches(source, split.forget_idx, sampler, epoch, bs,
                                      noisy_tokens=noisy, seed=0))
    assert len(steps) == -(-n_forget // bs)
    f_ids = np.concatenate([s['forget']['id'][s['forget']['mask'] > 0] for s in steps])
    r_ids = np.concatenate([s['retain']['id'][s['retain']['mask'] > 0] for s in steps])
    assert sorted(f_ids.tolist()) == sorted(split.forget_idx.tolist())  # whole set, once
    np.testing.assert_array_equal(r_ids, sampler.epoch(epoch, n_forget))
    assert not np.isin(cohort.subject_id[r_ids], split.forget_subjects).any()
    for s in steps:
      assert s['forget']['image'].shape == (bs, 16, 16, 1)
      assert s['forget_noisy']['input_ids'].shape == (2, bs, L)
      assert s['forget_noisy']['attention_mask'].dtype == np.int32
      rows = [int(np.flatnonzero(noisy.ids == i)[0]) for i in s['forget']['id']]
      np.testing.assert_array_equal(s['forget_noisy']['input_ids'], noisy.input_ids[:, rows])
      np.testing.assert_array_equal(s['forget']['mask'], s['retain']['mask'])
    if epoch == 0:
      first = f_ids
  assert not np.array_equal(first, f_ids)  # reshuffled per epoch
  # Noisy text differs from the clean report for most forget samples.
  clean = source.input_ids[noisy.ids]
  assert (noisy.input_ids[0] != clean).any(axis=1).mean() > 0.5
  table = P.noisy_token_table(source, cohort, split.forget_idx, noiser, 2, tok, L)
  np.testing.assert_array_equal(table.input_ids, noisy.input_ids)  # same draws, other call
  plain = next(iter(P.unlearning_batches(source, split.forget_idx, sampler, 0, bs)))
  np.testing.assert_array_equal(plain['forget_noisy']['input_ids'][0], plain['forget']['input_ids'])


def test_unlearning_batches_full_retain_pass_cycles_the_forget_set(source, split, cohort):
  """retain_examples = the whole retain set: NegGrad+'s zip(retain, cycle(forget))."""
  sampler = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=0)
  n_retain, n_forget, bs = len(split.retain_idx), len(split.forget_idx), 8
  assert n_retain > 2 * n_forget
  steps = list(P.unlearning_batches(source, split.forget_idx, sampler, 1, bs,
                                    retain_examples=n_retain))
  assert len(steps) == -(-n_retain // bs)
  r_ids = np.concatenate([s['retain']['id'][s['retain']['mask'] > 0] for s in steps])
  np.testing.assert_array_equal(r_ids, sampler.epoch(1, n_retain))
  assert sorted(r_ids.tolist()) == sorted(split.retain_idx.tolist())  # each retain once
  f_ids = np.concatenate([s['forget']['id'] for s in steps])
  assert all(s['forget']['mask'].all() for s in steps)  # full forget batches, cycled
  once = list(P.unlearning_batches(source, split.forget_idx, sampler, 1, bs))
  order = np.concatenate([s['forget']['id'][s['forget']['mask'] > 0] for s in once])
  np.testing.assert_array_equal(f_ids, order[np.arange(len(f_ids)) % n_forget])
  # a retain count at most the forget set's is the plain epoch
  same = list(P.unlearning_batches(source, split.forget_idx, sampler, 1, bs,
                                   retain_examples=n_forget))
  for a, b in zip(same, once):
    np.testing.assert_array_equal(a['retain']['id'], b['retain']['id'])


def test_a_smaller_forget_batch_needs_the_cycled_epoch(source, split, cohort):
  sampler = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=0)
  n_retain, n_forget = len(split.retain_idx), len(split.forget_idx)
  steps = list(P.unlearning_batches(source, split.forget_idx, sampler, 1, 8,
                                    retain_examples=n_retain, forget_batch_size=3))
  assert len(steps) == -(-n_retain // 8)
  assert all(s['forget']['id'].shape == (3,) and s['retain']['id'].shape == (8,) for s in steps)
  f_ids = np.concatenate([s['forget']['id'] for s in steps])
  assert len(set(f_ids[:n_forget].tolist())) == min(n_forget, len(f_ids))  # a cycle, no repeat
  with pytest.raises(ValueError, match='forget_batch_size=3 needs a cycled forget set'):
    next(iter(P.unlearning_batches(source, split.forget_idx, sampler, 1, 8,
                                   forget_batch_size=3)))


def test_target_batches_in_order(source, split):
  got = list(P.target_batches(source, split.retain_idx, 16))
  ids = np.concatenate([b['forget']['id'][b['forget']['mask'] > 0] for b in got])
  np.testing.assert_array_equal(ids, split.retain_idx)
  assert got[0]['forget_noisy']['input_ids'].shape == (1, 16, L)


def test_shard(source, split, cohort):
  sampler = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=0)
  step = next(iter(P.unlearning_batches(source, split.forget_idx, sampler, 0, 8)))
  sh = P.shard(step, 2)
  assert sh['forget']['image'].shape == (2, 4, 16, 16, 1)
  assert sh['forget_noisy']['input_ids'].shape == (2, 1, 4, L)
  np.testing.assert_array_equal(sh['retain']['id'].reshape(-1), step['retain']['id'])
  np.testing.assert_array_equal(sh['forget_noisy']['input_ids'][1, 0],
                                step['forget_noisy']['input_ids'][0, 4:])
  with pytest.raises(ValueError, match='not divisible by 3'):
    P.shard(step, 3)
