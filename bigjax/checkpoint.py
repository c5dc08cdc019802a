"""orbax CheckpointManager wrapper: save every N steps, keep K, restore the newest good step.

A damaged checkpoint (truncated, deleted or bit-flipped array files, a missing manifest or
metadata) stays listed by orbax but raises on restore; `restore_latest` warns naming the bad step,
falls back to the next newest one that restores, and moves the damaged ones aside. Old steps are only
removed by orbax after a newer one has been committed, so the last good checkpoint is never lost.

Also the rest of a run's state that must agree with the restored step: `History` (workdir/
history.jsonl, the learning curve across restarts) and `EarlyStopping` (the best state in
workdir/best/ and best.json; its counters are replayed from the history).
"""
import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from bigjax.errors import UserError

log = logging.getLogger(__name__)


class Checkpointer:
  """Checkpoints of a TrainState under `directory` (the run's `workdir/checkpoints`)."""

  def __init__(self, directory, max_to_keep=3):
    self.directory = os.path.abspath(directory)
    # A single, unnamed item, declared up front: otherwise orbax infers the layout from the newest
    # step on disk, and one step missing its item folder would make every step unreadable.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

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
        log.warning('checkpoint step %d in %s cannot be restored (%s: %s); trying an older step',
                    step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        damaged.append(step)
    if damaged:
      self._move_aside(damaged)
    return result

  def _move_aside(self, steps):
    if jax.process_index() == 0:
      target = f'{self.directory}_damaged'
      os.makedirs(target, exist_ok=True)
      for step in steps:
        os.replace(os.path.join(self.directory, str(step)),
                   os.path.join(target, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('bigjax_checkpoint_move_aside')
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of `abstract_state` carrying the given shardings (restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def load_latest(directory):
  """(step, state dict of numpy arrays) from the newest checkpoint in `directory`.

  Restores into host numpy arrays whatever the mesh it was saved from, so it serves inspection,
  tests, colabs and `config.init_from`. The tree is {'step', 'params', 'model_state', 'opt_state'}
  (optimizer-state tuples come back as lists).
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers=ocp.StandardCheckpointHandler())
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


def _write_atomic(path, text):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _json_default(x):
  return x.tolist() if isinstance(x, (np.generic, np.ndarray)) else str(x)


class History:
  """A run's learning curve: {'step', 'split': 'train'|'eval', metric: float, ...} dicts, one JSON
  line each in `path` (workdir/history.jsonl), appended and flushed as they are produced.

  Opening it for a run resumed at `restored_step` keeps the entries with step <= restored_step
  (later ones were written after that checkpoint and will be produced again) and rewrites the file;
  `entries` is then the whole run's history. A fresh run passes 0. Only process 0 writes.
  """

  def __init__(self, path, restored_step):
    self.path, self.entries, self._file = path, [], None
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            entry = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          if entry['step'] <= restored_step:
            self.entries.append(entry)
    if jax.process_index() == 0:
      _write_atomic(path, ''.join(self._line(e) for e in self.entries))
      self._file = open(path, 'a')

  @staticmethod
  def _line(entry):
    return json.dumps(entry, default=_json_default) + '\n'

  def append(self, entry):
    self.entries.append(entry)
    if self._file:
      self._file.write(self._line(entry))
      self._file.flush()

  def has(self, step, split):
    return any(e['step'] == step and e['split'] == split for e in self.entries)

  def close(self):
    if self._file:
      self._file.close()


class EarlyStopping:
  """config.early_stopping over a run's evals: keeps the best state, says when to stop.

  cfg: {metric ('' = off), mode 'max'|'min', patience, min_delta}. An eval improves when its metric
  beats the best so far by more than min_delta; the improving state is saved (orbax, keep 1) in
  workdir/best/ and described in workdir/best.json: {'step', 'metric', 'value', 'eval': the full
  eval report}. `stopped` once `patience` (> 0) consecutive evals have not improved. The counters
  are replayed from the eval entries of the run's (restored) history, so they survive restarts.
  """

  def __init__(self, cfg, workdir, history_entries):
    self.metric, self.mode = cfg.metric, cfg.mode
    self.patience, self.min_delta = cfg.patience, cfg.min_delta
    self.best_value, self.best_step, self.bad_evals = None, None, 0
    self.json_path = os.path.join(workdir, 'best.json')
    self.ckpt, self.record = None, None
    if self.metric:
      for entry in history_entries:
        if entry['split'] == 'eval':
          self._update(entry['step'], entry)
      self.ckpt = Checkpointer(os.path.join(workdir, 'best'), max_to_keep=1)

  @property
  def stopped(self):
    return bool(self.metric and self.patience and self.bad_evals >= self.patience)

  def _update(self, step, report):
    """Counts one eval; returns True when it improved on the best."""
    if self.metric not in report or np.ndim(report[self.metric]):
      known = ', '.join(k for k, v in report.items() if np.ndim(v) == 0 and k not in ('step',
                                                                                       'split'))
      raise UserError(f'config.early_stopping.metric={self.metric!r} is not a scalar of the eval '
                      f'report; use one of {known}')
    value = float(report[self.metric])
    sign = 1.0 if self.mode == 'max' else -1.0
    improved = np.isfinite(value) and (self.best_value is None or
                                       sign * (value - self.best_value) > self.min_delta)
    if improved:
      self.best_value, self.best_step, self.bad_evals = value, step, 0
    else:
      self.bad_evals += 1
    return improved

  def update(self, step, report, state):
    """Counts the eval `report` of `state` at `step`; saves the state when it is the best so far."""
    if not self.metric or not self._update(step, report):
      return
    if step in self.ckpt.all_steps():  # saved before a restart; the resumed run reached it again
      self.ckpt.delete(step)
    self.ckpt.save(step, state)
    self.ckpt.wait()  # best.json only ever names a committed checkpoint
    self.record = json.loads(json.dumps(  # as JSON will hold it
        {'step': step, 'metric': self.metric, 'value': self.best_value, 'eval': report},
        default=_json_default))
    if jax.process_index() == 0:
      _write_atomic(self.json_path, json.dumps(self.record, indent=2))

  def best(self):
    """{'step', 'metric', 'value', 'eval'} of the best state (best.json's dict), or None when early
    stopping is off or no eval has improved yet."""
    if self.record is None and self.metric and os.path.exists(self.json_path):
      with open(self.json_path) as f:
        self.record = json.load(f)
    return self.record

  def close(self):
    if self.ckpt:
      self.ckpt.close()
