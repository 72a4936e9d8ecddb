"""Orbax checkpoints: a run's per-epoch TrainStates (resumable after kill -9) and a finished
model's variables.

Orbax writes each step into a temporary folder and renames it when complete, so a killed run
leaves either a whole checkpoint or none; `remove_unfinished` deletes the debris when the
folder is opened again. A checkpoint that cannot be read raises one error naming its folder
and what to do.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from safetensors.numpy import load_file, save

from forgetmi_jax.io_utils import atomic_write


class CheckpointError(RuntimeError):
  pass


def _unreadable(path, err):
  return CheckpointError(
      f'checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}). It is '
      'truncated or from another version: delete that folder to retrain or rerun from scratch.')


UNFINISHED_MARK = '.orbax-checkpoint-tmp'  # orbax's name for a folder still being written


def remove_unfinished(directory):
  """Delete what a killed run was still writing in `directory` (orbax's temporary folders).

  Done here, at once, rather than by orbax's `cleanup_tmp_directories`: that runs in a
  background thread and deleted a best-model folder (`loop._StopTrack.save_best`, written
  beside the epochs) while it was being written: 'Directory not empty' at the next save
  (seen once in the test suite, tests/test_repair.py)."""
  if jax.process_index() != 0:
    return  # like orbax: the primary process cleans up
  for name in os.listdir(directory):
    if UNFINISHED_MARK in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpoints:
  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    remove_unfinished(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_epoch(self):
    return self.manager.latest_step()

  def save(self, epoch: int, state, extra: dict | None = None):
    items = jax.device_get(state.checkpoint_items())
    args = {'state': ocp.args.StandardSave(items)}
    if extra is not None:
      args['extra'] = ocp.args.JsonSave(extra)
    self.manager.save(epoch, args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()

  def restore(self, state, epoch: int | None = None):
    """Restore into the structure of `state`; returns (state, extra or {})."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      jax.device_get(state.checkpoint_items()))
    args = {'state': ocp.args.StandardRestore(abstract)}
    if os.path.exists(os.path.join(self.directory, str(epoch), 'extra')):
      args['extra'] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(epoch, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many kinds; all mean the same to a user
      raise _unreadable(os.path.join(self.directory, str(epoch)), e) from None
    extra = restored['extra'] if 'extra' in args else {}
    return state.restore_items(restored['state']), extra or {}

  def close(self):
    self.manager.close()


def save_variables(path: str, variables):
  """A finished model's `{'params', 'batch_stats'}` (written to a temp folder, then renamed)."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, jax.device_get(variables), force=True)


def load_variables(path: str, like=None):
  """The variables saved by `save_variables` (shaped like `like` when given)."""
  path = os.path.abspath(path)
  abstract = (jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, jax.device_get(like))
              if like is not None else None)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path, abstract) if abstract is not None else ckptr.restore(path)
  except Exception as e:
    raise _unreadable(path, e) from None
  return {'params': out['params'], 'batch_stats': out['batch_stats']}


def save_variables_safetensors(path: str, variables):
  """Our variables as one safetensors file, keys 'params/image_encoder/...' (atomic write)."""
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in p): np.ascontiguousarray(np.asarray(v))
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]}
  blob = save(flat)
  atomic_write(path, lambda f: f.write(blob))


def load_variables_safetensors(path: str):
  """The variables written by `save_variables_safetensors`."""
  out = {}
  for key, value in load_file(path).items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  if set(out) != {'params', 'batch_stats'}:
    raise ValueError(f'{path}: not a forgetmi-jax variables file (top-level keys {sorted(out)})')
  return out
