"""orbax CheckpointManager wrapper: save every N steps, keep K, restore the newest good step.

A damaged checkpoint (truncated, deleted or bit-flipped array files, a missing manifest or
metadata) stays listed by orbax but raises on restore; `restore_latest` warns naming the bad step,
falls back to the next newest one that restores, and moves the damaged ones aside. Old steps are only
removed by orbax after a newer one has been committed, so the last good checkpoint is never lost.

Run bookkeeping that must agree with the restored step (history.jsonl, early stopping) lives in
bigjax/history.py.
"""

import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Checkpoints of a TrainState under `directory` (the run's `workdir/checkpoints`)."""

  def __init__(self, directory, max_to_keep=3):
    self.directory = os.path.abspath(directory)
    # A single, unnamed item, declared up front: otherwise orbax infers the layout from the newest
    # step on disk, and one step missing its item folder would make every step unreadable.
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state):
    """Saves `state` as `step` (asynchronously; call `wait` before relying on it)."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def delete(self, step):
    self.manager.delete(step)

  def restore_latest(self, abstract_state):
    """Restores the newest step that loads into `abstract_state`'s shapes and shardings.

    abstract_state: a tree of jax.ShapeDtypeStruct with `.sharding`. Returns (state, step), or
    (None, None) when the directory holds no restorable checkpoint. Each damaged step is reported
    with a warning naming it, then moved to `<directory>_damaged/` (kept for inspection, out of the
    way of the step numbers the resumed run will save again).
    """
    damaged, result = [], (None, None)
    for step in reversed(self.all_steps()):
      try:
        result = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), step
        break
      except (ValueError, OSError, KeyError, TypeError) as e:
        log.warning(
          'checkpoint step %d in %s cannot be restored (%s: %s); trying an older step',
          step,
          self.directory,
          type(e).__name__,
          str(e).splitlines()[0][:200],
        )
        damaged.append(step)
    if damaged:
      self._move_aside(damaged)
    return result

  def _move_aside(self, steps):
    if jax.process_index() == 0:
      target = f'{self.directory}_damaged'
      os.makedirs(target, exist_ok=True)
      for step in steps:
        os.replace(
          os.path.join(self.directory, str(step)),
          os.path.join(target, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'),
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('bigjax_checkpoint_move_aside')
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of `abstract_state` carrying the given shardings (restore target)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def load_latest(directory):
  """(step, state dict of numpy arrays) from the newest checkpoint in `directory`.

  Restores into host numpy arrays whatever the mesh it was saved from, so it serves inspection,
  tests, colabs and `config.init_from`. The tree is {'step', 'params', 'model_state', 'opt_state'}
  (optimizer-state tuples come back as lists).
  """
  manager = ocp.CheckpointManager(
    os.path.abspath(directory), item_handlers=ocp.StandardCheckpointHandler()
  )
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f'no checkpoint in {directory}')
  metadata = manager.item_metadata(step)
  metadata = getattr(metadata, 'tree', metadata)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
  tree = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return step, tree
