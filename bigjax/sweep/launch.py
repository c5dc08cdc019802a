"""Running a sweep: plan, skip finished runs, hand the others to a launcher (local subprocesses,
SLURM jobs or Ray tasks: bigjax/sweep/launchers/), a progress bar over the scheduler's states,
then the reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import sys
import time
from typing import Any

import tqdm

from bigjax.cluster import resources as resources_lib
from bigjax.errors import UserError
from bigjax.sweep.launchers import LAUNCHERS, base
from bigjax.sweep.plan import Run, Sweep, load_sweep, plan, unfinished_reason
from bigjax.sweep.report import load_results, write_reports


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


def run_sweep(
  sweep_path: str,
  workdir: str,
  jobs: int | None = None,
  launcher: str = 'local',
  resources: Mapping[str, Any] | None = None,
  ray_address: str = '',
) -> list[Run]:
  """Runs (or finishes) the sweep in `sweep_path` under `workdir` with `launcher` ('local',
  'slurm', 'ray'), then writes results.csv, results.md and the plots into `workdir`. Returns the
  list of Run records; failed runs have status 'failed' (the others still run).

  jobs: runs at a time (None: 1 locally, as many as the scheduler allows elsewhere; for SLURM the
  job array's concurrency cap). resources: {field: value} of bigjax.cluster.resources.Resources
  given on the command line, over the sweep file's `resources`. ray_address: the Ray cluster
  (default $RAY_ADDRESS, else a local one). Raises UserError for invalid input before anything is
  launched or written (for SLURM and Ray also: no scheduler reachable, an unknown partition,
  resources the cluster cannot give, a workdir the nodes do not see)."""
  if jobs is not None and jobs < 1:
    raise UserError(f'--jobs={jobs} must be at least 1')
  launcher_cls = LAUNCHERS.get(launcher)
  given = dict(resources or {})
  unused = [f'--{f}' for f in given if f not in launcher_cls.uses]
  if unused:
    raise UserError(
      f'{", ".join(unused)}: not a resource --launcher={launcher} can ask for; it takes '
      f'{", ".join("--" + f for f in launcher_cls.uses) or "none"}'
    )
  sw = load_sweep(sweep_path)
  request = resources_lib.resolve(sw.resources, resources_lib.check(given, '--'))
  runs = plan(sw, workdir)
  for run in runs:
    if unfinished_reason(run) is None:
      run.status = 'skipped'
      load_results(run, sw)
  pending = [r for r in runs if r.status == 'pending']
  launch = launcher_cls(base.Options(jobs or 0, request, workdir, list(given), ray_address))
  if pending:
    launch.check(pending)
    if launcher != 'local' or (jobs or 1) > 1:
      _prepare_datasets(pending)
  os.makedirs(workdir, exist_ok=True)
  _launch_all(sw, runs, pending, launch)
  write_reports(sw, runs, workdir, sweep_path)
  return runs


def _launch_all(sw: Sweep, runs: Sequence[Run], pending: list[Run], launch: base.Launcher) -> None:
  """Submits `pending` and follows them until all have ended; on any exception (Ctrl-C, SIGTERM)
  stops the runs still going (they save a checkpoint and exit) and waits for them."""
  bar = tqdm.tqdm(
    total=len(runs), initial=len(runs) - len(pending), unit='run', desc='sweep', dynamic_ncols=True
  )
  jobs: list[base.Job] = []
  try:
    jobs = launch.submit(pending) if pending else []
    live = list(jobs)
    while live:
      _postfix(bar, runs, live)
      time.sleep(launch.poll_s)
      launch.refresh(live)
      for job in [j for j in live if j.ended]:
        live.remove(job)
        _settle(job, sw)
        bar.update(1)
        bar.write(_describe(job), file=sys.stderr)
    _postfix(bar, runs, [])
  finally:
    left = [j for j in jobs if not j.ended]
    if left:
      launch.stop(left)
    bar.close()


def _postfix(bar, runs, live):
  postfix = dict(
    pending=sum(j.state == base.PENDING for j in live),
    running=sum(j.state == base.RUNNING for j in live),
    failed=sum(r.status == 'failed' for r in runs),
  )
  if postfix != getattr(bar, 'last_postfix', None):  # redraw on changes only (quiet when logged)
    bar.last_postfix = postfix
    bar.set_postfix(postfix)


def _settle(job: base.Job, sw: Sweep) -> None:
  run = job.run
  reason = unfinished_reason(run)
  if job.state == base.DONE and reason is None:
    run.status = 'done'
    load_results(run, sw)
    return
  run.status = 'failed'
  why = job.why if job.state == base.FAILED else f'exited 0 but {reason}'
  log = base.log_path(run)
  run.message = f'{why}; last lines of {log}:\n{base.log_tail(log)}'
  if job.scheduler_log and os.path.exists(job.scheduler_log):
    run.message += f'\n  last lines of the SLURM log {job.scheduler_log}:\n'
    run.message += base.log_tail(job.scheduler_log, 6)


def _describe(job: base.Job) -> str:
  run, seconds = job.run, time.time() - (job.started or job.submitted)
  if run.status == 'failed':
    return f'FAILED {run.name} after {seconds:.1f} s: {run.message}'
  values = ', '.join(f'{k}={v:.4g}' for k, v in run.metrics.items())
  return f'done {run.name} in {seconds:.1f} s: {values}'
