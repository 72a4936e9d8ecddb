"""A BERT-style uncased WordPiece tokenizer built offline from the cohort's reports.

Why: without network access there is no SciBERT vocabulary to download, and a small vocabulary
fitted to the reports keeps a randomly initialised text encoder small. `[NOISE]` (the text
noise mask of REFERENCE 4) is an added special token so it is never lower-cased or split.
Pass the path of a real BERT/SciBERT tokenizer folder to `load_tokenizer` to use that instead.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # [PAD] = 0
NOISE_TOKEN = '[NOISE]'


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir):
  """Train on `texts`, save to `out_dir` (atomically), return the transformers tokenizer."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  import transformers

  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=None, lowercase=True)
  pre = pre_tokenizers.BertPreTokenizer()
  vocab = _deterministic_vocab(texts, int(vocab_size), normalizer, pre)
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


def _deterministic_vocab(texts, vocab_size, normalizer, pre_tokenizer):
  """Specials, every character (and its ## continuation), then whole words by frequency.

  Why not tokenizers' WordPieceTrainer: it breaks frequency ties through a randomly seeded
  hash map, so two runs on the same texts give different vocabularies (and different token
  ids), which breaks the same-seed-same-numbers rule and the model cache.
  """
  import collections
  counts = collections.Counter()
  for text in texts:
    words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    counts.update(w for w, _ in words)
  chars = sorted({c for w in counts for c in w})
  tokens = list(SPECIAL_TOKENS) + chars + ['##' + c for c in chars]
  budget = max(0, vocab_size - len(tokens))
  ranked = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
  tokens += ranked[:budget]
  return {t: i for i, t in enumerate(tokens)}


def load_tokenizer(path):
  """Load a saved tokenizer folder (ours or any local BERT tokenizer), never from the network."""
  import transformers
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer folder not found: {path}')
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if NOISE_TOKEN not in tok.get_vocab():
    tok.add_special_tokens({'additional_special_tokens': [NOISE_TOKEN]})
  return tok


def tokenizer_fingerprint(tokenizer) -> str:
  """A stable hash of what decides token ids (class, vocabulary, special tokens)."""
  import hashlib
  h = hashlib.sha1(type(tokenizer).__name__.encode())
  for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
    h.update(f'{i}\t{tok}\n'.encode())
  h.update(repr(sorted(map(str, tokenizer.all_special_tokens))).encode())
  h.update(repr(getattr(tokenizer, 'do_lower_case', None)).encode())
  return h.hexdigest()[:16]
