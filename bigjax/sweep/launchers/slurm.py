"""--launcher=slurm: every run one SLURM job submitted through submitit, all of a sweep's pending
runs in one job array (at most `jobs` of them running at once; 0: as many as the cluster allows).

Each job runs `bigjax.cluster.train_job.TrainJob`: the run's bigjax.train command on its node(s),
its output appended to the run's log.txt as under the local launcher; submitit's scripts and the
jobs' SLURM logs go to DIR/slurm/. A job asks for a signal `signal_s` before its time limit: the run
saves a checkpoint and the job is requeued (bigjax/cluster/train_job.py). States come from squeue;
a job that ended without a result (cancelled, out of time or memory, node lost) fails with its
SLURM log shown beside the run's log.txt.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys
import time

from bigjax.cluster import slurm
from bigjax.cluster.train_job import TrainJob
from bigjax.sweep.launchers import base
from bigjax.sweep.plan import Run

STOP_WAIT_S = 120.0  # after scancel: the runs save, then KillWait (default 30 s) kills the rest


class Launcher(base.Launcher):
  poll_s = 2.0
  uses = (
    'nodes',
    'tasks_per_node',
    'gpus_per_task',
    'cpus_per_task',
    'mem_gb',
    'time_min',
    'partition',
    'account',
    'qos',
    'signal_s',
    'timeouts',
  )

  def __init__(self, options: base.Options):
    super().__init__(options)
    self.folder = os.path.join(os.path.abspath(options.workdir), 'slurm')
    self.submitted: dict[int, slurm.Outcome] = {}  # id(job) -> its submitit job's outcome

  def check(self, runs: Sequence[Run]) -> None:
    slurm.check(self.options.resources, self.folder)

  def submit(self, runs: Sequence[Run]) -> list[base.Job]:
    resources = self.options.resources
    name = 'bigjax:' + os.path.basename(os.path.abspath(self.options.workdir))
    ex = slurm.executor(self.folder, resources, name, self.options.jobs or len(runs))
    submissions = []
    with ex.batch():  # one job array
      for run in runs:
        os.makedirs(run.workdir, exist_ok=True)
        train = TrainJob(
          base.train_args(run),
          os.getcwd(),
          base.log_path(run),
          slurm.task_env(resources),
          label='bigjax.sweep',
        )
        submissions.append(ex.submit(train))
    jobs = []
    for run, sjob in zip(runs, submissions):
      job = base.Job(run, scheduler_log=str(sjob.paths.stderr))
      self.submitted[id(job)] = slurm.Outcome(sjob)
      jobs.append(job)
    first = submissions[0].job_id.split('_')[0] if submissions else ''
    print(
      f'bigjax: submitted {len(runs)} run(s) as SLURM job {first} '
      f'(scripts and SLURM logs in {self.folder})',
      file=sys.stderr,
    )
    return jobs

  def refresh(self, jobs: Sequence[base.Job]) -> None:
    live = [j for j in jobs if not j.ended]
    if not live:
      return
    states = slurm.states(self.submitted[id(j)].job.job_id for j in live)
    for job in live:
      outcome = self.submitted[id(job)]
      job.mark(*outcome.update(states[outcome.job.job_id]))

  def stop(self, jobs: Sequence[base.Job]) -> None:
    live = [j for j in jobs if not j.ended]
    ids = [self.submitted[id(j)].job.job_id for j in live]
    slurm.cancel(ids)
    deadline = time.time() + STOP_WAIT_S
    while ids and time.time() < deadline:
      if all(s == 'ended' for s in slurm.states(ids).values()):
        return
      time.sleep(self.poll_s)
