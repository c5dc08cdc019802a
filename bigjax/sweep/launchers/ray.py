"""--launcher=ray: every run one Ray task on the cluster at --ray_address (or $RAY_ADDRESS; neither:
a cluster on this machine started by `ray.init()`), with the run's CPUs, GPUs and memory as the
task's resources; at most `jobs` at once (0: as many as the cluster fits).

The task runs `bigjax.cluster.train_job.TrainJob`, the run's bigjax.train command, its output
appended to the run's log.txt (so the workdir must be on a filesystem every Ray node sees; checked
with a marker file read by a task on each node). A run counts as running once its task has written
its header line to log.txt. The driver's PYTHONPATH and JAX_*, XLA_*, TFDS_*, BIGJAX_*, WANDB_*
variables are passed to the runs (a remote cluster's workers do not share the driver's
environment). Ray is imported only when this launcher is used.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import socket
from typing import Any
import uuid

from bigjax.cluster.train_job import TrainJob
from bigjax.errors import UserError
from bigjax.sweep.launchers import base
from bigjax.sweep.plan import Run

FORWARDED_PREFIXES = ('JAX_', 'XLA_', 'TFDS_', 'BIGJAX_', 'WANDB_')
CONNECT_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 120.0
STOP_WAIT_S = 90.0


def _ray():
  try:
    import ray
  except ImportError:
    raise UserError('--launcher=ray needs the ray package: pip install ray') from None
  return ray


def forwarded_env() -> dict[str, str]:
  return {
    k: v for k, v in os.environ.items() if k == 'PYTHONPATH' or k.startswith(FORWARDED_PREFIXES)
  }


def _run_train_job(job: TrainJob) -> int:
  return job()


def _read_marker(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError as e:
    return f'cannot read it ({e.strerror})'


class Launcher(base.Launcher):
  poll_s = 0.5
  uses = ('gpus_per_task', 'cpus_per_task', 'mem_gb')

  def __init__(self, options: base.Options):
    super().__init__(options)
    self.queued: list[base.Job] = []
    self.refs: dict[int, Any] = {}  # id(job) -> its task's ObjectRef
    self.log_sizes: dict[int, int] = {}  # id(job) -> log.txt's size when its task was submitted

  # -- checks ----------------------------------------------------------------------------------
  def check(self, runs: Sequence[Run]) -> None:
    r = self.options.resources
    if r.num_tasks > 1:
      raise UserError(
        f'--launcher=ray runs each run as one task (asked: --nodes={r.nodes} '
        f'--tasks_per_node={r.tasks_per_node}); multi-host runs need --launcher=slurm'
      )
    ray = _ray()
    self._connect(ray)
    self._check_fits(ray)
    self._check_shared(ray)

  def _connect(self, ray) -> None:
    if ray.is_initialized():
      return
    address = self.options.ray_address or os.environ.get('RAY_ADDRESS', '')
    host, _, port = address.rpartition(':')
    if address and address != 'auto' and not address.startswith('ray://') and port.isdigit():
      try:  # ray.init retries an unreachable address for minutes
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
      except OSError as e:
        raise UserError(
          f'--ray_address={address}: no Ray cluster answers there ({e.strerror or e}); start one '
          '(ray start --head) or give the head node address'
        ) from None
    try:
      ray.init(address=address or None, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
      raise UserError(
        f'--ray_address={address}: cannot connect to a Ray cluster ({" ".join(str(e).split())})'
      ) from None

  def _check_fits(self, ray) -> None:
    need = self.options.resources.ray_options()
    wanted = {'CPU': need['num_cpus'], 'GPU': need['num_gpus'], 'memory': need.get('memory', 0)}
    nodes = [n['Resources'] for n in ray.nodes() if n.get('Alive')]
    if not any(all(n.get(k, 0) >= v for k, v in wanted.items()) for n in nodes):
      largest = ', '.join(
        f'{k}={max((n.get(k, 0) for n in nodes), default=0):g}' for k in ('CPU', 'GPU')
      )
      raise UserError(
        f'no node of the Ray cluster can run a task with --cpus_per_task='
        f'{wanted["CPU"]} --gpus_per_task={wanted["GPU"]}'
        + (f' --mem_gb={self.options.resources.mem_gb:g}' if wanted['memory'] else '')
        + f' (largest node: {largest}); ask for less'
      )

  def _check_shared(self, ray) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory = os.path.abspath(self.options.workdir)
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex
    marker = os.path.join(directory, f'.shared_check_{token}')
    with open(marker, 'w') as f:
      f.write(token)
    read = ray.remote(num_cpus=0)(_read_marker)
    try:
      nodes = [n for n in ray.nodes() if n.get('Alive')]
      refs = [
        read.options(
          scheduling_strategy=NodeAffinitySchedulingStrategy(n['NodeID'], soft=False)
        ).remote(marker)
        for n in nodes
      ]
      seen = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    finally:
      os.remove(marker)
    for node, text in zip(nodes, seen):
      if text != token:
        raise UserError(
          f'--workdir: {directory} is not on a filesystem every Ray node sees (node '
          f'{node.get("NodeManagerAddress")}: the marker file written there: {text}); use a '
          'directory on the shared filesystem'
        )

  # -- runs ------------------------------------------------------------------------------------
  def submit(self, runs: Sequence[Run]) -> list[base.Job]:
    jobs = [base.Job(run) for run in runs]
    self.queued = list(jobs)
    self.refresh(jobs)
    return jobs

  def _start(self, job: base.Job) -> None:
    ray = _ray()
    run = job.run
    os.makedirs(run.workdir, exist_ok=True)
    log = base.log_path(run)
    self.log_sizes[id(job)] = os.path.getsize(log) if os.path.exists(log) else 0
    train = TrainJob(base.train_args(run), os.getcwd(), log, forwarded_env(), 'bigjax.sweep')
    task = ray.remote(_run_train_job).options(
      **self.options.resources.ray_options(), max_retries=0, name=run.name
    )
    self.refs[id(job)] = task.remote(train)

  def refresh(self, jobs: Sequence[base.Job]) -> None:
    ray = _ray()
    cap = self.options.jobs or len(jobs)
    while self.queued and len(self.refs) < cap:
      self._start(self.queued.pop(0))
    for job in jobs:
      ref = self.refs.get(id(job))
      if ref is None:
        continue
      ready, _ = ray.wait([ref], timeout=0)
      if ready:
        del self.refs[id(job)]
        try:
          ray.get(ref)
          job.mark(base.DONE)
        except Exception as e:  # noqa: BLE001  (RayTaskError wrapping the run's failure)
          job.mark(base.FAILED, str(getattr(e, 'cause', None) or e).strip().splitlines()[-1])
      elif job.state == base.PENDING and _size(base.log_path(job.run)) > self.log_sizes[id(job)]:
        job.mark(base.RUNNING)

  def stop(self, jobs: Sequence[base.Job]) -> None:
    """ray.cancel: KeyboardInterrupt in each task, which stops its run (SIGTERM: it saves)."""
    ray = _ray()
    self.queued = []
    refs = list(self.refs.values())
    for ref in refs:
      ray.cancel(ref)
    if refs:
      ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S)
    self.refs = {}


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0
