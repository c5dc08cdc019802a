"""A run's workdir: its path, one writer at a time, and what may change when a run resumes.

- `resolve(path)`: `~` expanded, made absolute, and checked writable before anything is written.
- `Lock`: an `fcntl` lock on `workdir/.lock`, held by process 0 for the run's life, so a second run
  on the same workdir exits at once naming the holder; the kernel drops the lock when its process
  dies, so a killed run never leaves a lock that blocks the re-run.
- `config_changes(saved, config)`: the fields that differ from the run's recorded config.json, split
  into those that only change how the run is executed or logged (accepted, recorded) and those that
  change its trajectory (refused unless the user allows them). A change of the train state's
  structure is found from the checkpoint itself (`checkpoint.Checkpointer.mismatch`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from bigjax import config_lib
from bigjax.errors import UserError

LOCK_FILE = '.lock'
CHANGES_FILE = 'config_changes.jsonl'

# Fields whose change alters neither the parameters' trajectory nor the data of a step: how the run
# is laid out on devices, how often it logs, evaluates and saves, and where it reads data from.
# (grad_accum_steps: the accumulated step equals the big-batch step, tests/test_steps.py.)
EXECUTION_FIELDS = (
  'mesh.',
  'distributed.',
  'sharding_rules',
  'grad_accum_steps',
  'log_every',
  'eval_every',
  'checkpoint_every',
  'keep_checkpoints',
  'eval_batch_size',
  'data.data_dir',
  'log_grad_norms',
  'save_eval_predictions',
  'profile_steps',
  'wandb.',
  'init_from.',  # read only when a run starts
)


def resolve(path: str) -> str:
  """The absolute workdir for `path` (`~` expanded); UserError if it cannot be created or written."""
  if not path:
    raise UserError('--workdir is empty; give a directory for the run')
  path = os.path.abspath(os.path.expanduser(path))
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if os.path.exists(probe) and not os.path.isdir(probe):
    raise UserError(
      f'--workdir={path}: {probe} is a file, not a directory; choose another --workdir'
    )
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(
      f'--workdir={path}: {probe} is not writable by this user; choose a directory you can write to'
    )
  return path


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return (
      f'process {info["pid"]} on {info["host"]}, started '
      f'{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["start"]))}'
    )
  except (OSError, ValueError, KeyError, TypeError):
    return 'another process'


class Lock:
  """Exclusive lock on `workdir/.lock` for the run's life (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd: int | None = None

  def __enter__(self) -> Lock:
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise UserError(
        f'{os.path.dirname(self.path)} is in use by {_holder(self.path)}; wait for it '
        'to finish (or stop it), or use another --workdir'
      ) from None
    info = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'start': time.time()})
    os.ftruncate(fd, 0)
    os.write(fd, info.encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def read_saved_config(workdir: str) -> dict | None:
  """The run's recorded config.json as a dict; None when there is none. A damaged file is a
  one-line UserError (it is the only record of how the run's checkpoints were made)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
    return saved
  except (OSError, ValueError) as e:
    raise UserError(
      f'{path} is damaged ({type(e).__name__}: {str(e)[:80]}), so the config its '
      'checkpoints were made with is unknown; restore that file, or delete the '
      'workdir to start over'
    ) from None


def config_changes(saved: dict, current: dict) -> tuple[list[tuple], list[tuple]]:
  """(execution changes, trajectory changes), each a list of (field, old, new), between the saved
  config.json dict and the current config (as JSON). Fields the saved config lacks (added to
  bigjax after the run started) count as unchanged."""
  old = config_lib.flat_fields(saved)
  new = config_lib.flat_fields(json.loads(json.dumps(current)))
  execution: list[tuple] = []
  trajectory: list[tuple] = []
  for field in sorted(set(old) | set(new)):
    if field not in old or old.get(field) == new.get(field):
      continue
    change = (field, old.get(field), new.get(field))
    is_execution = any(
      field == f or (f.endswith('.') and field.startswith(f)) for f in EXECUTION_FIELDS
    )
    (execution if is_execution else trajectory).append(change)
  return execution, trajectory


def describe(changes: list[tuple]) -> str:
  """'optim.lr: 0.001 -> 0.002, seed: 0 -> 1'."""
  return ', '.join(f'{field}: {old!r} -> {new!r}' for field, old, new in changes)


def record_changes(workdir: str, step: int, changes: list[tuple]) -> None:
  """Appends one line per changed field ({'step', 'field', 'old', 'new', 'time'}) to
  workdir/config_changes.jsonl: the run's history says which config made which steps."""
  with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
    for field, old, new in changes:
      f.write(
        json.dumps(
          {
            'step': step,
            'field': field,
            'old': old,
            'new': new,
            'time': time.strftime('%Y-%m-%d %H:%M:%S'),
          }
        )
        + '\n'
      )


def check_same_components(workdir: str, saved: dict | None, config) -> None:
  """Refuses a workdir whose saved run (its config.json dict) has another model or task."""
  if saved is None:
    return
  for part in ('model', 'task'):
    if saved.get(part) != json.loads(config[part].to_json()):
      raise UserError(
        f'{workdir} holds a run with a different config.{part}; use a new --workdir, '
        'or delete that workdir to start over'
      )


def resume_changes(config, abstract_state, ckpt, saved: dict | None, allow: bool) -> list[tuple]:
  """The config changes against the run's recorded config that resuming accepts; UserError for
  the ones it refuses (nothing has been written by then, and nothing is moved)."""
  if saved is None or not ckpt.all_steps():
    return []
  execution, trajectory = config_changes(saved, config.to_dict())
  if config.optim.schedule == 'constant' and saved.get('optim', {}).get('schedule') == 'constant':
    # Training longer (or shorter) with a constant learning rate changes no step already taken
    # or still to come: the documented way to extend a run.
    length = [c for c in trajectory if c[0] in ('num_steps', 'num_epochs')]
    trajectory = [c for c in trajectory if c not in length]
    execution += length
  changes = execution + trajectory
  where = ckpt.directory
  mismatch = ckpt.mismatch(abstract_state)
  if mismatch:
    raise UserError(
      f'the config changed since this run started ({describe(changes) or "no field"}) '
      f'and {mismatch}; the checkpoints in {where} are kept as they are. Undo the change, use a new '
      f'--workdir, or start a new run from these parameters with --config.init_from.checkpoint='
      f'{os.path.dirname(where)}'
    )
  if trajectory and not allow:
    raise UserError(
      f'the config changed since this run started: {describe(trajectory)}; resuming '
      'with it changes the run. Undo the change, use a new --workdir, or pass '
      '--allow_config_change to continue with it (recorded in config_changes.jsonl)'
    )
  return changes
