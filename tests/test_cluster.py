"""bigjax.cluster without a cluster: resources checked and mapped to sbatch / Ray options, the
time-limit signal handled like SIGTERM, SLURM's multi-task environment detected, the job body
pickled for a requeue without its live process."""

import os
import pickle
import re
import signal

import pytest

from bigjax import mesh, preemption
from bigjax.cluster import resources
from bigjax.cluster.train_job import TrainJob
from bigjax.errors import UserError


def test_resources_map_to_sbatch_and_ray_options():
  r = resources.resolve(
    {'gpus_per_task': 1, 'time_min': 30, 'partition': 'gpu'},
    {'tasks_per_node': 4, 'mem_gb': 1.5, 'time_min': 240},  # flags win over the sweep file
  )
  assert r.num_tasks == 4
  assert r.slurm_options() == {
    'nodes': 1,
    'ntasks-per-node': 4,
    'cpus-per-task': 1,
    'time': 240,
    'gpus-per-task': 1,
    'mem': '1536M',
    'partition': 'gpu',
  }
  assert r.ray_options() == {'num_cpus': 1, 'num_gpus': 1, 'memory': int(1.5 * 2**30)}


@pytest.mark.parametrize(
  'values, expected',
  [
    ({'gpus': 1}, 'Sweep.resources: gpus: no such resource; the resources are nodes,'),
    ({'nodes': 0}, 'Sweep.resources: nodes=0 must be at least 1'),
    ({'time_min': '1h'}, "Sweep.resources: time_min='1h' must be a int (e.g. 60)"),
    ({'mem_gb': True}, 'Sweep.resources: mem_gb=True must be a float'),
    ({'signal_s': -1}, 'Sweep.resources: signal_s=-1 must be at least 0'),
  ],
)
def test_bad_resources_are_one_line(values, expected):
  with pytest.raises(UserError, match=re.escape(expected)):
    resources.resolve(values, {})


def test_time_limit_signal_stops_training_like_sigterm():
  assert signal.SIGUSR2 in preemption.stop_signals()
  with preemption.Preemption(log_every=1) as p:
    os.kill(os.getpid(), signal.SIGUSR2)
    assert p.stop_requested(1) == 'SIGUSR2'
  assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # restored


def test_slurm_multi_task_step_is_detected(monkeypatch):
  step = dict(
    SLURM_JOB_ID='12', SLURM_STEP_NODELIST='node[1-2]', SLURM_PROCID='1', SLURM_LOCALID='0'
  )
  for k, v in step.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert mesh.in_slurm_step_of_several_tasks()
  monkeypatch.setenv('SLURM_NTASKS', '1')  # a one-task step: no distributed initialisation
  assert not mesh.in_slurm_step_of_several_tasks()
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.delenv('SLURM_STEP_NODELIST')  # the batch script, outside srun
  assert not mesh.in_slurm_step_of_several_tasks()


def test_train_job_pickles_without_its_process():
  job = TrainJob(['--config=mnist_cnn', '--workdir=/x'], '/tmp', '/x/log.txt', {'A': '1'}, 'l')
  job._proc = object()  # a live subprocess.Popen cannot be pickled
  again = pickle.loads(pickle.dumps(job))
  assert again._proc is None and again.command()[-2:] == ['--config=mnist_cnn', '--workdir=/x']
  assert (again.cwd, again.log_path, again.env, again.label) == (
    '/tmp',
    '/x/log.txt',
    {'A': '1'},
    'l',
  )
