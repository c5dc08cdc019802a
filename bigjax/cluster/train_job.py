"""The body of one cluster job (a SLURM task through submitit, or a Ray task): `python -m
bigjax.train ARGS` as a subprocess, waited for, its exit status turned into the job's outcome.

A subprocess, not a call into bigjax.train in this process: submitit installs its own signal
handlers in the job's process (the time-limit signal calls `checkpoint`, which requeues the job),
and the run keeps bigjax's own (bigjax/preemption.py: SIGTERM, SIGINT and SLURM's warning signal
save a checkpoint and exit 143).

Time limits and preemption under SLURM (`Resources.signal_s` before the limit SLURM signals every
process of the job; submitit calls `checkpoint` in task 0): the run is asked to stop (it saves the
step it is at; with several processes all agree on that step), then this callable is resubmitted as
it is and submitit requeues the job; the requeued job runs the same command, which resumes from the
checkpoint and continues bitwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from bigjax import cli

# After a run exits because it was signalled (it saved), how long the job waits for the scheduler to
# requeue it (task 0 asks for that once the run has ended) before ending as failed.
REQUEUE_GRACE_S = 60.0


class RunFailed(RuntimeError):
  """bigjax.train ended with a non-zero exit status (the scheduler's job fails)."""


class TrainJob:
  """Callable that runs `python -m bigjax.train *args` in `cwd` with `env` added to this process's
  environment, its output appended to `log_path` by task 0 (None, and in the other tasks: this
  process's stdout and stderr, e.g. submitit's per-task log files). `label` starts the header
  line written to the log before the run. Returns 0 when the run exits 0; raises RunFailed
  otherwise."""

  def __init__(
    self,
    args: Sequence[str],
    cwd: str,
    log_path: str | None = None,
    env: Mapping[str, str] | None = None,
    label: str = 'bigjax',
  ):
    self.args, self.cwd, self.log_path = list(args), cwd, log_path
    self.env, self.label = dict(env or {}), label
    self._proc: subprocess.Popen | None = None
    self._stop_sent = False

  def __getstate__(self) -> dict[str, Any]:  # resubmitted on requeue: without the live process
    return {k: v for k, v in self.__dict__.items() if k not in ('_proc', '_stop_sent')}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _proc=None, _stop_sent=False)

  def command(self) -> list[str]:
    return [sys.executable, '-m', 'bigjax.train', *self.args]

  def __call__(self) -> int:
    cmd = self.command()
    # Every path on the command line is absolute; the submitting directory may not exist here.
    cwd = self.cwd if os.path.isdir(self.cwd) else os.getcwd()
    # Task 0 writes the log file; the others' output goes to their own stdout (submitit's per-task
    # log files), not interleaved into one file.
    task = int(os.environ.get('SLURM_PROCID', '0'))
    log = open(self.log_path, 'a') if self.log_path and task == 0 else None
    try:
      out = log or sys.stdout
      out.write(
        f'\n==== {self.label} {time.strftime("%Y-%m-%d %H:%M:%S")} on {socket.gethostname()}'
        f'{_where()}: (cd {shlex.quote(cwd)} && {shlex.join(cmd)})\n'
      )
      out.flush()
      env = dict(os.environ, **self.env, PYTHONUNBUFFERED='1')
      self._proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
      )
      try:
        # Polled, not wait(): `checkpoint` runs in a signal handler of this thread and waits for
        # the same process (a blocking wait() would hold the lock it needs).
        while self._proc.poll() is None:
          time.sleep(0.2)
      except KeyboardInterrupt:  # ray.cancel(): stop the run (it saves), then end
        self._stop()
        raise
    finally:
      if log:
        log.close()
    code = self._proc.returncode
    if code == 0:
      return 0
    if code == cli.EXIT_PREEMPTED:
      # The run was signalled and saved: by the scheduler (time limit, preemption), by a peer's
      # signal, or cancelled. Task 0 requeues the job from `checkpoint`; until that kills this
      # process, wait. A job nobody requeues (cancelled) ends failed.
      deadline = time.monotonic() + REQUEUE_GRACE_S
      while time.monotonic() < deadline:
        time.sleep(0.5)
    raise RunFailed(f'bigjax.train exited with status {code}{_where()}; see its log')

  def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
    """Called by submitit in task 0 on the signal before the time limit (or on preemption): stops
    the run, which saves a checkpoint, then returns this callable for submitit to requeue."""
    import submitit

    self._stop()
    return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

  def _stop(self) -> None:
    """Asks the run to save and exit (SIGTERM; it may have had the scheduler's signal already) and
    waits for it; a run that does not end within the scheduler's kill delay is left to it."""
    proc = self._proc
    if proc is None or proc.poll() is not None:
      return
    if not self._stop_sent:
      self._stop_sent = True
      proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)


def _where() -> str:
  """' (SLURM job 12_3, task 0 of 2)' inside a SLURM job, else ''."""
  job = os.environ.get('SLURM_ARRAY_JOB_ID')
  job = f'{job}_{os.environ["SLURM_ARRAY_TASK_ID"]}' if job else os.environ.get('SLURM_JOB_ID')
  if not job:
    return ''
  tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  task = f', task {os.environ.get("SLURM_PROCID", "0")} of {tasks}' if tasks > 1 else ''
  return f' (SLURM job {job}{task})'
