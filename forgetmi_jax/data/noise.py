"""Noisy copies of the forget set (REFERENCE 4): Gaussian image noise in JAX, text noise.

Image noise is keyed by (key, sample id[, epoch]), never by batch position, so a sample's noisy
copy is the same whichever batch it lands in, whether it is computed live or cached, and it is
fixed across epochs unless the epoch is passed (then it is redrawn every epoch).

Text noise uses nlpaug's character augmenters (insert / substitute / swap / delete) and word
augmenters (RandomWordAug delete / swap, SpellingAug from nlpaug's bundled offline dictionary;
SynonymAug is not available offline: it needs WordNet). nlpaug draws from python's `random` and
numpy's global RNG; every call here seeds both from (seed, sample id, draw, epoch) under a lock
and restores the previous global states afterwards, so results are reproducible and no global
random state leaks to or from the caller.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import random
import re
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NOISE_TOKEN = '[NOISE]'
NUMBER_TOKEN = 'NUMBER'
# The reference code's frequent clinical keywords that its text noise masks with [NOISE].
REFERENCE_KEYWORDS = ('atelectasis', 'lung', 'edema', 'cardiomegaly', 'silhouette',
                      'pneumothorax', 'markings', 'disease', 'NUMBER', 'chest')
TEXT_MODES = ('char', 'word', 'reference', 'none')
CHAR_ACTIONS = ('insert', 'substitute', 'swap', 'delete')
WORD_ACTIONS = ('delete', 'swap', 'spelling')


# ----------------------------------------------------------------------------------- images
def add_image_noise(key, images, sample_ids, mu, sigma, num_draws: int = 1, epoch=None):
  """K noisy copies of a batch: clip(images + N(mu, sigma), 0, 1) -> [K, B, H, W, C].

  Per-sample key = fold_in(fold_in(key, sample_id), epoch) (the epoch fold only when `epoch`
  is given), then one key per draw. Pure and jittable; mu, sigma and epoch may be traced.
  """
  use_epoch = epoch is not None  # one compiled function serves both (a traced flag)
  return _image_noise(key, images, sample_ids, mu, sigma, 0 if epoch is None else epoch,
                      use_epoch, num_draws=int(num_draws))


@functools.partial(jax.jit, static_argnames=('num_draws',))
def _image_noise(key, images, sample_ids, mu, sigma, epoch, use_epoch, *, num_draws):
  images = jnp.asarray(images)
  sample_ids = jnp.asarray(sample_ids).astype(jnp.uint32)
  mu = jnp.asarray(mu, images.dtype)
  sigma = jnp.asarray(sigma, images.dtype)
  epoch = jnp.asarray(epoch).astype(jnp.uint32)

  def one(img, sid):
    k = jax.random.fold_in(key, sid)
    k = jax.lax.cond(use_epoch, lambda: jax.random.fold_in(k, epoch), lambda: k)
    draws = jax.random.split(k, num_draws)
    noise = jax.vmap(lambda d: jax.random.normal(d, img.shape, img.dtype))(draws)
    return jnp.clip(img[None] + mu + sigma * noise, 0.0, 1.0)

  return jnp.swapaxes(jax.vmap(one)(images, sample_ids), 0, 1)


# -------------------------------------------------------------------------------------- text
_LOCK = threading.Lock()
_AUGS: dict = {}


def _aug(kind: str, action: str, p: float):
  """Cached nlpaug augmenters: whitespace tokens, `[NOISE]`/`NUMBER` protected, no caps."""
  k = (kind, action, p)
  if k not in _AUGS:
    common = dict(tokenizer=str.split, reverse_tokenizer=' '.join,
                  stopwords=[NOISE_TOKEN, NUMBER_TOKEN])
    if kind == 'char':
      import nlpaug.augmenter.char as nac
      # One character edit per chosen word; a fraction p of the eligible words is chosen.
      _AUGS[k] = nac.RandomCharAug(action=action, aug_char_min=1, aug_char_max=1,
                                   aug_char_p=1.0, aug_word_p=p, aug_word_min=1,
                                   aug_word_max=None, min_char=2, **common)
    elif action == 'spelling':
      import nlpaug.augmenter.word as naw
      _AUGS[k] = naw.SpellingAug(aug_p=p, aug_min=1, aug_max=None, **common)
    else:
      import nlpaug.augmenter.word as naw
      _AUGS[k] = naw.RandomWordAug(action=action, aug_p=p, aug_min=1, aug_max=None, **common)
  return _AUGS[k]


def _seed_of(*parts) -> int:
  h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
  return int.from_bytes(h, 'little')


class TextNoiser:
  """Deterministic text noise: `apply(texts, sample_ids, num_draws, epoch) -> [K][B] strings`.

  mode 'char': one nlpaug character action (insert / substitute / swap / delete, drawn per
    text) applied to a fraction p of the eligible words (len >= 2, not [NOISE] / NUMBER).
  mode 'word': one word action (RandomWordAug delete or swap, or SpellingAug) on a fraction p.
  mode 'reference': the public code's noise: with probability p mask up to 2 occurrences of
    the clinical keywords with [NOISE], then word or char noise (coin flip) at rate p.
    (Its synonym swap needs WordNet and is replaced by the offline word actions.)
  mode 'none': texts unchanged.
  Each output depends only on (seed, sample id, draw, epoch, text).
  """

  def __init__(self, mode: str = 'char', p: float = 0.1, seed: int = 0,
               word_actions: Sequence[str] = WORD_ACTIONS,
               char_actions: Sequence[str] = CHAR_ACTIONS):
    if mode not in TEXT_MODES:
      raise ValueError(f'text noise mode must be one of {TEXT_MODES}, got {mode!r}')
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'text noise p must lie in [0, 1], got {p}')
    bad = [a for a in word_actions if a not in WORD_ACTIONS] + \
          [a for a in char_actions if a not in CHAR_ACTIONS]
    if bad:
      raise ValueError(f'unknown text noise action(s) {bad}')
    self.mode, self.p, self.seed = mode, float(p), int(seed)
    self.word_actions, self.char_actions = tuple(word_actions), tuple(char_actions)
    self._kw = re.compile(r'(?<!\S)(' + '|'.join(map(re.escape, REFERENCE_KEYWORDS)) + r')(?!\S)')

  def apply(self, texts: Sequence[str], sample_ids, num_draws: int = 1, epoch: int = 0
            ) -> list[list[str]]:
    ids = np.asarray(sample_ids).reshape(-1)
    if len(ids) != len(texts):
      raise ValueError(f'{len(texts)} texts but {len(ids)} sample ids')
    return [[self.one(t, int(i), k, epoch) for t, i in zip(texts, ids)]
            for k in range(int(num_draws))]

  def one(self, text: str, sample_id: int, draw: int = 0, epoch: int = 0) -> str:
    if self.mode == 'none' or self.p == 0.0 or not text.strip():
      return text
    seed = _seed_of(self.seed, int(sample_id), int(draw), int(epoch))
    with _LOCK:
      py_state, np_state = random.getstate(), np.random.get_state()
      try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self._noise(text)
      finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

  def _noise(self, text: str) -> str:
    mode = self.mode
    if mode == 'reference':
      if random.random() < self.p:
        text = self._mask_keywords(text, max_count=2)
      mode = 'word' if random.random() < 0.5 else 'char'
    if mode == 'char':
      aug = _aug('char', random.choice(self.char_actions), self.p)
    else:
      aug = _aug('word', random.choice(self.word_actions), self.p)
    out = aug.augment(text)
    out = out[0] if isinstance(out, list) else out
    return out if out is not None else text

  def _mask_keywords(self, text: str, max_count: int) -> str:
    hits = [m.span() for m in self._kw.finditer(text)]
    if not hits:
      return text
    chosen = sorted(random.sample(hits, min(max_count, len(hits))), reverse=True)
    for a, b in chosen:
      text = text[:a] + NOISE_TOKEN + text[b:]
    return text


def changed_word_fraction(a: str, b: str) -> float:
  """Share of a's words that are not at their place in b (a cheap edit-rate estimate)."""
  wa, wb = a.split(), b.split()
  if not wa:
    return 0.0
  same = sum(bl.size for bl in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False)
             .get_matching_blocks())
  return 1.0 - same / len(wa)
