"""Orbax checkpoints of a TrainState, one per epoch, resumable after kill -9.

Orbax writes each step into a temporary folder and renames it when complete, so a killed run
leaves either a whole checkpoint or none; `cleanup_tmp_directories` removes the debris.
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
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
    """Restore into the structure of `state`; returns (state, extra or None)."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      jax.device_get(state.checkpoint_items()))
    args = {'state': ocp.args.StandardRestore(abstract)}
    if os.path.exists(os.path.join(self.directory, str(epoch), 'extra')):
      args['extra'] = ocp.args.JsonRestore()
    restored = self.manager.restore(epoch, args=ocp.args.Composite(**args))
    extra = restored['extra'] if 'extra' in args else None
    return state.restore_items(restored['state']), extra

  def close(self):
    self.manager.close()
