"""Run bookkeeping beside the checkpoints: the learning curve and early stopping.

`History` is workdir/history.jsonl (every logged train and eval metric, kept across restarts);
`EarlyStopping` keeps the best state in workdir/best/ (+ best.json) and replays its counters from
the history, so both agree with whatever step a run resumes from.
"""

import json
import logging
import os

import jax
import numpy as np

from bigjax import checkpoint
from bigjax.errors import UserError
from bigjax.reporting import write_atomic

log = logging.getLogger(__name__)


def _json_default(x):
  return x.tolist() if isinstance(x, (np.generic, np.ndarray)) else str(x)


def _entry(line: bytes) -> dict | None:
  """One history line -> its entry, or None unless it is a JSON object with an int step and a split."""
  try:
    entry = json.loads(line.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  ok = isinstance(entry, dict) and isinstance(entry.get('step'), int) and 'split' in entry
  return entry if ok else None


class History:
  """A run's learning curve: {'step', 'split': 'train'|'eval', metric: float, ...} dicts, one JSON
  line each in `path` (workdir/history.jsonl), appended and flushed as they are produced.

  Opening it for a run resumed at `restored_step` keeps the entries with step <= restored_step
  (later ones were written after that checkpoint and will be produced again) and rewrites the file;
  `entries` is then the whole run's history. A fresh run passes 0. Only process 0 writes.
  """

  def __init__(self, path, restored_step):
    self.path, self.entries, self._file = path, [], None
    dropped = 0
    if os.path.exists(path):
      with open(path, 'rb') as f:
        for line in f:
          entry = _entry(line)
          if entry is None:  # a line cut short by a kill, or damaged
            dropped += line.strip() != b''
          elif entry['step'] <= restored_step:
            self.entries.append(entry)
    if dropped:
      log.warning(
        '%s: %d unreadable line(s) dropped (a line cut short by a kill, or damage); the '
        '%d readable entries up to step %d are kept',
        path,
        dropped,
        len(self.entries),
        restored_step,
      )
    if jax.process_index() == 0:
      write_atomic(path, ''.join(self._line(e) for e in self.entries))
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
      self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'best'), max_to_keep=1)

  @property
  def stopped(self):
    return bool(self.metric and self.patience and self.bad_evals >= self.patience)

  def _update(self, step, report):
    """Counts one eval; returns True when it improved on the best."""
    if self.metric not in report or np.ndim(report[self.metric]):
      known = ', '.join(
        k for k, v in report.items() if np.ndim(v) == 0 and k not in ('step', 'split')
      )
      raise UserError(
        f'config.early_stopping.metric={self.metric!r} is not a scalar of the eval '
        f'report; use one of {known}'
      )
    value = float(report[self.metric])
    sign = 1.0 if self.mode == 'max' else -1.0
    improved = np.isfinite(value) and (
      self.best_value is None or sign * (value - self.best_value) > self.min_delta
    )
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
    self.record = json.loads(
      json.dumps(  # as JSON will hold it
        {'step': step, 'metric': self.metric, 'value': self.best_value, 'eval': report},
        default=_json_default,
      )
    )
    if jax.process_index() == 0:
      write_atomic(self.json_path, json.dumps(self.record, indent=2))

  def best(self):
    """{'step', 'metric', 'value', 'eval'} of the best state (best.json's dict), or None when early
    stopping is off or no eval has improved yet."""
    if self.record is None and self.metric and os.path.exists(self.json_path):
      self.record = self._read_record()
    return self.record

  def _read_record(self) -> dict | None:
    """best.json, when it is readable and its step's checkpoint is in best/; else None, with a
    warning that says what is kept (the run itself is not affected)."""
    try:
      with open(self.json_path) as f:
        record = json.load(f)
      step = record['step']
    except (OSError, ValueError, KeyError, TypeError) as e:
      log.warning(
        '%s is damaged (%s); results carry no best state until an eval improves on '
        'the best so far (step %s in the history)',
        self.json_path,
        type(e).__name__,
        self.best_step,
      )
      return None
    if self.ckpt is not None and step not in self.ckpt.all_steps():
      log.warning(
        '%s names step %s but %s holds no checkpoint of it; results carry no best state '
        'until an eval improves on it',
        self.json_path,
        step,
        self.ckpt.directory,
      )
      return None
    return record

  def close(self):
    if self.ckpt:
      self.ckpt.close()
