"""Data parallelism: jit over a 1-D device mesh.

Batches are sharded along their leading axis over the 'data' mesh axis and the state is
replicated. Because the loss is a mean over the *global* batch, XLA inserts the all-reduce of
the gradients (the pmap `lax.pmean` over `axis_name`) itself, and BatchNorm statistics are
computed over the global batch (a synchronised BN), so N devices give the 1-device result for
the same global batch. tests/test_parallel.py checks this with 2 host devices.

Multi-host: call `jax.distributed.initialize()` before anything else on every host (see
README); `jax.devices()` then lists every host's devices, each host feeds its own slice.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices, only {len(devices)} available')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch, mesh: Mesh):
  """Put a host batch on the mesh, split along the example axis.

  The example axis is the leading one, except under 'forget_noisy' ([K, B, L]: noise draws
  first), where it is the second.
  """
  n = mesh.devices.size

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, P()))
    draw_first = any(getattr(k, 'key', None) == 'forget_noisy' for k in path)
    axis = 1 if draw_first else 0
    if x.shape[axis] % n:
      raise ValueError(f'batch axis {x.shape[axis]} is not divisible by {n} devices; '
                       f'use a batch size that is a multiple of the device count')
    spec = P(None, 'data') if draw_first else P('data')
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(put, batch)
