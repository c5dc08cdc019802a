"""SLURM seen from the submitting host, through its own commands (no scheduler of our own).

- `check(resources, shared_dir)`: one-line UserErrors before anything is submitted: no controller
  answers (`scontrol ping`), an unknown partition (`sinfo`), a request the cluster cannot give
  (`sbatch --test-only` with the runs' own options), a directory the nodes do not see (a marker
  file written here and read back inside a tiny job, by the Python the jobs will run).
- `executor(...)`: the submitit executor for a run's jobs (array jobs with a concurrency cap).
- `states(job_ids)`: each job's scheduler state, from `squeue` (the test cluster keeps no
  accounting, so no `sacct`), as 'pending' / 'running' / 'ended'; `Outcome` turns that and
  submitit's result file into pending / running / done / failed.
"""

from __future__ import annotations

from collections.abc import Iterable
import os
import pickle
import re
import shutil
import subprocess
import sys
from typing import Any
import uuid

from bigjax.cluster.resources import Resources
from bigjax.errors import UserError

# squeue's job states -> ours. Requeued and suspended jobs wait again: 'pending'. Any other
# state (COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...) has ended.
PENDING_STATES = {'PENDING', 'CONFIGURING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'SUSPENDED'}
RUNNING_STATES = {'RUNNING', 'COMPLETING', 'SIGNALING', 'STAGE_OUT', 'RESIZING'}
# An ended job without a result file is failed only after squeue has said so for this long: a job
# passes through states squeue may show as ended while it is being requeued.
SETTLE_S = 10.0
SHARED_CHECK_WAIT_S = 60  # how long the shared-filesystem check waits for a node (srun --immediate)


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return subprocess.CompletedProcess(cmd, 1, '', f'{cmd[0]} did not answer in {timeout:g} s')


def _first_line(proc: subprocess.CompletedProcess) -> str:
  lines = [l.strip() for l in (proc.stderr + '\n' + proc.stdout).splitlines() if l.strip()]
  return lines[-1] if lines else f'exit status {proc.returncode}'


def option_flags(options: dict) -> list[str]:
  """sbatch/srun command-line flags for `options` ({long option: value}, Resources.slurm_options)."""
  return [f'--{k}={v}' for k, v in options.items()]


def check_reachable() -> None:
  """UserError unless the SLURM commands are installed and a controller answers."""
  missing = [c for c in ('sbatch', 'squeue', 'scontrol', 'sinfo', 'srun') if not shutil.which(c)]
  if missing:
    raise UserError(
      f'--launcher=slurm: {", ".join(missing)} not found on PATH; run on a SLURM login node '
      '(or use --launcher=local)'
    )
  ping = _run(['scontrol', 'ping'], timeout=20)
  if ping.returncode or ' is UP' not in ping.stdout:
    raise UserError(
      f'--launcher=slurm: no SLURM controller answers (scontrol ping: {_first_line(ping)}); '
      'check that slurmctld runs and SLURM_CONF points at its slurm.conf'
    )


def partitions() -> list[str]:
  """The cluster's partition names (sinfo)."""
  out = _run(['sinfo', '--noheader', '--format=%R'])
  return sorted({l.strip() for l in out.stdout.splitlines() if l.strip()})


def check_request(resources: Resources) -> None:
  """UserError unless the cluster knows the partition and could give one job of these resources
  (`sbatch --test-only`: the controller answers without queueing anything)."""
  if resources.partition and resources.partition not in (known := partitions()):
    raise UserError(
      f'--partition={resources.partition}: no such SLURM partition; the cluster has '
      f'{", ".join(known) or "none"}'
    )
  test = _run(
    ['sbatch', '--test-only', *option_flags(resources.slurm_options()), '--wrap=true'], timeout=60
  )
  if test.returncode:
    raise UserError(
      f'SLURM cannot give a job {_describe(resources)} ({_first_line(test)}); ask for less '
      '(--nodes, --tasks_per_node, --gpus_per_task, --cpus_per_task, --mem_gb, --time_min) or '
      'choose another --partition'
    )


def _describe(r: Resources) -> str:
  parts = [f'{r.nodes} node(s) x {r.tasks_per_node} task(s), {r.cpus_per_task} CPU(s)']
  if r.gpus_per_task:
    parts.append(f'{r.gpus_per_task} GPU(s)')
  parts[-1] += ' per task'
  if r.mem_gb:
    parts.append(f'{r.mem_gb:g} GB per node')
  parts.append(f'{r.time_min} min')
  if r.partition:
    parts.append(f'partition {r.partition}')
  return ', '.join(parts)


def check_shared(directory: str, resources: Resources) -> None:
  """UserError unless a job on the cluster can read a marker file written here in `directory` (a
  folder of the workdir, which the message names), with the Python the jobs will run
  (`sys.executable`). A cluster with no node free within SHARED_CHECK_WAIT_S seconds leaves the
  check undone, with a warning."""
  os.makedirs(directory, exist_ok=True)
  token = uuid.uuid4().hex
  marker = os.path.join(directory, f'.shared_check_{token}')
  with open(marker, 'w') as f:
    f.write(token)
  where = {
    k: v for k, v in resources.slurm_options().items() if k in ('partition', 'account', 'qos')
  }
  try:
    job = _run(
      [
        'srun',
        '--nodes=1',
        '--ntasks=1',
        '--cpus-per-task=1',
        '--mem=512M',
        '--time=1',
        '--job-name=bigjax-shared-check',
        f'--immediate={SHARED_CHECK_WAIT_S}',
        '--quiet',
        *option_flags(where),
        sys.executable,
        '-c',
        'import socket, sys; print(socket.gethostname(), open(sys.argv[1]).read())',
        marker,
      ],
      timeout=SHARED_CHECK_WAIT_S + 60,
    )
  finally:
    os.remove(marker)
  words = job.stdout.split()
  if job.returncode == 0 and len(words) == 2 and words[1] == token:
    return
  if 'Unable to allocate resources' in job.stderr or 'allocate' in _first_line(job).lower():
    print(
      f'bigjax: warning: could not check that {directory} is shared with the nodes (no node free '
      f'within {SHARED_CHECK_WAIT_S} s: {_first_line(job)}); submitting anyway',
      file=sys.stderr,
    )
    return
  if 'No such file or directory' in job.stderr and marker in job.stderr:
    raise UserError(
      f'--workdir={os.path.dirname(directory)} is not on a filesystem the SLURM nodes see (a job '
      f'could not read the marker file written in {directory}); use a directory on the shared '
      'filesystem (home, project or scratch)'
    )
  raise UserError(
    f'--launcher=slurm: a test job could not run {sys.executable} on the nodes '
    f'({_first_line(job)}); install bigjax where the nodes see it (a shared virtual environment)'
  )


def check(resources: Resources, shared_dir: str) -> None:
  """All the checks above, in order (cheapest first)."""
  check_reachable()
  check_request(resources)
  check_shared(shared_dir, resources)


def _submitit():
  """submitit, imported on the submitting side without its logging set-up: importing it runs
  `logging.config.dictConfig`, which closes every logging handler the process already has (a
  notebook's, absl's, pytest's). The jobs import it afresh and log as usual."""
  if 'submitit' not in sys.modules:
    previous = os.environ.get('SUBMITIT_LOG_LEVEL')
    os.environ['SUBMITIT_LOG_LEVEL'] = 'NOCONFIG'
    try:
      import submitit  # noqa: F401
    finally:
      if previous is None:
        del os.environ['SUBMITIT_LOG_LEVEL']
      else:
        os.environ['SUBMITIT_LOG_LEVEL'] = previous
  return sys.modules['submitit']


def executor(folder: str, resources: Resources, job_name: str, array_parallelism: int):
  """A submitit SlurmExecutor writing its scripts and logs into `folder` (on the shared
  filesystem), asking for `resources` per job and running at most `array_parallelism` jobs of an
  array at once."""
  submitit = _submitit()
  ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.timeouts)
  ex.update_parameters(
    **{k.replace('-', '_'): v for k, v in resources.slurm_options().items()},
    job_name=job_name,
    signal_delay_s=resources.signal_s,
    array_parallelism=array_parallelism,
  )
  return ex


def task_env(resources: Resources) -> dict[str, str]:
  """Environment a job's tasks add. With GPUs and several tasks, JAX_LOCAL_DEVICE_IDS: SLURM binds
  each task to its own `gpus_per_task` GPUs (numbered from 0 in the task), while jax's SLURM
  detection would pick the one GPU numbered SLURM_LOCALID (jax-ml/jax#16788, #23452)."""
  if resources.gpus_per_task and resources.num_tasks > 1:
    return {'JAX_LOCAL_DEVICE_IDS': ','.join(map(str, range(resources.gpus_per_task)))}
  return {}


def states(job_ids: Iterable[str]) -> dict[str, str]:
  """{job id: 'pending' | 'running' | 'ended'} for `job_ids` ('12' or array tasks '12_3'); a job
  squeue no longer lists (it ended more than MinJobAge ago) is 'ended'."""
  out = _run(['squeue', '--noheader', '--array', '--states=all', '--me', '--format=%i|%T'])
  if out.returncode:
    raise RuntimeError(f'squeue failed: {_first_line(out)}')
  known = dict(l.split('|', 1) for l in out.stdout.split() if '|' in l)
  result = {}
  for job_id in job_ids:
    state = known.get(job_id, '').split()[0] if known.get(job_id) else ''
    result[job_id] = (
      'pending' if state in PENDING_STATES else 'running' if state in RUNNING_STATES else 'ended'
    )
  return result


def cancel(job_ids: Iterable[str]) -> None:
  """scancel: SIGTERM to every process of the jobs (the runs save and exit), SIGKILL after the
  cluster's KillWait."""
  ids = list(job_ids)
  if ids:
    _run(['scancel', *ids])


class Outcome:
  """Follows one submitit SlurmJob: `update(state)` takes its squeue state ('pending' / 'running' /
  'ended') and returns ('pending' | 'running' | 'done' | 'failed', why). An ended job is done or
  failed by task 0's submitit result file (('success', value) or ('error', traceback)); one that
  ended without it (cancelled, out of time or memory, node lost) fails once squeue has said 'ended'
  for SETTLE_S seconds."""

  def __init__(self, job: Any):
    self.job = job
    self._ended_at: float | None = None

  def update(self, state: str) -> tuple[str, str]:
    import time

    if state != 'ended':
      self._ended_at = None
      return state, ''
    try:
      with open(self.job.paths.result_pickle, 'rb') as f:
        kind, value = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError):
      kind = value = None
    if kind == 'success':
      return 'done', ''
    if kind is not None:
      lines = [l for l in str(value).strip().splitlines() if l.strip()]  # a traceback
      last = re.sub(r'^[\w.]+\.(\w+: )', r'\1', lines[-1]) if lines else 'the job raised'
      return 'failed', last  # 'RunFailed: bigjax.train exited with status 2 (SLURM job 12_3); ...'
    if self._ended_at is None:
      self._ended_at = time.time()
    if time.time() - self._ended_at > SETTLE_S:
      return 'failed', (
        f'SLURM job {self.job.job_id} ended without a result (cancelled, out of time or memory, '
        'or its node failed)'
      )
    return 'running', ''
