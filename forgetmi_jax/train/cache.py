"""Cache of trained models keyed by a hash of everything that determines them.

The original and retrained models are expensive and shared by every unlearning run, grid
setting and baseline on the same data; a run looks them up here before training. Each entry is
`<cache>/<kind>-<key>/` with the model's variables and a COMPLETE file written last; an entry
is built under an exclusive lock, so two runs sharing a cache never write one entry together.
"""
import contextlib
import fcntl
import json
import os



def entry_dir(cache_dir: str, kind: str, key: str) -> str:
  return os.path.join(cache_dir, f'{kind}-{key}')


def is_complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, 'COMPLETE'))


def mark_complete(path: str, meta: dict):
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, '.COMPLETE.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(path, 'COMPLETE'))


def read_meta(path: str) -> dict:
  with open(os.path.join(path, 'COMPLETE')) as f:
    return json.load(f)


@contextlib.contextmanager
def lock(path: str):
  """Exclusive lock on `path` (a cache entry) across processes: a second run waits, then
  finds the entry complete instead of writing it again."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
  with open(os.path.abspath(path) + '.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
