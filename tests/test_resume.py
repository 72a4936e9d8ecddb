"""kill -9 during original training and again during unlearning; the resumed run ends with
the same final params as an uninterrupted one."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

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
  _run_until(resumed, out, 'cache/original-*/ckpt/0')  # killed mid original training
  assert not glob.glob(str(resumed / 'cache' / 'original-*' / 'COMPLETE'))
  _run_until(resumed, out, 'checkpoints/forgetmi/0')  # killed mid unlearning
  assert not out.exists()
  done = subprocess.run(_cmd(resumed, out), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = np.load(tmp_path / 'full.npz'), np.load(out)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)
