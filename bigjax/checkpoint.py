"""orbax CheckpointManager wrapper: save every N steps, keep K, restore the newest good step.

A damaged checkpoint (truncated, deleted or bit-flipped array files, a missing manifest or
metadata) stays listed by orbax but raises on restore; `restore_latest` warns naming the bad step,
falls back to the next newest one that restores, and moves the damaged ones aside. Old steps are only
removed by orbax after a newer one has been committed, so the last good checkpoint is never lost.

Run bookkeeping that must agree with the restored step (history.jsonl, early stopping) lives in
bigjax/history.py.
"""

import contextlib
import errno
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from bigjax.errors import UserError

log = logging.getLogger(__name__)
# How a full disk shows in the (wrapped) errors of orbax and tensorstore.
DISK_FULL = (os.strerror(errno.ENOSPC), 'RESOURCE_EXHAUSTED', 'ENOSPC', 'Disk quota exceeded')


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

  def newest_committed_step(self) -> int | None:
    """The newest step whose save has finished on disk (orbax renames a step's temporary folder
    when it commits), or None. Unlike `latest_step`, never a save still in flight."""
    steps = ocp.utils.checkpoint_steps(self.directory) if os.path.isdir(self.directory) else []
    return max(steps, default=None)

  def save(self, step, state):
    """Saves `state` as `step` (asynchronously; call `wait` before relying on it). A full disk is
    a one-line UserError naming the newest committed step, which still restores."""
    with self._disk_errors(step):
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self):
    with self._disk_errors(None):
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _disk_errors(self, step):
    try:
      yield
    except Exception as e:  # orbax wraps the OSError of a failed write in its own errors
      text = f'{type(e).__name__}: {e}'
      if not any(sign in text for sign in DISK_FULL):
        raise
      committed = [s for s in self.all_steps() if s != step]
      last = f'step {committed[-1]}' if committed else 'none'
      raise UserError(
        f'no space left on the device of {self.directory} while saving'
        f'{f" step {step}" if step is not None else ""}; the last good checkpoint ({last}) still '
        'restores: free space (or lower config.keep_checkpoints) and run the same command again'
      ) from None

  def delete(self, step):
    self.manager.delete(step)

  def mismatch(self, abstract_state) -> str | None:
    """How the newest checkpoint whose metadata reads differs in structure (parameter paths,
    shapes, dtypes) from `abstract_state`, or None when it matches or nothing is readable.

    A difference means the config now builds another train state (a changed optimizer, model or
    data): that is no damage, and the caller must not treat the step as damaged."""
    want = signature(abstract_state)
    for step in reversed(self.all_steps()):
      try:
        metadata = self.manager.item_metadata(step)
      except (ValueError, OSError, KeyError, TypeError):
        continue
      have = signature(getattr(metadata, 'tree', metadata))
      if not have:
        continue
      if have == want:
        return None
      missing = sorted(set(want) - set(have))
      extra = sorted(set(have) - set(want))
      shaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
      parts = [
        f'{len(missing)} entries built now are not in it (e.g. {missing[0]})' if missing else '',
        f'{len(extra)} of its entries are not built now (e.g. {extra[0]})' if extra else '',
        f'{len(shaped)} differ in shape or dtype (e.g. {shaped[0]}: {have[shaped[0]]} '
        f'saved, {want[shaped[0]]} now)'
        if shaped
        else '',
      ]
      return (
        f'checkpoint step {step} does not fit the train state this config builds: '
        + '; '.join(p for p in parts if p)
      )
    return None

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
    try:
      self.wait()
    finally:
      self.manager.close()


def _token(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def signature(tree) -> dict[str, tuple]:
  """{'opt_state/0/mu/conv_0/kernel': (shape, dtype)} for every array leaf of a train state, an
  abstract one, or orbax's metadata of one (namedtuple fields and dict keys read the same)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, 'shape'):
      out['/'.join(_token(k) for k in path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


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
