"""kill -9 during original training and again during (stacked, 2-copy) unlearning; the resumed
run really resumes (it starts after the saved epoch, not from scratch) and ends with the same
final params as an uninterrupted one."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

from forgetmi_jax.train.checkpoints import Checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, out):
  return [sys.executable, '-m', 'tests.resume_worker', str(workdir), str(out)]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')


def _run_until(workdir, out, pattern, timeout=600):
  """Start the worker, SIGKILL it as soon as a checkpoint matching `pattern` exists."""
  proc = subprocess.Popen(_cmd(workdir, out), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  t0 = time.time()
  while time.time() - t0 < timeout:
    if glob.glob(os.path.join(str(workdir), pattern)):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    if proc.poll() is not None:
      raise AssertionError(f'worker ended before {pattern}: {proc.stderr.read()[-2000:]}')
    time.sleep(0.2)
  proc.kill()
  raise AssertionError('timed out')


def test_kill_and_resume_gives_same_params(tmp_path):
  full, resumed = tmp_path / 'full', tmp_path / 'resumed'
  done = subprocess.run(_cmd(full, tmp_path / 'full.npz'), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / 'resumed.npz'
  _run_until(resumed, out, 'cache/original-train-*/ckpt/0')  # killed mid original training
  assert not glob.glob(str(resumed / 'cache' / 'original-*' / 'COMPLETE'))
  _run_until(resumed, out, 'checkpoints/forgetmi/*/0')  # killed mid unlearning
  assert not out.exists()
  done = subprocess.run(_cmd(resumed, out), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'unlearn forgetmi: resuming after epoch' in done.stderr  # a resume, not a restart
  a, b = np.load(tmp_path / 'full.npz'), np.load(out)
  assert a['resumed_from'].tolist() == [0] and b['resumed_from'][0] >= 1
  assert sorted(a.files) == sorted(b.files)
  moved = max(np.max(np.abs(a[k] - a[k.replace('unlearned0', 'original')])) for k in a.files
              if k.startswith('unlearned0[') and k.replace('unlearned0', 'original') in a.files)
  assert moved > 1e-4  # unlearning moved the params far more than the tolerance below
  for k in a.files:
    if k == 'resumed_from':  # differs by design (checked above)
      continue
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


class _Items:
  """The one thing `Checkpoints.save` asks of a state."""

  def checkpoint_items(self):
    return {'w': np.arange(3.0, dtype=np.float32)}


def test_reopening_removes_only_unfinished_writes(tmp_path):
  """A killed run's half-written folders go when its folder is opened again, finished ones
  stay, and a folder being written beside the epochs afterwards (a best model) survives the
  next save (orbax's own background clean-up once deleted one mid-write)."""
  run = tmp_path / 'run'
  for name in ('3.orbax-checkpoint-tmp', 'best-after-2.orbax-checkpoint-tmp'):
    (run / name).mkdir(parents=True)
    (run / name / 'part').write_bytes(b'x')
  (run / 'best-after-1').mkdir()
  (run / 'best-after-1' / 'whole').write_bytes(b'x')
  ckpt = Checkpoints(str(run))
  try:
    assert sorted(os.listdir(run)) == ['best-after-1']
    (run / 'best-after-4.orbax-checkpoint-tmp').mkdir()  # as loop's save_best writes it
    ckpt.save(0, _Items())
    assert (run / 'best-after-4.orbax-checkpoint-tmp').is_dir()
    assert ckpt.latest_epoch() == 0 and (run / 'best-after-1' / 'whole').exists()
  finally:
    ckpt.close()
