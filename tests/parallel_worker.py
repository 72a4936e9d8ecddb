"""Subprocess side of tests/test_parallel.py (jax must see the forced devices before it starts).

  python -m tests.parallel_worker steps          # 2 host devices: training and Forget-MI
                                                 # steps on 1 and 2 devices; prints JSON
  python -m tests.parallel_worker sharding       # 2 host devices: shard_batch checks
  python -m tests.parallel_worker process P N PORT   # process P of N (jax.distributed on
                                                     # 127.0.0.1:PORT), 2 devices each

PARALLEL_DIAG=1 prints the leaves with the largest 1-vs-2-device differences to stderr.

The project code the `steps` mode runs (kept to the loop's public surface): runs.setup.prepare /
make_context, trainer.TrainMethod, unlearning.forgetmi.ForgetMIMethod, loop.Copy and loop.run.
"""
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from forgetmi_jax.train import parallel


def _maxdiff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _l2diff(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                           for x, y in zip(jax.tree_util.tree_leaves(a),
                                           jax.tree_util.tree_leaves(b)))))


def _leafdiag(tag, p1, p2, p0):
  if not os.environ.get('PARALLEL_DIAG'):
    return
  rows = []
  for (path, x), y, z in zip(jax.tree_util.tree_leaves_with_path(p1),
                             jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p0)):
    x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
    rows.append((float(np.max(np.abs(x - y))), float(np.max(np.abs(x - z))),
                 jax.tree_util.keystr(path)))
  rows.sort(reverse=True)
  for r in rows[:8]:
    print(tag, 'diff %.3g moved %.3g %s' % r, file=sys.stderr)


# ------------------------------------------------------------------------------ steps
def steps():
  """Train 2 stacked copies (seeds 0, 1: per-copy batches [N, B, ...]) for one epoch of 3
  steps, then Forget-MI (one copy: shared batches with 'forget_noisy' [K, B, L]) for one
  epoch from the same original, on a 1-device and a 2-device mesh."""
  from configs import forgetmi_10pct
  from forgetmi_jax.runs import setup
  from forgetmi_jax.train import loop
  from forgetmi_jax.train.trainer import TrainMethod
  from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
  assert jax.device_count() == 2, jax.devices()
  tmp = tempfile.mkdtemp()
  c = forgetmi_10pct.get_config('smoke')
  c.data.synthetic.num_subjects = 40
  c.workdir, c.cache_dir = os.path.join(tmp, 'work'), os.path.join(tmp, 'cache')
  # Large enough steps that the parameters move far more than float32 reduction-order noise.
  c.train.epochs, c.train.lr, c.train.warmup_steps = 1, 3e-3, 1
  c.forgetmi.epochs, c.forgetmi.lr = 1, 3e-3
  prep = setup.prepare(c)
  seeds = (0, 1)
  train_idx = prep.non_test_idx[:3 * int(c.train.batch_size)]
  init = [prep.init_variables(s) for s in seeds]
  ctx = setup.make_context(prep)
  out = {}
  for n in (1, 2):
    mesh = parallel.make_mesh(n)
    train = TrainMethod([loop.Copy(s, c.train) for s in seeds], apply_fn=prep.model.apply,
                        source=prep.source, indices=train_idx, init_variables=prep.init_variables)
    trained = loop.run(train, None, os.path.join(tmp, f'train{n}'), mesh=mesh)
    if n == 1:
      original = trained.states[0].variables  # both meshes unlearn from the same original
    unlearn = ForgetMIMethod(ctx, [loop.Copy(0, c.forgetmi)])
    unlearned = loop.run(unlearn, original, os.path.join(tmp, f'unlearn{n}'), mesh=mesh)
    out[n] = (trained, unlearned)
  (t1, u1), (t2, u2) = out[1], out[2]
  t1v = [s.variables for s in t1.states]
  t2v = [s.variables for s in t2.states]
  _leafdiag('train', t1v[0]['params'], t2v[0]['params'], init[0]['params'])
  _leafdiag('unlearn', u1.states[0].params, u2.states[0].params, original['params'])
  u1p, u2p = u1.states[0].params, u2.states[0].params
  return {
      'train_steps': [h[-1]['steps'] for h in t1.histories],
      'train_moved': min(_maxdiff(a['params'], b['params']) for a, b in zip(t1v, init)),
      'train_params': max(_maxdiff(a['params'], b['params']) for a, b in zip(t1v, t2v)),
      'train_moved_l2': min(_l2diff(a['params'], b['params']) for a, b in zip(t1v, init)),
      'train_params_l2': max(_l2diff(a['params'], b['params']) for a, b in zip(t1v, t2v)),
      'train_stats_moved': min(_maxdiff(a['batch_stats'], b['batch_stats'])
                               for a, b in zip(t1v, init)),
      'train_stats': max(_maxdiff(a['batch_stats'], b['batch_stats']) for a, b in zip(t1v, t2v)),
      'copies_differ': _maxdiff(t1v[0]['params'], t1v[1]['params']),
      'unlearn_steps': u1.histories[0][-1]['steps'],
      'unlearn_moved': _maxdiff(u1p, original['params']),
      'unlearn_params': _maxdiff(u1p, u2p),
      'unlearn_moved_l2': _l2diff(u1p, original['params']),
      'unlearn_params_l2': _l2diff(u1p, u2p),
      'unlearn_stats_moved': _maxdiff(u1.states[0].batch_stats, original['batch_stats']),
      'unlearn_stats': _maxdiff(u1.states[0].batch_stats, u2.states[0].batch_stats),
      'loss_1': float(u1.histories[0][-1]['loss']), 'loss_2': float(u2.histories[0][-1]['loss']),
  }


# ------------------------------------------------------------------------------ sharding
def _check_global(arr, host, axis):
  """`arr` is `host` on the mesh, split along `axis` (None: replicated) in mesh-device order;
  with several processes only this process's shards are read."""
  assert arr.shape == host.shape and arr.dtype == host.dtype, (arr.shape, host.shape)
  spec = P() if axis is None else P(*([None] * axis), 'data')
  assert arr.sharding.spec == spec, (arr.sharding.spec, spec)
  assert arr.is_fully_addressable == (jax.process_count() == 1)
  if arr.is_fully_addressable:
    np.testing.assert_array_equal(np.asarray(arr), host)
  devices = list(arr.sharding.mesh.devices)
  assert len(arr.addressable_shards) == jax.local_device_count()
  for shard in arr.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    if axis is not None:
      b = host.shape[axis] // len(devices)
      i = devices.index(shard.device)
      assert shard.index[axis] == slice(i * b, (i + 1) * b), (shard.index, i)
      assert shard.data.shape[axis] == b


def sharding():
  assert jax.device_count() == 2 and jax.process_count() == 1, jax.devices()
  mesh = parallel.make_mesh(2)
  r = np.random.default_rng(0)
  batch = {'image': r.normal(size=(4, 3, 3, 1)).astype(np.float32),
           'label': np.arange(4, dtype=np.int32),
           'forget_noisy': r.integers(0, 9, (2, 4, 5)).astype(np.int32),  # [K, B, L]
           'nested': {'forget_noisy': {'input_ids': np.zeros((3, 4, 2), np.int32)}},
           'weight': np.float32(0.5)}
  got = parallel.shard_batch(batch, mesh)
  _check_global(got['image'], batch['image'], 0)
  _check_global(got['label'], batch['label'], 0)
  _check_global(got['forget_noisy'], batch['forget_noisy'], 1)
  _check_global(got['nested']['forget_noisy']['input_ids'],
                batch['nested']['forget_noisy']['input_ids'], 1)
  _check_global(got['weight'], np.asarray(batch['weight']), None)
  # One process: exactly the plain device_put it replaced, and the local-rows builder agrees.
  old = jax.device_put(batch['image'], NamedSharding(mesh, P('data')))
  assert got['image'].sharding == old.sharding
  np.testing.assert_array_equal(np.asarray(old), np.asarray(got['image']))
  local = parallel.shard_local_batch(batch, mesh)
  for a, b in zip(jax.tree_util.tree_leaves(local), jax.tree_util.tree_leaves(got)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(parallel.local_rows(6, mesh), np.arange(6))
  # Stacked model copies [N, B, ...]: the example axis is 1 (2 after a noise-draw axis);
  # a per-copy value [N] has no example axis and is replicated.
  stacked = {'image': r.normal(size=(3, 4, 2)).astype(np.float32),
             'forget_noisy': np.ones((3, 2, 4, 5), np.int32),
             'per_copy': np.arange(3, dtype=np.float32)}
  got = parallel.shard_batch(stacked, mesh, leading_axes=1)
  _check_global(got['image'], stacked['image'], 1)
  _check_global(got['forget_noisy'], stacked['forget_noisy'], 2)
  _check_global(got['per_copy'], stacked['per_copy'], None)
  # A jitted mean over the sharded global batch is the host batch's mean.
  mean = jax.jit(lambda x: jnp.mean(x * jnp.arange(1.0, 5.0)[None, :, None]))(got['image'])
  expected = np.mean(stacked['image'] * np.arange(1, 5)[None, :, None])
  np.testing.assert_allclose(float(mean), expected, rtol=1e-6)
  # An odd example axis fails with the key's name.
  try:
    parallel.shard_batch({'retain': {'image': np.zeros((3, 2))}}, mesh)
  except ValueError as e:
    assert 'retain/image' in str(e) and 'divisible by 2' in str(e), e
  else:
    raise AssertionError('odd batch accepted')
  return {'ok': True}


# ------------------------------------------------------------------------------ processes
def process(index, count, port):
  """One of `count` processes: each feeds its own rows; all see the same global batch."""
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=count,
                             process_id=index, initialization_timeout=60)
  assert jax.process_count() == count and jax.process_index() == index
  assert jax.local_device_count() == 2 and jax.device_count() == 2 * count
  devices = jax.devices()
  meshes = {'process_major': parallel.make_mesh(),
            # Devices interleaved by process: each process owns non-contiguous blocks.
            'interleaved': Mesh(np.asarray(sorted(devices, key=lambda d: (d.id % 2, d.id))),
                                ('data',))}
  r = np.random.default_rng(7)  # the same global batch on every process
  glob = {'image': r.normal(size=(8, 3)).astype(np.float32),
          'forget_noisy': r.integers(0, 9, (2, 8, 3)).astype(np.int32), 'scale': np.float32(2.0)}
  stacked = {'image': r.normal(size=(2, 8, 3)).astype(np.float32)}
  weights = jnp.arange(1.0, 9.0)
  report = {}
  for name, mesh in meshes.items():
    rows = parallel.local_rows(8, mesh)
    owners = [d.process_index for d in mesh.devices]
    np.testing.assert_array_equal(rows, parallel.process_rows(8, owners, index))
    from_global = parallel.shard_batch(glob, mesh)
    own = {'image': glob['image'][rows], 'forget_noisy': glob['forget_noisy'][:, rows],
           'scale': glob['scale']}
    from_local = parallel.shard_local_batch(own, mesh)
    for got in (from_global, from_local):
      _check_global(got['image'], glob['image'], 0)
      _check_global(got['forget_noisy'], glob['forget_noisy'], 1)
      _check_global(got['scale'], np.asarray(glob['scale']), None)
    st = parallel.shard_batch(stacked, mesh, leading_axes=1)
    _check_global(st['image'], stacked['image'], 1)
    # A jitted reduction over the global array (a cross-process all-reduce) sees every row.
    f = jax.jit(lambda b: jnp.sum(b['image'] * weights[:, None]) * b['scale']
                + jnp.sum(b['forget_noisy'] * weights[None, :, None]))
    expected = (np.sum(glob['image'] * np.arange(1, 9)[:, None]) * 2.0
                + np.sum(glob['forget_noisy'] * np.arange(1, 9)[None, :, None]))
    report[name] = {'rows': rows.tolist(), 'sum_global': float(f(from_global)),
                    'sum_local': float(f(from_local)), 'expected': float(expected)}
  return report


def main(argv):
  mode = argv[0] if argv else 'steps'
  if mode == 'steps':
    result = steps()
  elif mode == 'sharding':
    result = sharding()
  elif mode == 'process':
    result = process(int(argv[1]), int(argv[2]), int(argv[3]))
  else:
    raise SystemExit(f'unknown mode {mode!r}')
  print(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv[1:])
