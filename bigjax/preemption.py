"""SIGTERM/SIGINT during training: finish the step in flight, save, exit; agreed across processes.
And a lost peer (`PeerWatch`): the survivors exit with one line instead of hanging or aborting.

The same for the signal a scheduler sends before a job's time limit (SLURM's `--signal=USR2@s`, the
one submitit asks for; `SUBMITIT_PREEMPT_SIGNAL` names another): SLURM sends it to every process of
the job, and its default action would end the run without saving (bigjax/cluster/train_job.py).

The loop reads `stop_requested(step)` once per step. With several processes every one must save
the same step, so the flag is combined across processes (any one signalled means all stop), but
only at log steps: the collective then runs every config.log_every steps, not every step.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np


def stop_signals() -> tuple[signal.Signals, ...]:
  """SIGTERM, SIGINT and the scheduler's time-limit signal (default SIGUSR2)."""
  limit = getattr(signal, 'SIG' + os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2'), signal.SIGUSR2)
  return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, limit)))


class Preemption:
  """Context manager that turns the stop signals (`stop_signals`) into a flag (handlers restored
  on exit)."""

  def __init__(self, log_every: int):
    self.requested: str | bool = False
    self.log_every = log_every
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():  # signals only reach that thread
      for sig in stop_signals():
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    # The first signal names the stop (a job's tasks may get SLURM's warning, then their wrapper's
    # SIGTERM).
    self.requested = self.requested or signal.Signals(signum).name

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


EXIT_LOST_PEER = 3


class PeerWatch:
  """In a multi-process run, a daemon thread that ends this process with one line when a peer
  stops showing signs of life for `timeout_s` seconds (killed, OOM, node lost), instead of XLA's
  C++ abort after its own heartbeat timeout (which bigjax sets longer, see
  mesh.initialize_distributed).

  Each process increments a counter in the jax distributed key-value store every `timeout_s / 5`
  seconds and reads its peers' counters; a counter that has not moved for `timeout_s` (by this
  process's clock: no clock is compared across hosts), or a store that cannot be reached (the
  coordinator, process 0, is gone), ends the run with exit status EXIT_LOST_PEER.
  `last_saved()` names the newest checkpoint for the message; a peer that has not shown life yet
  gets `startup_timeout_s` (config.distributed.timeout_s). Our own code: jax exposes liveness
  only through the same heartbeat that aborts the process (`get_live_nodes` turned false in the
  same instant as the abort, measured).
  """

  def __init__(self, timeout_s: float, last_saved: Callable[[], str], startup_timeout_s: float):
    self.timeout_s, self.last_saved = timeout_s, last_saved
    self.startup_timeout_s = max(startup_timeout_s, timeout_s)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> PeerWatch:
    if jax.process_count() > 1:
      self._thread = threading.Thread(target=self._watch, name='bigjax-peer-watch', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()

  def _watch(self) -> None:
    from jax._src import distributed  # the store behind jax.distributed (no public handle)

    client = distributed.global_state.client
    assert client is not None  # started only in a multi-process run
    me, count = jax.process_index(), jax.process_count()
    seen: dict[int, tuple[str, float]] = {p: ('', time.monotonic()) for p in range(count)}
    interval = max(self.timeout_s / 5, 0.2)
    while not self._stop.wait(interval):
      try:
        client.key_value_increment(f'bigjax/alive/{me}', 1)
        for peer in range(count):
          if peer == me:
            continue
          try:
            value = client.key_value_try_get(f'bigjax/alive/{peer}')
          except Exception:  # noqa: BLE001  (not written yet: NotFound)
            value = ''
          if value != seen[peer][0]:
            seen[peer] = (value, time.monotonic())
            continue
          # A peer that has not reached its training loop yet (a slower compile) gets the
          # start-up timeout; once it has shown life, the peer timeout.
          limit = self.timeout_s if value else self.startup_timeout_s
          if time.monotonic() - seen[peer][1] > limit and not self._stop.is_set():
            self._lost(
              f'process {peer} of {count} stopped responding (no sign of life for {limit:g} s)'
            )
      except Exception as e:  # noqa: BLE001  (the store itself is gone: the coordinator died)
        if not self._stop.is_set():
          self._lost(
            f'the coordinator (process 0 of {count}) cannot be reached ({type(e).__name__})'
          )

  def _lost(self, what: str) -> None:
    sys.stderr.write(  # on a line of its own, after whatever the progress bar left
      f'\nbigjax: {what}; last saved step: {self.last_saved()}. Restart every '
      'process with the same command to resume from it\n'
    )
    sys.stderr.flush()
    os._exit(EXIT_LOST_PEER)  # the main thread may be blocked in a collective with the lost peer
