"""Running a sweep: each run a `python -m bigjax.train` subprocess, a progress bar over the runs,
then the reports."""

from __future__ import annotations

from collections.abc import Sequence
import os
import re
import shlex
import subprocess
import sys
import time

import tqdm

from bigjax.errors import UserError
from bigjax.sweep.plan import Run, Sweep, is_finished, load_sweep, plan, unfinished_reason
from bigjax.sweep.report import load_results, write_reports

LOG_TAIL_LINES = 15


def _log_tail(run, n=LOG_TAIL_LINES):
  try:
    with open(os.path.join(run.workdir, 'log.txt'), errors='replace') as f:
      lines = [
        l.rstrip()
        for l in f.read().replace('\r', '\n').splitlines()
        if l.strip() and not re.search(r'\d%\|', l)
      ]  # not tqdm progress bars
  except OSError:
    return '(no log.txt)'
  return '\n'.join('    ' + l for l in lines[-n:])


class _Launch:
  """One bigjax.train subprocess, its output appended to the run's log.txt.

  The run inherits the sweep's working directory; every path on its command line is absolute."""

  def __init__(self, run):
    os.makedirs(run.workdir, exist_ok=True)
    self.run, self.start = run, time.time()
    cmd = [
      sys.executable,
      '-m',
      'bigjax.train',
      f'--config={run.spec}',
      f'--workdir={os.path.abspath(run.workdir)}',
      *run.args,
    ]
    self.log = open(os.path.join(run.workdir, 'log.txt'), 'a')
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

  def close(self):
    self.log.close()


def _prepare_datasets(runs):
  """Prepares the offline datasets the runs read, here, before launching several runs at once:
  concurrent runs would otherwise all prepare the same dataset into one TFDS dir on first use."""
  from bigjax.data import offline, pipeline

  for name, data_dir, split in sorted(
    {
      (r.config['data']['name'], r.config['data']['data_dir'], r.config['data'][key])
      for r in runs
      for key in ('train_split', 'eval_split')
    },
    key=str,
  ):
    if name in offline.NAMES:
      pipeline.check_available(name, split, data_dir)


def run_sweep(sweep_path: str, workdir: str, jobs: int = 1) -> list[Run]:
  """Runs (or finishes) the sweep in `sweep_path` under `workdir`, `jobs` runs at a time, then
  writes results.csv, results.md and the plots into `workdir`. Returns the list of Run records;
  failed runs have status 'failed' (the others still run). Raises UserError for invalid input before
  anything is launched or written."""
  if jobs < 1:
    raise UserError(f'--jobs={jobs} must be at least 1')
  sw = load_sweep(sweep_path)
  runs = plan(sw, workdir)
  for run in runs:
    if is_finished(run):
      run.status = 'skipped'
      load_results(run, sw)
  pending = [r for r in runs if r.status == 'pending']
  if pending and jobs > 1:
    _prepare_datasets(pending)
  os.makedirs(workdir, exist_ok=True)
  _launch_all(sw, runs, pending, jobs)
  write_reports(sw, runs, workdir, sweep_path)
  return runs


def _launch_all(sw: Sweep, runs: Sequence[Run], pending: list[Run], jobs: int) -> None:
  """Launches `pending`, `jobs` at a time, until all have ended; on any exception (Ctrl-C,
  SIGTERM) SIGTERMs the runs still going (they save a checkpoint and exit) and waits for them."""
  running: list = []
  bar = tqdm.tqdm(
    total=len(runs), initial=len(runs) - len(pending), unit='run', desc='sweep', dynamic_ncols=True
  )
  try:
    while pending or running:
      while pending and len(running) < jobs:
        running.append(_Launch(pending.pop(0)))
      _postfix(bar, runs, len(running), len(pending))
      time.sleep(0.2)
      for launch in [l for l in running if l.proc.poll() is not None]:
        running.remove(launch)
        launch.close()
        _settle(launch, sw)
        bar.update(1)
        bar.write(_describe(launch.run, time.time() - launch.start), file=sys.stderr)
    _postfix(bar, runs, 0, 0)
  finally:
    for launch in running:
      launch.proc.terminate()
    for launch in running:
      try:
        launch.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        launch.proc.kill()
      launch.close()
    bar.close()


def _postfix(bar, runs, running, left):
  postfix = dict(running=running, left=left, failed=sum(r.status == 'failed' for r in runs))
  if postfix != getattr(bar, 'last_postfix', None):  # redraw on changes only (quiet when logged)
    bar.last_postfix = postfix
    bar.set_postfix(postfix)


def _settle(launch, sw):
  run, code = launch.run, launch.proc.returncode
  reason = unfinished_reason(run)
  if code == 0 and reason is None:
    run.status = 'done'
    load_results(run, sw)
  else:
    run.status = 'failed'
    why = f'exit status {code}' if code else f'exited 0 but {reason}'
    run.message = f'{why}; last lines of {os.path.join(run.workdir, "log.txt")}:\n{_log_tail(run)}'


def _describe(run, seconds):
  if run.status == 'failed':
    return f'FAILED {run.name} after {seconds:.1f} s: {run.message}'
  values = ', '.join(f'{k}={v:.4g}' for k, v in run.metrics.items())
  return f'done {run.name} in {seconds:.1f} s: {values}'
