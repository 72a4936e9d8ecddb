"""A BERT-style uncased WordPiece tokenizer built offline from the cohort's reports.

Why: without network access there is no SciBERT vocabulary to download, and a small vocabulary
fitted to the reports keeps a randomly initialised text encoder small. `[NOISE]` (the text
noise mask of REFERENCE 4) is an added special token of that vocabulary (its own id, one more
embedding row), so it is never lower-cased or split.

Pass the path of a real BERT/SciBERT tokenizer folder to `load_tokenizer` to use that instead.
A pretrained vocabulary has no `[NOISE]`, and a new token would get id = vocab size, a row the
pretrained embedding does not have (JAX's out-of-range lookup gives NaN). So there `[NOISE]` is
mapped onto a token the vocabulary has, `[MASK]` by default (else `[UNK]`): a normaliser step
rewrites it into an internal alias word whose WordPiece id is that token's id.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger('forgetmi_jax')

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # [PAD] = 0
NOISE_TOKEN = '[NOISE]'
NOISE_ALIAS = 'forgetminoisealias'  # the word [NOISE] becomes in a pretrained tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir, groups=None,
                              min_groups: int = 1):
  """Train on `texts`, save to `out_dir` (atomically), return the transformers tokenizer.

  Privacy: with `groups` (the patients of each text), a word becomes a vocabulary entry only
  when at least `min_groups` patients use it, so a word only one patient's reports contain
  never appears in the saved vocabulary (it is spelled from characters instead).
  """
  import transformers

  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=None, lowercase=True)
  pre = pre_tokenizers.BertPreTokenizer()
  vocab = _deterministic_vocab(texts, int(vocab_size), normalizer, pre, groups, int(min_groups))
  tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token='[UNK]', max_input_chars_per_word=100))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre
  cls_id, sep_id = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
  tok.decoder = decoders.WordPiece(prefix='##')
  fast = transformers.BertTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
      sep_token='[SEP]', mask_token='[MASK]', do_lower_case=True)
  fast.add_special_tokens({'additional_special_tokens': [NOISE_TOKEN]})
  if fast.pad_token_id != 0:
    raise RuntimeError(f'[PAD] must have id 0, got {fast.pad_token_id}')
  out_dir = os.fspath(out_dir)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tokenizer-', dir=parent)
  try:
    fast.save_pretrained(tmp)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return load_tokenizer(out_dir)


def _deterministic_vocab(texts, vocab_size, normalizer, pre_tokenizer, groups=None,
                         min_groups=1):
  """Specials, every character (and its ## continuation), then whole words by frequency.

  Why not tokenizers' WordPieceTrainer: it breaks frequency ties through a randomly seeded
  hash map, so two runs on the same texts give different vocabularies (and different token
  ids), which breaks the same-seed-same-numbers rule and the model cache.
  """
  counts = collections.Counter()
  users = collections.defaultdict(set)
  texts = list(texts)
  groups = [{i} for i in range(len(texts))] if groups is None else list(groups)
  for text, group in zip(texts, groups):
    words = [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    counts.update(words)
    for w in words:
      users[w].update(group)
  chars = sorted({c for w in counts for c in w})
  tokens = list(SPECIAL_TOKENS) + chars + ['##' + c for c in chars]
  budget = max(0, vocab_size - len(tokens))
  ranked = sorted((w for w in counts if len(w) > 1 and len(users[w]) >= min_groups),
                  key=lambda w: (-counts[w], w))
  tokens += ranked[:budget]
  return {t: i for i, t in enumerate(tokens)}


def load_tokenizer(path, *, noise_target: str | None = None):
  """Load a saved tokenizer folder (ours or any local BERT tokenizer), never from the network.

  A vocabulary without `[NOISE]` (a pretrained one) gets `[NOISE]` mapped onto `noise_target`
  (default: its mask token, else its unknown token), see `alias_noise_token`.
  """
  import transformers
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer folder not found: {path}')
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if NOISE_TOKEN not in tok.get_vocab():
    alias_noise_token(tok, noise_target)
  return tok


def alias_noise_token(tokenizer, target: str | None = None) -> int | None:
  """Make `[NOISE]` encode to the id of `target`, a token the vocabulary already has.

  Why not `add_special_tokens`: that appends id = vocab size, out of the pretrained embedding's
  range. Here the backend's normaliser replaces `[NOISE]` by the word NOISE_ALIAS, and the
  WordPiece vocabulary maps that word to `target`'s id (decoding that id still gives
  `target`). Returns the id, or None (with a warning) when the tokenizer is not a WordPiece
  one: then `[NOISE]` stays plain text, split into ordinary in-vocabulary pieces.
  The alias lives in memory: `save_pretrained` does not keep it, `load_tokenizer` restores it.
  """
  vocab = tokenizer.get_vocab()
  if target is None:
    target = next((t for t in (tokenizer.mask_token, tokenizer.unk_token) if t and t in vocab),
                  None)
    if target is None:
      raise ValueError('the tokenizer has neither a mask nor an unknown token to stand for '
                       f'{NOISE_TOKEN}; pass noise_target')
  if target not in vocab:
    raise ValueError(f'noise_target {target!r} is not in the tokenizer\'s vocabulary')
  target_id = int(vocab[target])
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  spec = json.loads(backend.to_str())['model'] if backend is not None else {}
  if spec.get('type') != 'WordPiece':
    log.warning('%s tokenizer is not WordPiece: %s stays plain text (split into in-vocabulary '
                'pieces)', type(tokenizer).__name__, NOISE_TOKEN)
    return None
  words = dict(spec['vocab'])
  if words.get(NOISE_ALIAS, target_id) != target_id:
    raise ValueError(f'the vocabulary already uses {NOISE_ALIAS!r} for another id')
  words[NOISE_ALIAS] = target_id
  backend.model = models.WordPiece(
      vocab=words, unk_token=spec['unk_token'],
      continuing_subword_prefix=spec['continuing_subword_prefix'],
      max_input_chars_per_word=spec['max_input_chars_per_word'])
  replace = normalizers.Replace(NOISE_TOKEN, f' {NOISE_ALIAS} ')
  old = backend.normalizer
  backend.normalizer = replace if old is None else normalizers.Sequence([replace, old])
  got = noise_token_id(tokenizer)
  if got != target_id:
    raise RuntimeError(f'{NOISE_TOKEN} encodes to {got}, expected {target_id} ({target})')
  return target_id


def noise_token_id(tokenizer) -> int | None:
  """The one id `[NOISE]` encodes to, or None when it is split into several tokens."""
  ids = tokenizer(NOISE_TOKEN, add_special_tokens=False)['input_ids']
  return int(ids[0]) if len(ids) == 1 else None


def check_token_ids(input_ids, vocab_size: int, what: str = 'input_ids') -> None:
  """Raise if any token id lies outside [0, vocab_size) (the embedding would return NaN).

  The error names the first bad position and id, never text.
  """
  ids = np.asarray(input_ids)
  bad = np.argwhere((ids < 0) | (ids >= int(vocab_size)))
  if len(bad):
    pos = tuple(int(i) for i in bad[0])
    raise ValueError(f'{what}: {len(bad)} token id(s) outside [0, {int(vocab_size)}), first '
                     f'{int(ids[pos])} at position {pos}; the tokenizer does not match the '
                     f'text encoder\'s vocabulary')


def tokenizer_fingerprint(tokenizer) -> str:
  """A stable hash of what decides token ids (class, vocabulary, special tokens)."""
  h = hashlib.sha1(type(tokenizer).__name__.encode())
  for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
    h.update(f'{i}\t{tok}\n'.encode())
  h.update(repr(sorted(map(str, tokenizer.all_special_tokens))).encode())
  h.update(repr(getattr(tokenizer, 'do_lower_case', None)).encode())
  return h.hexdigest()[:16]
