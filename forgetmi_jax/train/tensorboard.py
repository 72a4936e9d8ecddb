"""TensorBoard scalars without TensorFlow: a small writer and a reader for tests and notebooks.

Why: training and unlearning curves (loss terms, learning rate, throughput, evaluation metrics)
should be watchable live with `tensorboard --logdir WORKDIR/tb` and readable back in Python,
without installing TensorFlow. Writing uses tensorboardX (pure Python protobuf writer);
reading uses the `tensorboard` package's EventAccumulator, the same code the TensorBoard UI
runs, so what `read_scalars` returns is what the UI shows (including its handling of a resumed
run's stale points, see `purge_step`).

Tags are '/'-joined names, e.g. 'unlearn/loss', 'unlearn/ur', 'train/lr',
'train/examples_per_s', 'eval/<model>/<metric>'. `EventWriter(None)` is a no-op writer, so
callers never branch on "is logging on" (pass None on every process but process 0).
"""
from __future__ import annotations

import numbers
import os
import time
from typing import Mapping

import numpy as np


def flatten_scalars(values: Mapping, prefix: str = '', strict: bool = True) -> dict:
  """{'eval': {'original': {'auc': x}}} -> {'eval/original/auc': x} (floats, sorted tags).

  None values are skipped (a metric that could not be computed). With `strict`, any other
  non-numeric value raises TypeError naming its tag (never the value: it could be text);
  without, it is skipped.
  """
  out = {}
  for key, value in values.items():
    tag = f'{prefix}/{key}' if prefix else str(key)
    if not tag or tag.startswith('/') or tag.endswith('/') or '//' in tag:
      raise ValueError(f'invalid scalar tag {tag!r}')
    if isinstance(value, Mapping):
      out.update(flatten_scalars(value, tag, strict))
      continue
    if value is None:
      continue
    if hasattr(value, '__array__') and not isinstance(value, numbers.Number):
      arr = np.asarray(value)
      if arr.ndim == 0 and (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        value = arr.item()
    if isinstance(value, (numbers.Real, np.bool_)):
      out[tag] = float(value)
    elif strict:
      raise TypeError(f'scalar {tag!r} is a {type(value).__name__}, not a real number')
  return dict(sorted(out.items()))


class EventWriter:
  """A minimal SummaryWriter: `scalars(step, dict)`, `flush()`, `close()`, a context manager.

  logdir: folder of the event files (created); None disables the writer (every call is a
    no-op), e.g. on processes other than 0.
  purge_step: when resuming from a checkpoint at step k, pass k: TensorBoard (and
    `read_scalars`) then drop the earlier run's points at steps >= k, so a crash-and-resume
    leaves one clean curve.
  flush_secs / max_queue: tensorboardX's buffering (events reach disk at least this often).
  """

  def __init__(self, logdir, purge_step: int | None = None, flush_secs: int = 30,
               max_queue: int = 100):
    self.logdir = None if logdir is None else os.fspath(logdir)
    self._writer = None
    self._closed = False
    if self.logdir is not None:
      # Lazy: tensorboardX imports torch when it is installed (seconds), and a disabled
      # writer must cost nothing.
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      os.makedirs(self.logdir, exist_ok=True)
      # tensorboardX names files by the second and host only: a second writer in the same
      # second (a quick resume) would truncate the first file. Nanoseconds keep names unique
      # and in creation order, which is the order TensorBoard reads them in.
      suffix = f'.{time.time_ns()}.{os.getpid()}'
      self._writer = SummaryWriter(logdir=self.logdir, purge_step=purge_step,
                                   flush_secs=int(flush_secs), max_queue=int(max_queue),
                                   filename_suffix=suffix)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def scalars(self, step: int, values: Mapping, strict: bool = True,
              walltime: float | None = None) -> int:
    """Write every real number of (nested) `values` at `step`; returns how many were written.

    Nested mappings become '/'-joined tags (see `flatten_scalars`). Non-finite values are
    written as they are (TensorBoard shows nan/inf). A disabled writer writes nothing and
    returns 0, after checking the values all the same, so a bad tag fails in every process.
    """
    if self._closed:
      raise RuntimeError(f'EventWriter({self.logdir!r}) is closed')
    step = int(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    flat = flatten_scalars(values, strict=strict)
    if self._writer is None:
      return 0
    for tag, value in flat.items():
      self._writer.add_scalar(tag, value, global_step=step, walltime=walltime)
    return len(flat)

  def flush(self) -> None:
    if self._writer is not None and not self._closed:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None and not self._closed:
      self._writer.close()
    self._closed = True

  def __enter__(self) -> 'EventWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f'EventWriter({self.logdir!r}{", closed" if self._closed else ""})'


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every event file directly in `logdir`, as TensorBoard sees it.

  Files are read in name (= creation time) order; points of a resumed run that a later
  writer's `purge_step` discards are dropped, as in the UI. Values are the stored float32
  numbers as Python floats. Sub-folders (other runs) are not read.
  """
  # Lazy: the tensorboard package is only needed by those who read event files back.
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import event_accumulator
  logdir = os.fspath(logdir)
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f'TensorBoard log folder not found: {logdir}')
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in sorted(acc.Tags().get(event_accumulator.SCALARS, [])):
    out[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
  return out

