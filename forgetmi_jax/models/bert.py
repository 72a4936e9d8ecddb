"""BERT text encoder in flax.linen, and loading of Hugging Face BERT checkpoint folders.

transformers has no Flax models any more, so the encoder is written here and the loader maps a
checkpoint's tensors (safetensors, Flax msgpack or PyTorch .bin) onto its parameter tree. The
tokenizer comes from transformers (tokenizers only, no torch needed).

Parameter tree (inside the 'params' collection):
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding,
  embeddings/layer_norm/{scale,bias}
  layer_{i}/{query,key,value,attention_output,intermediate,output}/{kernel,bias},
  layer_{i}/{attention_layer_norm,output_layer_norm}/{scale,bias}
  pooler/{kernel,bias}
so "the last k blocks" of CF-k / EU-k are the last k `layer_{i}` (see `bert_block_names`).

Missing pooler: a checkpoint without `pooler.dense.*` (e.g. some masked-LM exports) raises by
default, because the pooler output is the text embedding and silently using random weights
would change results; pass `missing_pooler='init'` to initialise it randomly with a warning
(what transformers does).
"""
import dataclasses
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from safetensors import safe_open
from safetensors.numpy import load_file

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (field names as in Hugging Face config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'  # 'gelu' is the exact erf form, as in transformers
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of '
                       f'num_attention_heads {self.num_attention_heads}')
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'unsupported hidden_act {self.hidden_act!r} (known: {sorted(_ACTIVATIONS)})')

  @classmethod
  def from_json(cls, path: str) -> 'BertConfig':
    """Read a Hugging Face config.json (a file, or a folder holding one); extra keys ignored."""
    if os.path.isdir(path):
      path = os.path.join(path, 'config.json')
    with open(path) as f:
      raw = json.load(f)
    if raw.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'{path}: only absolute position embeddings are supported, got '
                       f"{raw['position_embedding_type']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})

  @classmethod
  def small(cls, vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=512, max_position_embeddings=128, **kwargs) -> 'BertConfig':
    """A tiny random-init configuration for tests and synthetic runs."""
    return cls(vocab_size=vocab_size, hidden_size=hidden_size,
               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
               intermediate_size=intermediate_size,
               max_position_embeddings=max_position_embeddings, **kwargs)

  @classmethod
  def base(cls, vocab_size=31090, **kwargs) -> 'BertConfig':
    """BERT-base shape (SciBERT scivocab's vocabulary by default)."""
    return cls(vocab_size=vocab_size, **kwargs)


_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


def bert_block_names(num_hidden_layers: int) -> Tuple[str, ...]:
  """Encoder layer names in forward order (the last k are CF-k / EU-k's "last k blocks")."""
  return tuple(f'layer_{i}' for i in range(num_hidden_layers))


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train: bool):
    c = self.config
    init = nn.initializers.normal(c.initializer_range)
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f'sequence length {length} exceeds max_position_embeddings '
                       f'{c.max_position_embeddings}')
    words = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, dtype=self.dtype,
                     name='word_embeddings')(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                   dtype=self.dtype, name='position_embeddings')(jnp.arange(length)[None, :])
    types = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, dtype=self.dtype,
                     name='token_type_embeddings')(token_type_ids)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='layer_norm')(
        words + pos + types)
    return nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(x)


class BertLayer(nn.Module):
  """Post-LN transformer layer: self-attention + residual + LN, FFN + residual + LN."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, train: bool):
    c = self.config
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, kernel_init=nn.initializers.normal(c.initializer_range), dtype=self.dtype, name=name)
    b, length, _ = x.shape
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda t: t.reshape(b, length, heads, head_dim)  # noqa: E731
    q = split(dense(c.hidden_size, 'query')(x))
    k = split(dense(c.hidden_size, 'key')(x))
    v = split(dense(c.hidden_size, 'value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(self.dtype)
    # Softmax in float32 whatever the compute dtype; masked keys get a large negative bias.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob, deterministic=not train)(probs)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v).reshape(b, length, -1)
    attn = dense(c.hidden_size, 'attention_output')(ctx)
    attn = nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(attn)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='attention_layer_norm')(
        x + attn)
    h = _ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, 'intermediate')(x))
    h = dense(c.hidden_size, 'output')(h)
    h = nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(h)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='output_layer_norm')(
        x + h)


class BertModel(nn.Module):
  """input_ids [B, L] -> (sequence_output [B, L, H], pooled_output [B, H]).

  pooled_output = tanh(W h_CLS + b), followed (train=True only) by dropout at
  hidden_dropout_prob: it is the text embedding z_txt of the multimodal model (REFERENCE 3).
  Dropout uses the 'dropout' rng.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  def block_names(self) -> Tuple[str, ...]:
    return bert_block_names(self.config.num_hidden_layers)

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(c, self.dtype, name='embeddings')(input_ids, token_type_ids, train)
    keep = attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, self.dtype, name=f'layer_{i}')(x, bias, train)
    pooled = nn.Dense(c.hidden_size, kernel_init=nn.initializers.normal(c.initializer_range),
                      dtype=self.dtype, name='pooler')(x[:, 0])
    pooled = jnp.tanh(pooled)
    pooled = nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(pooled)
    return x, pooled


# ------------------------------------------------------------------ checkpoint loading

_WEIGHT_FILES = ('model.safetensors', 'flax_model.msgpack', 'pytorch_model.bin')

# our sub-path -> Hugging Face (PyTorch) module name, per layer and outside the layers.
_LAYER_MAP = {
    'query': 'attention.self.query',
    'key': 'attention.self.key',
    'value': 'attention.self.value',
    'attention_output': 'attention.output.dense',
    'attention_layer_norm': 'attention.output.LayerNorm',
    'intermediate': 'intermediate.dense',
    'output': 'output.dense',
    'output_layer_norm': 'output.LayerNorm',
}
_EMB_MAP = {
    'word_embeddings': 'embeddings.word_embeddings',
    'position_embeddings': 'embeddings.position_embeddings',
    'token_type_embeddings': 'embeddings.token_type_embeddings',
    'layer_norm': 'embeddings.LayerNorm',
}


def _hf_name(path: Tuple[str, ...]) -> Tuple[str, bool]:
  """Our param path -> (HF tensor name, needs transpose [out,in] -> [in,out])."""
  *mods, leaf = path
  if mods[0] == 'embeddings':
    module = _EMB_MAP[mods[1]]
  elif mods[0] == 'pooler':
    module = 'pooler.dense'
  else:
    i = int(mods[0].split('_')[1])
    module = f'encoder.layer.{i}.{_LAYER_MAP[mods[1]]}'
  suffix = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}[leaf]
  return f'{module}.{suffix}', leaf == 'kernel'


def _is_ignored(name: str) -> bool:
  """Pretraining heads and buffers that are not parameters of the encoder."""
  return (name.startswith('cls.') or name.endswith('position_ids')
          or name.endswith('embeddings.token_type_ids'))


def _normalise_names(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Strip a `bert.` prefix and map legacy LayerNorm gamma/beta to weight/bias."""
  out = {}
  for name, value in state.items():
    if name.startswith('bert.'):
      name = name[len('bert.'):]
    if name.endswith('LayerNorm.gamma'):
      name = name[:-len('gamma')] + 'weight'
    elif name.endswith('LayerNorm.beta'):
      name = name[:-len('beta')] + 'bias'
    if name in out:
      raise ValueError(f'checkpoint has tensor {name!r} twice (with and without a prefix?)')
    out[name] = value
  return out


def convert_hf_state_dict(state: Dict[str, Any], config: BertConfig, *,
                          missing_pooler: str = 'raise',
                          rng: Optional[jax.Array] = None) -> Tuple[dict, List[str]]:
  """Map a Hugging Face BERT state dict (PyTorch naming) onto our parameter tree.

  Returns (params, ignored_names). Linear weights are transposed from torch's [out, in] to
  flax's [in, out]. Unknown tensors, missing parameters and shape mismatches raise a ValueError
  naming them; `cls.*` heads and `position_ids` / `token_type_ids` buffers are ignored.
  """
  if missing_pooler not in ('raise', 'init'):
    raise ValueError(f"missing_pooler must be 'raise' or 'init', got {missing_pooler!r}")
  state = _normalise_names({k: np.asarray(v) for k, v in state.items()})
  ignored = sorted(k for k in state if _is_ignored(k))
  model = BertModel(config)
  ids = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))['params']
  flat = {path: sd for path, sd in _flatten(shapes)}
  wanted = {_hf_name(path)[0]: path for path in flat}
  unknown = sorted(k for k in state if k not in wanted and not _is_ignored(k))
  missing = sorted(k for k in wanted if k not in state)
  pooler_missing = [k for k in missing if k.startswith('pooler.')]
  if missing_pooler == 'init' and len(pooler_missing) == 2:
    missing = [k for k in missing if not k.startswith('pooler.')]
  if unknown or missing:
    raise ValueError(f'BERT checkpoint does not match the config: unknown tensors {unknown}, '
                     f'missing tensors {missing}'
                     + (" (pass missing_pooler='init' to initialise the pooler randomly)"
                        if pooler_missing and missing_pooler == 'raise' else ''))
  params: dict = {}
  for name, path in wanted.items():
    if name not in state:  # the pooler, with missing_pooler='init'
      continue
    value = state[name]
    if _hf_name(path)[1]:
      value = value.T
    if tuple(value.shape) != tuple(flat[path].shape):
      raise ValueError(f'tensor {name!r} has shape {value.shape}, expected {flat[path].shape} '
                       f'for {"/".join(path)}')
    _set(params, path, jnp.asarray(value, dtype=jnp.float32))
  if pooler_missing:
    warnings.warn('BERT checkpoint has no pooler; initialising pooler/{kernel,bias} randomly')
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params['pooler'] = {
        'kernel': config.initializer_range * jax.random.normal(
            rng, (config.hidden_size, config.hidden_size), jnp.float32),
        'bias': jnp.zeros((config.hidden_size,), jnp.float32)}
  return params, ignored


def read_hf_weights(path: str) -> Dict[str, np.ndarray]:
  """Tensors of a checkpoint folder in PyTorch naming, from the first weight file found."""
  for fname in _WEIGHT_FILES:
    fpath = os.path.join(path, fname)
    if os.path.exists(fpath):
      break
  else:
    raise FileNotFoundError(f'{path}: no weights file (looked for {", ".join(_WEIGHT_FILES)})')
  if fname == 'model.safetensors':
    try:
      return load_file(fpath)
    except TypeError:  # bfloat16 tensors: numpy has no such dtype; read via jax, upcast
      out = {}
      with safe_open(fpath, framework='flax') as f:
        for k in f.keys():
          t = f.get_tensor(k)
          out[k] = np.asarray(t.astype(jnp.float32) if jnp.issubdtype(t.dtype, jnp.floating)
                              else t)
      return out
  if fname == 'flax_model.msgpack':
    with open(fpath, 'rb') as f:
      tree = serialization.msgpack_restore(f.read())
    return _flax_to_torch_names(tree)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{fpath}: reading pytorch_model.bin needs torch; convert the checkpoint '
                      'to model.safetensors or install torch') from e
  state = torch.load(fpath, map_location='cpu', weights_only=True)
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def _flax_to_torch_names(tree) -> Dict[str, np.ndarray]:
  """HF Flax msgpack tree -> PyTorch-style names (kernels transposed back to [out, in])."""
  out = {}
  for path, value in _flatten(tree):
    *mods, leaf = path
    value = np.asarray(value)
    if leaf == 'kernel':
      value = value.T
    leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
    out['.'.join(list(mods) + [leaf])] = value
  return out


def load_tokenizer(path: str):
  """The folder's tokenizer via transformers, offline (local files only)."""
  from transformers import AutoTokenizer, BertTokenizerFast
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    if os.path.exists(os.path.join(path, 'vocab.txt')):
      return BertTokenizerFast.from_pretrained(path, local_files_only=True)
    raise ValueError(f'{path}: cannot load a tokenizer ({e})') from e


def from_pretrained(path: str, *, missing_pooler: str = 'raise', dtype=jnp.float32,
                    rng: Optional[jax.Array] = None):
  """Load a Hugging Face BERT folder -> (BertModel, params, tokenizer).

  `params` is the tree for `module.apply({'params': params}, ...)`. Ignored tensors (pretraining
  heads, buffers) are logged at INFO level.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'BERT checkpoint folder not found: {path}')
  config = BertConfig.from_json(path)
  params, ignored = convert_hf_state_dict(read_hf_weights(path), config,
                                          missing_pooler=missing_pooler, rng=rng)
  if ignored:
    log.info('%s: ignored %d tensors: %s', path, len(ignored), ignored)
  return BertModel(config, dtype=dtype), params, load_tokenizer(path)


def load_bert_params_into(variables: dict, bert_params: dict,
                          path: Tuple[str, ...] = ('params', 'text_encoder')) -> dict:
  """Return a copy of `variables` with the subtree at `path` replaced by `bert_params`.

  The subtree must have exactly the same structure and shapes (a ValueError names what
  differs), so pretrained weights cannot silently land in a differently sized encoder.
  """
  node = variables
  for key in path:
    if key not in node:
      raise ValueError(f'variables have no {"/".join(path)} (missing {key!r})')
    node = node[key]
  old = dict(_flatten(node))
  new = dict(_flatten(bert_params))
  diff = sorted('/'.join(p) for p in set(old) ^ set(new))
  if diff:
    raise ValueError(f'BERT params do not match {"/".join(path)}: differing keys {diff}')
  bad = sorted('/'.join(p) for p in old if np.shape(old[p]) != np.shape(new[p]))
  if bad:
    raise ValueError(f'BERT params do not match {"/".join(path)}: shape mismatch at {bad}')

  subtree: dict = {}
  for p, value in new.items():
    _set(subtree, p, jnp.asarray(value, dtype=jnp.asarray(old[p]).dtype))

  def replace(tree, keys):
    out = dict(tree)
    out[keys[0]] = subtree if len(keys) == 1 else replace(tree[keys[0]], keys[1:])
    return out

  return replace(variables, tuple(path))


def _flatten(tree, prefix=()):
  """Nested dicts -> [(path tuple, leaf)] in insertion order."""
  if hasattr(tree, 'items'):
    out = []
    for k, v in tree.items():
      out.extend(_flatten(v, prefix + (str(k),)))
    return out
  return [(prefix, tree)]


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
