"""Data parallelism: jit over a 1-D device mesh, fed by every process.

Batches are sharded along their example axis over the 'data' mesh axis and the state is
replicated. Because the loss is a mean over the *global* batch, XLA inserts the all-reduce of
the gradients (the pmap `lax.pmean` over `axis_name`) itself, and BatchNorm statistics are
computed over the global batch (a synchronised BN), so N devices give the 1-device result for
the same global batch. tests/test_parallel.py checks this with 2 host devices.

Example axis: the leading one, after `leading_axes` stacked axes (model copies: [N, B, ...]
with leading_axes=1); one further to the right under a 'forget_noisy' key ([K, B, L]: noise
draws first). A leaf with no such axis (a scalar, a per-copy value) is replicated.

Multi-host: call `jax.distributed.initialize()` before anything else on every process; the
mesh then spans every process's devices. The i-th device of the mesh holds the i-th block of
rows of the global batch, so process p owns the blocks of its own devices (`process_rows`).
`shard_local_batch` builds the global arrays from each process's own rows
(`jax.make_array_from_process_local_data`); `shard_batch` takes the global batch, the same on
every process, and feeds only this process's rows. With one process both are `device_put`.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

NOISE_DRAW_KEY = 'forget_noisy'


def make_mesh(num_devices: int | None = None) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices, only {len(devices)} available')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def _path_name(path):
  """'forget/image' for an error message (the key path, never the data)."""
  return jax.tree_util.keystr(path, simple=True, separator='/') or '<batch>'


def example_axis(path, ndim: int, leading_axes: int = 0):
  """The axis of a batch leaf that indexes examples, or None (replicate the leaf).

  `leading_axes` stacked axes come first; under 'forget_noisy' the noise-draw axis comes next.
  """
  axis = int(leading_axes) + (1 if any(getattr(k, 'key', None) == NOISE_DRAW_KEY
                                       for k in path) else 0)
  return axis if ndim > axis else None


def _spec(axis):
  return P() if axis is None else P(*([None] * axis), 'data')


def _device_processes(mesh: Mesh):
  if mesh.devices.ndim != 1:
    raise ValueError(f'expected a 1-D data mesh, got devices of shape {mesh.devices.shape}')
  return [d.process_index for d in mesh.devices]


def process_rows(global_size: int, device_processes, process_index: int) -> np.ndarray:
  """Rows of a global batch of `global_size` examples that process `process_index` feeds.

  `device_processes[i]` is the process of the mesh's i-th device, which holds rows
  [i * b, (i + 1) * b) with b = global_size / num_devices. The rows come in increasing order,
  the order `jax.make_array_from_process_local_data` expects the local data in. For the usual
  process-major mesh (each process's devices contiguous) they are the contiguous slice
  [p * global_size / P, (p + 1) * global_size / P).
  """
  device_processes = list(device_processes)
  n = len(device_processes)
  if global_size % n:
    raise ValueError(f'batch axis {global_size} is not divisible by {n} devices; '
                     f'use a batch size that is a multiple of the device count')
  block = global_size // n
  mine = [i for i, p in enumerate(device_processes) if p == process_index]
  if not mine:
    raise ValueError(f'process {process_index} has no device in the mesh')
  return np.concatenate([np.arange(i * block, (i + 1) * block) for i in mine])


def local_rows(global_size: int, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global batch on `mesh` (all rows with one process)."""
  return process_rows(global_size, _device_processes(mesh), jax.process_index())


def shard_local_batch(local_batch, mesh: Mesh, leading_axes: int = 0):
  """Global arrays from this process's own rows of the batch (each process passes its own).

  Every leaf's example axis (see `example_axis`) holds this process's rows, in the order of
  `local_rows`; the global array has (mesh devices / this process's mesh devices) times as
  many. Replicated leaves must be equal on every process.
  """
  local = sum(p == jax.process_index() for p in _device_processes(mesh))
  if not local:
    raise ValueError(f'process {jax.process_index()} has no device in the mesh')

  def put(path, x):
    x = np.asarray(x)
    axis = example_axis(path, x.ndim, leading_axes)
    if axis is not None and x.shape[axis] % local:
      raise ValueError(f'{_path_name(path)}: {x.shape[axis]} local rows on axis {axis} are not '
                       f'divisible by this process\'s {local} devices')
    return jax.make_array_from_process_local_data(NamedSharding(mesh, _spec(axis)), x)
  return jax.tree_util.tree_map_with_path(put, local_batch)


def shard_batch(batch, mesh: Mesh, leading_axes: int = 0):
  """Put a global host batch (the same on every process) on the mesh, split along the example
  axis (see `example_axis`); each process transfers only its own rows (`local_rows`).

  With one process this is `jax.device_put` of the whole batch with the same sharding.
  """
  n = mesh.devices.size
  single = jax.process_count() == 1

  def local(path, x):
    x = x if single and isinstance(x, jax.Array) else np.asarray(x)
    axis = example_axis(path, x.ndim, leading_axes)
    if axis is not None and x.shape[axis] % n:
      raise ValueError(f'{_path_name(path)}: batch axis {axis} has {x.shape[axis]} rows, not '
                       f'divisible by {n} devices; use a batch size that is a multiple of the '
                       f'device count')
    if single:  # device arrays (a device-resident source) are resharded where they are
      return jax.device_put(x, NamedSharding(mesh, _spec(axis)))
    return x if axis is None else np.take(x, local_rows(x.shape[axis], mesh), axis=axis)
  placed = jax.tree_util.tree_map_with_path(local, batch)
  return placed if single else shard_local_batch(placed, mesh, leading_axes)
