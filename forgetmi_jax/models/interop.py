"""The public Forget-MI code's `ImageTextModel` PyTorch state dicts, in and out.

The public model (Chauhan et al. 2020's joint image-text model, reused by Forget-MI) is
  img_model:  ImageResNet: conv1, bn1, layer{1..7}.{0,1}.{conv1,bn1,conv2,bn2,downsample.{0,1}},
              fc1 (the image head, 768 -> 4)
  text_model: TextBertForSequenceClassification: bert (transformers' BertModel: embeddings,
              encoder.layer.N, pooler.dense) and classifier (the text head)
  classifier: a Linear(hidden, 4) that its forward never calls
Every key is prefixed by its module path (`img_model.layer3.1.bn2.running_var`, ...). Its
ResNet is hard-coded (7 stages, fc1 on 768 inputs), so a real public checkpoint maps onto our
image preset 'paper' at 2048x2048 with a BERT of the checkpoint's size; other sizes work for
models built with the same names (as the tests do).

Mapping onto our variables: conv weights OIHW -> HWIO, Linear weights [out, in] -> [in, out],
BatchNorm weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var, BERT
names as in `bert.convert_hf_state_dict`. Ignored on import: `*.num_batches_tracked` (torch
only reads it when momentum is None), the `position_ids` / `token_type_ids` buffers older
transformers saved, and the unused top-level `classifier.*`.

Not in the public model: our `fusion` (MAG) and `joint_head`. The public code draws its fusion
gates afresh, untrained, at every step (REFERENCE 8.1) and has no joint head, so on import
both stay exactly as initialised in the given variables (a warning says so) and on export they
are omitted. An image `projection` (embed_dim != the flattened map) has no public equivalent
and is an error: configure the image encoder so its map flattens to embed_dim (the 'paper'
preset at 2048x2048 does: 192x2x2 = 768).
"""
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.models.bert import _flatten, _hf_name
from forgetmi_jax.models.multimodal import build_model, init_variables

log = logging.getLogger(__name__)

# Our top-level submodules with no counterpart in the public checkpoint.
NOT_IN_REFERENCE = ('fusion', 'joint_head')
NOTE = ('the public-code checkpoint has no joint head and no trained fusion gates (they are '
        'drawn afresh each step, REFERENCE 8.1): fusion and joint_head are kept as freshly '
        'initialised')

_IMG, _TXT = 'img_model', 'text_model'
_BN = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
       ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_IGNORED_NAMES = ('classifier.weight', 'classifier.bias',
                  f'{_TXT}.bert.embeddings.position_ids', f'{_TXT}.bert.embeddings.token_type_ids')


def _image_name(collection: str, path: Tuple[str, ...]) -> Tuple[str, str]:
  """Our image_encoder leaf -> (public key, layout) with layout 'conv' or 'copy'."""
  *mods, leaf = path
  if mods[0] == 'stem_conv':
    module = f'{_IMG}.conv1'
  elif mods[0] == 'stem_bn':
    module = f'{_IMG}.bn1'
  elif mods[0].startswith('stage') and len(mods) == 2:
    stage, block = mods[0][len('stage'):].split('_block')
    sub = {'conv1': 'conv1', 'bn1': 'bn1', 'conv2': 'conv2', 'bn2': 'bn2',
           'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(mods[1])
    if sub is None:
      raise KeyError(path)
    module = f'{_IMG}.layer{int(stage) + 1}.{block}.{sub}'
  else:
    raise KeyError(path)
  if mods[-1] in ('stem_conv', 'conv1', 'conv2', 'downsample_conv'):
    if (collection, leaf) != ('params', 'kernel'):
      raise KeyError(path)
    return f'{module}.weight', 'conv'
  if (collection, leaf) not in _BN:
    raise KeyError(path)
  return f'{module}.{_BN[(collection, leaf)]}', 'copy'


def _public_name(collection: str, path: Tuple[str, ...]) -> Optional[Tuple[str, str]]:
  """Our leaf (collection, path) -> (public key, layout 'conv'|'linear'|'copy'), or None for
  NOT_IN_REFERENCE. A KeyError means our model has a leaf the public model lacks."""
  top, rest = path[0], path[1:]
  if top in NOT_IN_REFERENCE:
    return None
  if top == 'image_encoder':
    return _image_name(collection, rest)
  if collection == 'params' and top in ('image_head', 'text_head') and len(rest) == 1:
    module = f'{_IMG}.fc1' if top == 'image_head' else f'{_TXT}.classifier'
    leaf = rest[0]
    if leaf not in ('kernel', 'bias'):
      raise KeyError(path)
    return f'{module}.{"weight" if leaf == "kernel" else "bias"}', (
        'linear' if leaf == 'kernel' else 'copy')
  if collection == 'params' and top == 'text_encoder':
    name, transpose = _hf_name(rest)
    return f'{_TXT}.bert.{name}', 'linear' if transpose else 'copy'
  raise KeyError(path)


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv':
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  if layout == 'linear':
    return value.T
  return value


def _to_public(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv':
    return value.transpose(3, 2, 0, 1)
  if layout == 'linear':
    return value.T
  return value


def _public_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
  return tuple(_to_public(np.empty(shape, np.bool_), layout).shape)


def _torch_to_numpy(value):
  """A torch tensor (any float dtype, e.g. bfloat16 -> float32) or array -> numpy."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    return value.float().numpy() if value.is_floating_point() else value.numpy()
  return np.asarray(value)


def _unflatten(items) -> dict:
  tree: dict = {}
  for path, value in items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _targets(variables) -> Dict[str, Tuple[Tuple[str, ...], str, Any]]:
  """public key -> ((collection, *path), layout, our leaf), for every mapped leaf."""
  for collection in ('params', 'batch_stats'):
    if collection not in variables:
      raise ValueError(f"variables need 'params' and 'batch_stats', got {sorted(variables)}")
  out, unmapped = {}, []
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables[collection]):
      try:
        target = _public_name(collection, path)
      except (KeyError, IndexError, ValueError):
        unmapped.append(f'{collection}/{"/".join(path)} {tuple(np.shape(leaf))}')
        continue
      if target is not None:
        out[target[0]] = ((collection,) + path, target[1], leaf)
  if unmapped:
    raise ValueError('our model has parameters with no public-code ImageTextModel equivalent: '
                     f'{unmapped} (an image projection appears when embed_dim differs from the '
                     'flattened map; set image.embed_dim to it)')
  return out


def _normalise(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Strip a DataParallel `module.` prefix (when every key has it) and rename legacy
  LayerNorm gamma/beta to weight/bias, as the public code's from_pretrained does."""
  keys = list(state_dict)
  strip = bool(keys) and all(k.startswith('module.') for k in keys)
  out: Dict[str, np.ndarray] = {}
  for key in keys:
    name = key[len('module.'):] if strip else key
    if name.endswith('LayerNorm.gamma'):
      name = name[:-len('gamma')] + 'weight'
    elif name.endswith('LayerNorm.beta'):
      name = name[:-len('beta')] + 'bias'
    if name in out:
      raise ValueError(f'state dict has key {name!r} twice (legacy and current names?)')
    out[name] = state_dict[key]
  return out


def _is_ignored(name: str) -> bool:
  return name.endswith(_IGNORED_SUFFIXES) or name in _IGNORED_NAMES


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], variables) -> dict:
  """A copy of `variables` ({'params', 'batch_stats'}) holding the public model's tensors.

  Every public key must map to one of our leaves with the right shape: missing, unexpected
  and mis-shaped keys are reported together in one ValueError (names and torch-layout
  shapes). Values are cast to the dtype of the leaf they replace. `fusion` and `joint_head`
  stay as they are in `variables` (see NOTE, logged as a warning).
  """
  state = _normalise(state_dict)
  targets = _targets(variables)
  missing = [f'{k} {_public_shape(np.shape(leaf), layout)}'
             for k, (_, layout, leaf) in targets.items() if k not in state]
  unexpected = [f'{k} {tuple(np.shape(v))}' for k, v in state.items()
                if k not in targets and not _is_ignored(k)]
  misshaped, new = [], {}
  for key, (path, layout, leaf) in targets.items():
    if key not in state:
      continue
    raw = _torch_to_numpy(state[key])
    value = _to_ours(raw, layout)
    if tuple(value.shape) != tuple(np.shape(leaf)):
      misshaped.append(f'{key}: got {tuple(raw.shape)}, expected '
                       f'{_public_shape(np.shape(leaf), layout)}')
      continue
    new[path] = jnp.asarray(value, dtype=jnp.asarray(leaf).dtype)
  if missing or unexpected or misshaped:
    raise ValueError(f'state dict does not match the model: missing keys {missing}; '
                     f'unexpected keys {unexpected}; mis-shaped keys {misshaped}')
  ignored = sorted(k for k in state if _is_ignored(k))
  log.warning('%s; ignored %d checkpoint keys (num_batches_tracked, buffers, the unused '
              'top-level classifier)', NOTE, len(ignored))
  items = []
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables[collection]):
      items.append(((collection,) + path, new.get((collection,) + path, leaf)))
  out = _unflatten(items)
  return {**{k: v for k, v in variables.items() if k not in out}, **out}


def variables_to_state_dict(variables) -> Dict[str, np.ndarray]:
  """Our variables -> the public model's state dict (numpy, torch layouts and key names).

  Exact inverse of `state_dict_to_variables` on every mapped leaf. Omitted: fusion and
  joint_head (no public counterpart), `num_batches_tracked` (torch's BatchNorm fills it in
  when absent) and the unused top-level `classifier`, so the public code's non-strict
  `ImageTextModel.from_pretrained` and torch's `load_state_dict(strict=False)` load it with
  only `classifier.{weight,bias}` reported missing.
  """
  return {k: np.array(_to_public(np.asarray(leaf), layout), order='C', copy=True)
          for k, (_, layout, leaf) in _targets(variables).items()}


# --------------------------------------------------------------------------- files

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_WRAPPERS = ('state_dict', 'model', 'model_state_dict')


def read_reference_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Tensors of a public-code checkpoint file (.pth/.pt/.bin via torch with weights_only, or
  .safetensors), unwrapped from a {'state_dict'|'model'|'model_state_dict': ...} dict."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    with open(path, 'rb') as f:
      raw = f.read()
    try:
      return dict(safetensors_load(raw))
    except (TypeError, KeyError):  # bfloat16: numpy lacks it; read through torch, upcast
      from safetensors.torch import load as torch_load
      return {k: _torch_to_numpy(v) for k, v in torch_load(raw).items()}
  if suffix not in _TORCH_SUFFIXES:
    raise ValueError(f'{path}: unknown checkpoint suffix {suffix!r} (expected .safetensors, '
                     f'{", ".join(_TORCH_SUFFIXES)})')
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path}: reading a torch checkpoint needs torch; convert it to '
                      '.safetensors or install torch') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  while isinstance(obj, Mapping):
    inner = [w for w in _WRAPPERS if isinstance(obj.get(w), Mapping)]
    if not inner:
      break
    obj = obj[inner[0]]
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: expected a state dict, got {type(obj).__name__}')
  bad = sorted(str(k) for k, v in obj.items() if not hasattr(v, 'detach'))
  if bad:
    raise ValueError(f'{path}: entries that are not tensors: {bad}')
  return {str(k): _torch_to_numpy(v) for k, v in obj.items()}


def load_reference_checkpoint(path: str, config_or_model_cfg, *,
                              image_size: Optional[int] = None,
                              rng: Optional[jax.Array] = None) -> dict:
  """A public-code checkpoint file -> our {'params', 'batch_stats'} variables.

  `config_or_model_cfg` is a run config (its `model` and `data.image_size` are used) or a
  model config (then pass `image_size`); the model must match the checkpoint's architecture
  (e.g. image preset 'paper' at 2048, text = the BERT it was trained from). The target tree
  comes from `build_model` + `init_variables(rng)`; fusion and joint_head keep those fresh
  values (rng defaults to PRNGKey(0)): the checkpoint has neither (see NOTE).
  """
  cfg = config_or_model_cfg
  cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  if 'model' in cfg:
    model_cfg = cfg['model']
    if image_size is None:
      image_size = (cfg.get('data') or {}).get('image_size')
  else:
    model_cfg = cfg
  if image_size is None:
    raise ValueError('load_reference_checkpoint needs image_size (or a run config with '
                     'data.image_size) to build the model')
  state = read_reference_state_dict(path)
  model, _, _ = build_model(model_cfg)
  text_len = min(8, int(model.text.max_position_embeddings))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  variables = init_variables(model, rng, int(image_size), text_len, batch=1)
  try:
    return state_dict_to_variables(state, variables)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def save_reference_checkpoint(variables, path: str) -> str:
  """Write our variables as a public-code state dict (see variables_to_state_dict).

  .safetensors unless the suffix is .pth/.pt/.bin (then torch.save of CPU tensors, readable
  with weights_only=True); no suffix means .safetensors is appended. Written atomically.
  Returns the path written.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if not suffix:
    path, suffix = path + '.safetensors', '.safetensors'
  state = variables_to_state_dict(variables)
  if suffix == '.safetensors':
    data = safetensors_save(state)
    atomic_write(path, lambda f: f.write(data))
  elif suffix in _TORCH_SUFFIXES:
    import torch
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    atomic_write(path, lambda f: torch.save(tensors, f))
  else:
    raise ValueError(f'{path}: unknown checkpoint suffix {suffix!r} (expected .safetensors, '
                     f'{", ".join(_TORCH_SUFFIXES)})')
  return path
