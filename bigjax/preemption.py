"""SIGTERM/SIGINT during training: finish the step in flight, save, exit; agreed across processes.

The loop reads `stop_requested(step)` once per step. With several processes every one must save
the same step, so the flag is combined across processes (any one signalled means all stop), but
only at log steps: the collective then runs every config.log_every steps, not every step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np


class Preemption:
  """Context manager that turns SIGTERM/SIGINT into a flag (handlers restored on exit)."""

  def __init__(self, log_every: int):
    self.requested: str | bool = False
    self.log_every = log_every
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():  # signals only reach that thread
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def stop_requested(self, step: int) -> str | bool:
    """The signal name (or 'preemption of a peer process') when training must stop after `step`,
    else False."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.log_every:
      return False
    from jax.experimental import multihost_utils

    anyone = multihost_utils.process_allgather(np.array(bool(self.requested))).any()
    return (self.requested or 'preemption of a peer process') if anyone else False

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
