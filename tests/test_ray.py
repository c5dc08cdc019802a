"""--launcher=ray on a Ray cluster started on this machine by `ray.init()`: the 2 x 2 smoke sweep
gives the local launcher's results.md and a second invocation starts nothing; a failed run is shown
with its exit status and the end of its log; an unreachable address, a request no node can give and
a multi-host request are one line before anything runs."""

import os
import re
import socket

import cluster_sweep
import pytest

from bigjax import sweep
from bigjax.errors import UserError

ray = pytest.importorskip(
  'ray', reason='ray is not installed (pip install -r requirements-dev.txt)'
)


def _closed_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# First in the file: before the module's cluster is initialised in this process.
def test_unreachable_cluster_is_one_line(tmp_path):
  (tmp_path / 'sweep.py').write_text(cluster_sweep.SWEEP)
  address = f'127.0.0.1:{_closed_port()}'
  with pytest.raises(UserError, match=f'--ray_address={address}: no Ray cluster answers there'):
    sweep.run_sweep(
      str(tmp_path / 'sweep.py'), str(tmp_path / 'out'), launcher='ray', ray_address=address
    )
  assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def ray_cluster():
  """A 2-CPU Ray cluster on this machine; its workers start with 1 CPU device (XLA_FLAGS='')."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XLA_FLAGS', '')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
      yield
    finally:
      ray.shutdown()


@pytest.mark.slow  # a Ray cluster and 8 smoke runs: ~135 s on 2 busy cores (~70 s the local reference)
def test_ray_sweep_gives_the_local_results_and_reruns_nothing(
  ray_cluster, tmp_path_factory, monkeypatch
):
  local = cluster_sweep.local_reference(tmp_path_factory)
  path = cluster_sweep.sweep_file(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp('ray_sweep') / 'out')
  monkeypatch.setenv('XLA_FLAGS', '')
  runs = sweep.run_sweep(path, workdir, launcher='ray')
  assert [r.status for r in runs] == ['done'] * 4, [r.message for r in runs]
  assert cluster_sweep.results_md(workdir) == cluster_sweep.results_md(local)
  log = open(os.path.join(workdir, 'runs', 'lr=0.001', 'seed_0', 'log.txt')).read()
  assert log.count('==== bigjax.sweep') == 1 and 'final eval' in log

  def no_task(*args, **kwargs):
    raise AssertionError('the second invocation started a Ray task')

  monkeypatch.setattr(ray, 'remote', no_task)
  assert [r.status for r in sweep.run_sweep(path, workdir, launcher='ray')] == ['skipped'] * 4


@pytest.mark.slow  # the Ray cluster (~10 s to start) and one run that fails at start-up
def test_failed_run_shows_its_exit_status_and_log(ray_cluster, tmp_path, monkeypatch):
  path = tmp_path / 'sweep.py'
  path.write_text(
    'from bigjax import sweep\n\n\ndef get_sweep():\n  return sweep.Sweep(\n'
    "      config='mlp_breast_cancer:smoke', settings=sweep.axis('batch_size', [8000]),\n"
    "      metrics=['accuracy'])\n"
  )
  monkeypatch.setenv('XLA_FLAGS', '')
  runs = sweep.run_sweep(str(path), str(tmp_path / 'out'), launcher='ray')
  assert [r.status for r in runs] == ['failed']
  log = os.path.join(runs[0].workdir, 'log.txt')
  # As under the local launcher: why, then the end of the run's log.txt.
  assert runs[0].message.startswith(
    f'bigjax.train exited with status 2; see its log; last lines of {log}:\n'
  ), runs[0].message
  assert (
    runs[0]
    .message.rstrip()
    .endswith(
      '    bigjax: error: config.batch_size=8000 is larger than the training split (455 examples); '
      'lower config.batch_size'
    )
  )


@pytest.mark.slow  # starts the Ray cluster (~10 s)
@pytest.mark.parametrize(
  'resources, expected',
  [
    ({'gpus_per_task': 1}, 'no node of the Ray cluster can run a task with'),
    ({'cpus_per_task': 64}, '--cpus_per_task=64 --gpus_per_task=0 (largest node: CPU=2, GPU=0)'),
  ],
  ids=['gpus', 'cpus'],
)
def test_request_no_node_can_give_is_one_line(ray_cluster, resources, expected, tmp_path):
  (tmp_path / 'sweep.py').write_text(cluster_sweep.SWEEP)
  with pytest.raises(UserError, match=re.escape(expected)):
    sweep.run_sweep(
      str(tmp_path / 'sweep.py'), str(tmp_path / 'out'), launcher='ray', resources=resources
    )
  assert not (tmp_path / 'out' / 'runs').exists()


@pytest.mark.parametrize(
  'resources, expected',
  [
    ({'nodes': 2}, '--nodes: not a resource --launcher=ray can ask for'),
    ({'partition': 'gpu'}, '--partition: not a resource --launcher=ray'),
  ],
  ids=['nodes', 'partition'],
)
def test_request_ray_cannot_express_is_one_line(resources, expected, tmp_path):
  (tmp_path / 'sweep.py').write_text(cluster_sweep.SWEEP)
  with pytest.raises(UserError, match=re.escape(expected)):
    sweep.run_sweep(
      str(tmp_path / 'sweep.py'), str(tmp_path / 'out'), launcher='ray', resources=resources
    )
  assert not (tmp_path / 'out').exists()
