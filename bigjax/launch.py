"""bigjax-launch: one (multi-host) training run as a SLURM job.

  bigjax-launch --launcher=slurm --nodes=N --tasks_per_node=M [--gpus_per_task=G --time_min=T
      --partition=P ...] -- --config=NAME --workdir=DIR [--config.FIELD=VALUE ...]

Everything after `--` is bigjax-train's command line, checked here before anything is submitted.
submitit submits one job of N x M tasks; `srun` starts one bigjax.train process per task, and
`jax.distributed.initialize()` reads SLURM's variables (coordinator, number of processes, process
id) with no config.distributed flags. Each process reads its own rows of every batch; process 0
writes DIR, which must be on a filesystem every node sees (checked with a marker file read inside
a tiny job). The job asks for a signal `--signal_s` seconds before its time limit: the run saves a
checkpoint and the job is requeued (up to --timeouts times), continuing bitwise. Task 0's output is
appended to DIR/log.txt (as a sweep run's is to its log.txt), the other tasks' to their SLURM logs;
the SLURM scripts and one SLURM log per task are in DIR/slurm/.

The command waits for the job and exits with 0 when it completed, 1 when it failed (with the end of
DIR/log.txt and of task 0's SLURM log, as a failed sweep run is shown); Ctrl-C (or SIGTERM) cancels
the job (the run saves first). --nowait returns once the job is submitted.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import signal
import sys
import time

from bigjax import cli, registry
from bigjax import workdir as workdir_lib
from bigjax.cluster import resources as resources_lib
from bigjax.cluster import slurm
from bigjax.cluster.train_job import TrainJob
from bigjax.errors import UserError
from bigjax.sweep.launchers.base import LOG_NAME, log_tail

LAUNCHERS = registry.Registry('launchers', '--launcher')


@LAUNCHERS.register('slurm')
def launch_slurm(train_args: Sequence[str], workdir: str, r: resources_lib.Resources, wait: bool):
  """Submits bigjax.train `train_args` as one SLURM job of r.nodes x r.tasks_per_node tasks, its
  scripts and SLURM logs in `workdir`/slurm, task 0's output in `workdir`/log.txt; with `wait`,
  follows it and returns its exit status."""
  folder = os.path.join(workdir, 'slurm')
  slurm.check(r, folder)
  ex = slurm.executor(folder, r, f'bigjax-train:{os.path.basename(workdir)}', 1)
  log = os.path.join(workdir, LOG_NAME)
  job = ex.submit(TrainJob(train_args, os.getcwd(), log, slurm.task_env(r), 'bigjax-launch'))
  logs = os.path.join(folder, f'{job.job_id}_<task>_log.out|.err')
  print(
    f'bigjax: submitted SLURM job {job.job_id} ({r.nodes} node(s) x {r.tasks_per_node} task(s)); '
    f'output: {log}; SLURM logs: {logs}',
    file=sys.stderr,
  )
  if not wait:
    return 0
  return _follow(job, log)


def _follow(job, log: str) -> int:
  """Prints the job's state changes until it ends, then for a failed job the end of `log` (task 0's
  output) and of its SLURM log; cancels the job on Ctrl-C / SIGTERM."""
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  outcome, shown = slurm.Outcome(job), ''
  try:
    while True:
      state, why = outcome.update(slurm.states([job.job_id])[job.job_id])
      if state != shown:
        print(f'bigjax: SLURM job {job.job_id}: {state}', file=sys.stderr)
        shown = state
      if state in ('done', 'failed'):
        break
      time.sleep(2)
  except BaseException:
    slurm.cancel([job.job_id])
    print(f'bigjax: cancelled SLURM job {job.job_id} (the run saves first)', file=sys.stderr)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  if state == 'done':
    return 0
  print(
    f'bigjax: SLURM job {job.job_id} failed ({why}); last lines of {log}:\n{log_tail(log)}\n'
    f'  last lines of the SLURM log {job.paths.stderr}:\n{log_tail(str(job.paths.stderr), 6)}',
    file=sys.stderr,
  )
  return 1


def _main(argv: Sequence[str]) -> int:
  argv = list(argv)
  if '--' not in argv and not {'--help', '-h', '--helpfull'} & set(argv):
    raise UserError(
      'bigjax-launch needs `--` and then bigjax-train flags, e.g. bigjax-launch --nodes=2 -- '
      '--config=mnist_cnn --workdir=DIR'
    )
  split = argv.index('--') if '--' in argv else len(argv)
  own, train_args = argv[:split], argv[split + 1 :]
  p = cli.Parser('bigjax-launch', __doc__)
  p.string('launcher', 'slurm', 'the scheduler: slurm')
  p.boolean('wait', True, 'follow the job until it ends (--nowait: return once submitted)')
  resources_lib.add_flags(p)
  fv = p.parse(own)
  launch = LAUNCHERS.get(fv.launcher)
  from bigjax import train

  _, workdir = train.parse_flags(['bigjax-train', *train_args])  # UserError for bad train flags
  workdir = workdir_lib.resolve(workdir or '')
  absolute = [*train_args, f'--workdir={workdir}']  # the last --workdir wins
  r = resources_lib.resolve({}, resources_lib.given_flags(fv))
  return launch(absolute, workdir, r, fv.wait)


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: bad flags, no reachable scheduler, unknown partition, resources the cluster cannot
  give or a workdir the nodes do not see: one line, exit 2; else the job's outcome (0 / 1)."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
