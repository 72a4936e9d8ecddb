"""Atomic file writes: a reader (or a killed run) sees the old file or the new one, never half."""
import os
import tempfile


def atomic_write(path, write, binary=True):
  """Call `write(file)` on a temp file beside `path`, then rename it over `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or '.'
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=os.path.splitext(path)[1], dir=folder)
  try:
    with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'newline': ''})) as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
