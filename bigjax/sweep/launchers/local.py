"""--launcher=local: each run a `python -m bigjax.train` subprocess on this machine, `jobs` at a
time (default 1), its output appended to the run's log.txt."""

from __future__ import annotations

from collections.abc import Sequence
import os
import shlex
import subprocess
import sys
import time

from bigjax.sweep.launchers import base
from bigjax.sweep.plan import Run


class _Process:
  """One bigjax.train subprocess, its output appended to the run's log.txt.

  The run inherits the sweep's working directory; every path on its command line is absolute."""

  def __init__(self, run: Run):
    os.makedirs(run.workdir, exist_ok=True)
    cmd = [sys.executable, '-m', 'bigjax.train', *base.train_args(run)]
    self.log = open(base.log_path(run), 'a')
    self.log.write(
      f'\n==== bigjax.sweep {time.strftime("%Y-%m-%d %H:%M:%S")}: '
      f'(cd {shlex.quote(os.getcwd())} && {shlex.join(cmd)})\n'
    )
    self.log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED='1')  # a killed run's log keeps its last lines
    # Same process group as the sweep: Ctrl-C (or killing the group) reaches the runs too.
    self.proc = subprocess.Popen(
      cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )

  def close(self) -> None:
    self.log.close()


class Launcher(base.Launcher):
  """Subprocesses here; `jobs` of them at once (the others wait, PENDING)."""

  poll_s = 0.2

  def __init__(self, options: base.Options):
    super().__init__(options)
    self.processes: dict[int, _Process] = {}  # id(job) -> its process, while it runs

  def submit(self, runs: Sequence[Run]) -> list[base.Job]:
    jobs = [base.Job(run) for run in runs]
    self.refresh(jobs)
    return jobs

  def refresh(self, jobs: Sequence[base.Job]) -> None:
    for job in jobs:
      process = self.processes.get(id(job))
      if process is not None and process.proc.poll() is not None:
        del self.processes[id(job)]
        process.close()
        code = process.proc.returncode
        job.mark(base.DONE if code == 0 else base.FAILED, f'exit status {code}')
    for job in jobs:
      if job.state == base.PENDING and len(self.processes) < (self.options.jobs or 1):
        self.processes[id(job)] = _Process(job.run)
        job.mark(base.RUNNING)

  def stop(self, jobs: Sequence[base.Job]) -> None:
    """SIGTERM to the runs still going (they save a checkpoint and exit), then waits for them."""
    running = [self.processes.pop(id(j)) for j in jobs if id(j) in self.processes]
    for process in running:
      process.proc.terminate()
    for process in running:
      try:
        process.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        process.proc.kill()
      process.close()
