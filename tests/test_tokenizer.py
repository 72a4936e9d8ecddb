"""[NOISE] with a pretrained vocabulary: an in-range id, a finite BERT forward (issue 12)."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.data import tokenizer as T
from forgetmi_jax.data.noise import NOISE_TOKEN, TextNoiser
from forgetmi_jax.data.pipeline import make_noisy_tokens
from tests.helpers import minilm_folder as _minilm_folder

transformers = pytest.importorskip('transformers')

REPORTS = ['findings : mild pulmonary edema . no pneumothorax . heart size NUMBER cm .',
           'impression : cardiomegaly with lung markings , chest otherwise clear .',
           'no acute disease . atelectasis at the lung bases , silhouette preserved .']
L = 40


def test_pretrained_noise_tokens_in_vocab_and_bert_finite():
  from forgetmi_jax.models.bert import from_pretrained
  folder = _minilm_folder()
  with open(os.path.join(folder, 'config.json')) as f:
    vocab_size = json.load(f)['vocab_size']
  tok = T.load_tokenizer(folder)
  assert T.noise_token_id(tok) == tok.mask_token_id < vocab_size
  # p=1: keywords always masked; no SpellingAug (its dictionary takes seconds to load).
  noiser = TextNoiser('reference', p=1.0, seed=0, word_actions=('delete', 'swap'))
  cohort = types.SimpleNamespace(reports=REPORTS)
  ids = np.arange(len(REPORTS))
  noisy = make_noisy_tokens(tok, cohort, ids, noiser, L, num_draws=2)
  assert noisy.input_ids.shape == (2, len(REPORTS), L)
  assert 0 <= noisy.input_ids.min() and noisy.input_ids.max() < vocab_size
  T.check_token_ids(noisy.input_ids, vocab_size)
  # Independent check: the unmodified MiniLM tokenizer on the same noisy texts with [NOISE]
  # written as [MASK] gives exactly these ids, and every text was masked at least once.
  texts = noiser.apply(REPORTS, ids, num_draws=2)
  assert all(NOISE_TOKEN in t for draw in texts for t in draw)
  reference = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  for k, draw in enumerate(texts):
    enc = reference([t.replace(NOISE_TOKEN, reference.mask_token) for t in draw],
                    max_length=L, padding='max_length', truncation=True)
    np.testing.assert_array_equal(noisy.input_ids[k], enc['input_ids'])
    np.testing.assert_array_equal(noisy.attention_mask[k], enc['attention_mask'])
    n_noise = [t.count(NOISE_TOKEN) for t in draw]
    np.testing.assert_array_equal((noisy.input_ids[k] == tok.mask_token_id).sum(1), n_noise)
  # The MiniLM-loaded BERT is finite on them; the old id (= vocab size) gave NaN.
  module, params, _ = from_pretrained(folder)
  assert module.config.vocab_size == vocab_size
  apply = jax.jit(lambda i, m: module.apply({'params': params}, i, m, train=False)[1])
  flat_ids = jnp.asarray(noisy.input_ids.reshape(-1, L))
  flat_mask = jnp.asarray(noisy.attention_mask.reshape(-1, L))
  assert np.isfinite(np.asarray(apply(flat_ids, flat_mask))).all()
  bad = flat_ids.at[0, 2].set(vocab_size)
  assert np.isnan(np.asarray(apply(bad, flat_mask))[0]).all()
  with pytest.raises(ValueError, match=r'first 30522 at position \(0, 2\)'):
    T.check_token_ids(bad, vocab_size)


def test_pretrained_noise_target_and_decoding():
  folder = _minilm_folder()
  tok = T.load_tokenizer(folder, noise_target='[UNK]')
  assert T.noise_token_id(tok) == tok.unk_token_id
  tok = T.load_tokenizer(folder)
  enc = tok(['mild [NOISE] edema [MASK] [UNK]'])['input_ids'][0]
  assert enc.count(tok.mask_token_id) == 2 and tok.unk_token_id in enc
  assert tok.convert_ids_to_tokens([tok.mask_token_id]) == ['[MASK]']  # decoding unchanged
  plain = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  assert tok(REPORTS)['input_ids'] == plain(REPORTS)['input_ids']  # other text unchanged
  with pytest.raises(ValueError, match='not in the tokenizer'):
    T.load_tokenizer(folder, noise_target='[NOT-A-TOKEN]')


def test_own_vocabulary_keeps_its_noise_token(tmp_path):
  tok = T.train_wordpiece_tokenizer(REPORTS, 120, str(tmp_path / 'tok'))
  vocab = tok.get_vocab()
  assert T.NOISE_ALIAS not in vocab
  nid = vocab[NOISE_TOKEN]
  assert nid == len(tok) - 1 and T.noise_token_id(tok) == nid
  assert nid not in (tok.mask_token_id, tok.unk_token_id)
