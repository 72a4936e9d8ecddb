"""Cache of trained models keyed by a hash of everything that determines them.

The original and retrained models are expensive and shared by every unlearning run, grid
setting and baseline on the same data; a run looks them up here before training.
"""
import hashlib
import json
import os


def fingerprint(*parts) -> str:
  """Stable short hash of JSON-serialisable parts (configs as dicts, id lists as lists)."""
  blob = json.dumps(parts, sort_keys=True, default=_default).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _default(x):
  if hasattr(x, 'tolist'):
    return x.tolist()
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  raise TypeError(f'cannot fingerprint {type(x).__name__}')


def entry_dir(cache_dir: str, kind: str, key: str) -> str:
  return os.path.join(cache_dir, f'{kind}-{key}')


def is_complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, 'COMPLETE'))


def mark_complete(path: str, meta: dict):
  tmp = os.path.join(path, '.COMPLETE.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True, default=_default)
  os.replace(tmp, os.path.join(path, 'COMPLETE'))


def read_meta(path: str) -> dict:
  with open(os.path.join(path, 'COMPLETE')) as f:
    return json.load(f)
