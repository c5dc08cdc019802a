"""The launcher interface: how a sweep's runs reach processes, whatever runs them.

The sweep runner (bigjax/sweep/launch.py) plans the runs, skips finished ones and reports; a
`Launcher` only starts the runs it is given and tells their states: it `check`s the request before
anything is submitted, `submit`s the runs, `refresh`es every job's state once per poll (the local
launcher also starts queued runs there), and `stop`s the jobs left when the sweep is interrupted.
Every run is the same `python -m bigjax.train` command line (`train_args`), so a run resumes the
same way under every launcher.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import dataclasses
import os
import time

from bigjax.cluster.resources import Resources
from bigjax.sweep.plan import Run

PENDING, RUNNING, DONE, FAILED = 'pending', 'running', 'done', 'failed'
LOG_TAIL_LINES = 15
LOG_NAME = 'log.txt'  # a run's output (task 0's), in its workdir


def train_args(run: Run) -> list[str]:
  """bigjax.train's flags for `run` (every path absolute)."""
  return [f'--config={run.spec}', f'--workdir={os.path.abspath(run.workdir)}', *run.args]


def log_path(run: Run) -> str:
  """The run's log.txt: every launch appends its header line and the run's output."""
  return os.path.join(run.workdir, LOG_NAME)


@dataclasses.dataclass
class Job:
  """One submitted run. state: PENDING (queued), RUNNING, DONE (ended with exit status 0) or FAILED
  (`why`: the exit status or the scheduler's reason); `scheduler_log`: a scheduler log file to
  show with the run's log.txt when it fails."""

  run: Run
  state: str = PENDING
  why: str = ''
  scheduler_log: str = ''
  submitted: float = dataclasses.field(default_factory=time.time)
  started: float | None = None

  @property
  def ended(self) -> bool:
    return self.state in (DONE, FAILED)

  def mark(self, state: str, why: str = '') -> None:
    if state == RUNNING and self.started is None:
      self.started = time.time()
    self.state, self.why = state, why


@dataclasses.dataclass
class Options:
  """What the command line gives every launcher: `jobs` runs at a time (0: as many as the
  scheduler allows), the runs' resources, the sweep's workdir (scheduler files go under it), the
  resource flags given explicitly (a launcher refuses those it cannot honour) and the Ray address."""

  jobs: int
  resources: Resources
  workdir: str
  given: Sequence[str] = ()
  ray_address: str = ''


class Launcher(abc.ABC):
  """Starts runs and reports their states; see the module docstring. poll_s: seconds between
  `refresh` calls. uses: the Resources fields this launcher honours."""

  poll_s = 1.0
  uses: tuple[str, ...] = ()

  def __init__(self, options: Options):
    self.options = options

  def check(self, runs: Sequence[Run]) -> None:  # noqa: B027  (optional: local has no checks)
    """Raises UserError for a request this launcher cannot carry out, before anything starts."""

  @abc.abstractmethod
  def submit(self, runs: Sequence[Run]) -> list[Job]:
    """Hands the runs to the scheduler; returns one Job per run, in order."""

  @abc.abstractmethod
  def refresh(self, jobs: Sequence[Job]) -> None:
    """Updates every job's state (and starts queued runs where this launcher queues them)."""

  @abc.abstractmethod
  def stop(self, jobs: Sequence[Job]) -> None:
    """Asks the runs of the jobs not yet ended to save and stop, and waits for them."""


def log_tail(path: str, n: int = LOG_TAIL_LINES) -> str:
  """The last `n` non-empty lines of the log at `path` (progress bars left out), indented."""
  import re

  try:
    with open(path, errors='replace') as f:
      lines = [
        l.rstrip()
        for l in f.read().replace('\r', '\n').splitlines()
        if l.strip() and not re.search(r'\d%\|', l)
      ]  # not tqdm progress bars
  except OSError:
    return f'    (no {os.path.basename(path)})'
  return '\n'.join('    ' + l for l in lines[-n:])
