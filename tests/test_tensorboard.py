"""EventWriter writes TensorBoard event files that the tensorboard package reads back (no TF)."""
import glob
import os
import struct
import sys

import numpy as np
import pytest

from forgetmi_jax.train.tensorboard import EventWriter, flatten_scalars, read_scalars


def f32(x):
  return float(np.float32(x))


def test_write_and_read_back(tmp_path):
  logdir = tmp_path / 'tb'
  with EventWriter(logdir) as w:
    assert w.enabled
    for step in range(3):
      n = w.scalars(step, {'unlearn': {'loss': 1.0 / (step + 1), 'ur': np.float32(0.1 * step)},
                           'train/lr': 1e-4, 'train/examples_per_s': np.asarray(123.4 + step),
                           'eval/original/auc': None})
      assert n == 4  # the None metric is skipped
    w.flush()
  got = read_scalars(logdir)
  assert sorted(got) == ['train/examples_per_s', 'train/lr', 'unlearn/loss', 'unlearn/ur']
  assert got['unlearn/loss'] == [(s, f32(1.0 / (s + 1))) for s in range(3)]
  assert got['unlearn/ur'] == [(s, f32(0.1 * s)) for s in range(3)]
  assert got['train/lr'] == [(s, f32(1e-4)) for s in range(3)]
  assert got['train/examples_per_s'] == [(s, f32(123.4 + s)) for s in range(3)]
  assert 'tensorflow' not in sys.modules


def test_event_file_is_tfrecord(tmp_path):
  """Independent of both packages: the file is TFRecord framing whose first record is the
  'brain.Event:2' version event, and the scalar tag appears in a later record."""
  with EventWriter(tmp_path) as w:
    w.scalars(7, {'eval/unlearned/forget_auc': 0.25})
  (path,) = glob.glob(os.path.join(tmp_path, 'events.out.tfevents.*'))
  data = open(path, 'rb').read()
  records, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    records.append(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
  assert pos == len(data)
  assert b'brain.Event:2' in records[0]
  assert any(b'eval/unlearned/forget_auc' in r and struct.pack('<f', 0.25) in r
             for r in records[1:])


def test_disabled_writer_is_noop(tmp_path):
  with EventWriter(None) as w:
    assert not w.enabled
    assert w.scalars(0, {'train/lr': 1.0}) == 0
    with pytest.raises(TypeError, match='train/name'):
      w.scalars(0, {'train/name': 'text'})  # validated even when disabled
    w.flush()
  assert os.listdir(tmp_path) == []
  with pytest.raises(RuntimeError, match='closed'):
    w.scalars(1, {'a': 1.0})


def test_flatten_rules():
  assert flatten_scalars({'b': 1, 'a': {'x': True, 'y': np.int32(3)}}) == {
      'a/x': 1.0, 'a/y': 3.0, 'b': 1.0}
  assert flatten_scalars({'a': 'secret words', 'b': [1, 2], 'c': 2.0}, strict=False) == {
      'c': 2.0}
  with pytest.raises(TypeError) as e:
    flatten_scalars({'eval': {'note': 'secret words'}})
  assert 'eval/note' in str(e.value) and 'secret' not in str(e.value)
  with pytest.raises(ValueError, match='invalid scalar tag'):
    flatten_scalars({'a/': 1.0})
  with pytest.raises(ValueError, match='step'):
    EventWriter(None).scalars(-1, {'a': 1.0})


def test_nonfinite_values_kept(tmp_path):
  with EventWriter(tmp_path) as w:
    w.scalars(0, {'unlearn/loss': float('nan')})
    w.scalars(1, {'unlearn/loss': float('inf')})
  ((s0, v0), (s1, v1)) = read_scalars(tmp_path)['unlearn/loss']
  assert (s0, s1) == (0, 1) and np.isnan(v0) and v1 == float('inf')


def _crash_and_resume(logdir, purge_step):
  """Steps 0..5 logged, then a crash; the resumed run restarts from the step-3 checkpoint and
  logs steps 4 and 5 again (step 3 is not re-logged, e.g. log_every)."""
  with EventWriter(logdir) as w:
    for s in range(6):
      w.scalars(s, {'unlearn/loss': float(s)})
  with EventWriter(logdir, purge_step=purge_step) as w:
    for s in (4, 5):
      w.scalars(s, {'unlearn/loss': 10.0 + s})
  assert len(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))) == 2  # no overwrite
  return read_scalars(logdir)['unlearn/loss']


def test_resume_with_purge_step_drops_stale_points(tmp_path):
  assert _crash_and_resume(tmp_path / 'a', purge_step=3) == [
      (0, 0.0), (1, 1.0), (2, 2.0), (4, 14.0), (5, 15.0)]
  # Without purge_step the crashed run's points 3..5 stay and steps 4, 5 appear twice.
  assert _crash_and_resume(tmp_path / 'b', purge_step=None) == [
      (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (4, 14.0), (5, 15.0)]


def test_read_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    read_scalars(tmp_path / 'nope')
  assert read_scalars(tmp_path) == {}
