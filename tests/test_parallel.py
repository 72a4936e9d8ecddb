"""Data parallelism: 2 devices give the 1-device result for the same global batch."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_devices_match_one():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-m', 'tests.parallel_worker'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  # Same global batch: gradients are all-reduced and BatchNorm sees the whole batch.
  assert r['train_params'] < 1e-4 and r['train_stats'] < 1e-4, r
  assert r['unlearn_params'] < 1e-4 and r['unlearn_stats'] < 1e-4, r
  assert abs(r['loss_1'] - r['loss_2']) < 1e-4 * max(1.0, abs(r['loss_1'])), r
