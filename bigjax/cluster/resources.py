"""What one run asks a cluster for: nodes, tasks, GPUs, CPUs, memory, time, partition, account, QOS.

A sweep file may declare them (`Sweep(resources={'gpus_per_task': 1, 'time_min': 240})`) and the
command line overrides them (`--gpus_per_task=1 --time_min=240`); the defaults are here, in
`Resources`, only. `slurm_options()` is the one mapping to sbatch options (used for the real jobs
and for `sbatch --test-only`), `ray_options()` the one to a Ray task's resources.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from bigjax import cli
from bigjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Resources:
  """One run's request. mem_gb=0 and empty partition/account/qos: the cluster's defaults.

  signal_s: SLURM signals a job this many seconds before its time limit (`--signal=USR2@s`); the
  run saves a checkpoint and the job is requeued, at most `timeouts` times (preemptions by the
  scheduler do not count)."""

  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_task: int = 0
  cpus_per_task: int = 1
  mem_gb: float = 0.0
  time_min: int = 60
  partition: str = ''
  account: str = ''
  qos: str = ''
  signal_s: int = 120
  timeouts: int = 3

  @property
  def num_tasks(self) -> int:
    return self.nodes * self.tasks_per_node

  def slurm_options(self) -> dict[str, Any]:
    """sbatch long options (without '--') -> values: the request of every job of a run."""
    options: dict[str, Any] = {
      'nodes': self.nodes,
      'ntasks-per-node': self.tasks_per_node,
      'cpus-per-task': self.cpus_per_task,
      'time': self.time_min,
    }
    if self.gpus_per_task:
      options['gpus-per-task'] = self.gpus_per_task
    if self.mem_gb:
      options['mem'] = f'{max(1, round(self.mem_gb * 1024))}M'
    options.update({k: v for k in ('partition', 'account', 'qos') if (v := getattr(self, k))})
    return options

  def ray_options(self) -> dict[str, Any]:
    """Keyword arguments of `ray.remote(...).options(...)` for one run's task."""
    options: dict[str, Any] = {'num_cpus': self.cpus_per_task, 'num_gpus': self.gpus_per_task}
    if self.mem_gb:
      options['memory'] = int(self.mem_gb * 2**30)
    return options


DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Resources)}
# Fields that must be at least 1 (the others at least 0).
POSITIVE = ('nodes', 'tasks_per_node', 'cpus_per_task', 'time_min')
HELP = {
  'nodes': 'nodes per run',
  'tasks_per_node': 'processes per node (one jax process each)',
  'gpus_per_task': 'GPUs per process',
  'cpus_per_task': 'CPUs per process',
  'mem_gb': 'memory per node in GB (0: the partition default)',
  'time_min': 'time limit of each job in minutes',
  'partition': 'SLURM partition (empty: the cluster default)',
  'account': 'SLURM account to charge',
  'qos': 'SLURM quality of service',
  'signal_s': 'seconds before the time limit at which the run saves and the job is requeued',
  'timeouts': 'how often a run that reaches its time limit is requeued',
}


def check(values: Mapping[str, Any], where: str) -> dict[str, Any]:
  """`values` ({field: value}) checked against Resources' fields and types -> a plain dict;
  UserError naming `where` ('Sweep.resources', '--') and the field otherwise."""
  out = {}
  for name, value in values.items():
    if name not in DEFAULTS:
      raise UserError(f'{where}{name}: no such resource; the resources are {", ".join(DEFAULTS)}')
    default = DEFAULTS[name]
    kind: Any = type(default)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
      raise UserError(f'{where}{name}={value!r} must be a {kind.__name__} (e.g. {default!r})')
    if kind is not str and value < (1 if name in POSITIVE else 0):
      raise UserError(f'{where}{name}={value!r} must be at least {1 if name in POSITIVE else 0}')
    out[name] = kind(value)
  return out


def add_flags(parser: cli.Parser, declared_in: str = '') -> None:
  """Adds one flag per resource, unset by default (`given_flags` returns the ones given), so that
  `declared_in` (e.g. "the sweep file's resources") or the Resources default applies."""
  define: dict[type, Any] = {int: parser.integer, float: parser.float, str: parser.string}
  for name, default in DEFAULTS.items():
    where = f'{declared_in}, else ' if declared_in else ''
    define[type(default)](name, None, f'{HELP[name]} (default: {where}{default!r})')


def given_flags(fv: Any) -> dict[str, Any]:
  """The resource flags given on the command line, checked: {field: value}."""
  return check({n: getattr(fv, n) for n in DEFAULTS if getattr(fv, n) is not None}, '--')


def resolve(declared: Mapping[str, Any], flags: Mapping[str, Any]) -> Resources:
  """Resources from a sweep file's `declared` values with the command line's `flags` on top."""
  return Resources(**{**check(declared, 'Sweep.resources: '), **flags})
