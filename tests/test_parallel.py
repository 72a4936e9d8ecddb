"""Data parallelism: how a batch is split over devices and processes, and that 2 devices give
the 1-device result for the same global batch."""
import ipaddress
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from forgetmi_jax.train import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=2):
  # LLVM optimisation level 0 halves XLA:CPU compile time (most of these tests' time); both
  # sides of every comparison are compiled the same way.
  flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def _worker(*args, timeout=600):
  out = subprocess.run([sys.executable, '-m', 'tests.parallel_worker', *args], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_process_rows_for_fake_processes():
  # 4 devices, process-major (2 processes x 2 devices): contiguous halves.
  np.testing.assert_array_equal(parallel.process_rows(8, [0, 0, 1, 1], 0), [0, 1, 2, 3])
  np.testing.assert_array_equal(parallel.process_rows(8, [0, 0, 1, 1], 1), [4, 5, 6, 7])
  # P = 4 processes of 2 devices, 16 rows: process p owns rows 4p .. 4p+3.
  owners = np.repeat(np.arange(4), 2)
  for p in range(4):
    np.testing.assert_array_equal(parallel.process_rows(16, owners, p), np.arange(4 * p, 4 * p + 4))
  # Devices interleaved by process: each process owns every other block, in increasing order.
  np.testing.assert_array_equal(parallel.process_rows(12, [0, 1, 0, 1], 0), [0, 1, 2, 6, 7, 8])
  np.testing.assert_array_equal(parallel.process_rows(12, [0, 1, 0, 1], 1), [3, 4, 5, 9, 10, 11])
  # Every row is fed by exactly one process.
  rows = np.concatenate([parallel.process_rows(12, [1, 0, 2, 2, 0, 1], p) for p in range(3)])
  np.testing.assert_array_equal(np.sort(rows), np.arange(12))
  # One process: everything.
  np.testing.assert_array_equal(parallel.process_rows(6, [0, 0], 0), np.arange(6))
  with pytest.raises(ValueError, match='divisible'):
    parallel.process_rows(6, [0, 0, 1, 1], 0)
  with pytest.raises(ValueError, match='no device'):
    parallel.process_rows(8, [0, 0, 1, 1], 2)


def test_example_axis_convention():
  key = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)
  assert parallel.example_axis(key('image'), 4) == 0
  assert parallel.example_axis(key('forget_noisy'), 3) == 1  # [K, B, L]
  assert parallel.example_axis(key('forget_noisy', 'input_ids'), 3) == 1
  assert parallel.example_axis(key('image'), 5, leading_axes=1) == 1  # [N, B, H, W, C]
  assert parallel.example_axis(key('forget_noisy'), 4, leading_axes=1) == 2  # [N, K, B, L]
  assert parallel.example_axis(key('weight'), 0) is None  # scalars are replicated
  assert parallel.example_axis(key('per_copy'), 1, leading_axes=1) is None  # [N]


def test_shard_batch_on_two_local_devices():
  """Global shape, sharding and values (see parallel_worker.sharding for every check)."""
  assert _worker('sharding', timeout=300) == {'ok': True}


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _hostname_is_loopback():
  """jax's CPU collectives (gloo) connect the processes at the address of this host's name."""
  try:
    return ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
  except OSError:
    return False


def test_two_processes_each_feed_their_own_rows():
  """Two jax processes (jax.distributed over 127.0.0.1, 2 CPU devices each) build one global
  batch: each holds its own rows, and a jitted reduction over all 4 devices sees every row."""
  if not _hostname_is_loopback():
    pytest.skip('the host name does not resolve to a loopback address; the processes would '
                'talk over the network')
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, '-m', 'tests.parallel_worker', 'process', str(p),
                             '2', port], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for p in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=240)
      assert p.returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert results[0]['process_major']['rows'] == [0, 1, 2, 3]
  assert results[1]['process_major']['rows'] == [4, 5, 6, 7]
  assert results[0]['interleaved']['rows'] == [0, 1, 4, 5]
  assert results[1]['interleaved']['rows'] == [2, 3, 6, 7]
  for r in results:
    for mesh in ('process_major', 'interleaved'):
      m = r[mesh]
      assert m['sum_global'] == m['sum_local']
      assert m['sum_global'] == pytest.approx(m['expected'], rel=1e-6)


def test_two_devices_match_one():
  r = _worker('steps')
  assert r['train_steps'] == [3, 3] and r['unlearn_steps'] >= 2, r
  # The steps are big enough to matter: params and BatchNorm statistics moved, and the two
  # stacked training copies (seeds 0 and 1, per-copy batches) are different models.
  assert r['train_moved'] > 1e-3 and r['unlearn_moved'] > 1e-3, r
  assert r['train_moved_l2'] > 0.5 and r['unlearn_moved_l2'] > 0.5, r
  assert r['train_stats_moved'] > 1e-2 and r['unlearn_stats_moved'] > 1e-2, r
  assert r['copies_differ'] > 1e-2, r
  # Same global batch: gradients are all-reduced and BatchNorm sees the whole batch, so the
  # 2-device models equal the 1-device ones up to float32 summation order, far below how far
  # the steps moved them (measured: L2 ratio 7e-6 training, 4e-5 unlearning).
  assert r['train_params_l2'] <= 1e-3 * r['train_moved_l2'], r
  assert r['unlearn_params_l2'] <= 1e-3 * r['unlearn_moved_l2'], r
  # No entry-by-entry bound: Adam divides by sqrt(v), which turns the summation-order noise
  # of entries whose gradient is near 0 into lr-sized steps (the worst entry measured 2e-3 to
  # 1.3e-1 of the largest move, depending on how the 1-device program is compiled).
  assert r['train_stats'] <= 1e-3 * r['train_stats_moved'], r
  assert r['unlearn_stats'] <= 1e-3 * r['unlearn_stats_moved'], r
  assert abs(r['loss_1'] - r['loss_2']) < 1e-5 * max(1.0, abs(r['loss_1'])), r
