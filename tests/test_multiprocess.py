"""Two processes x 4 CPU devices (gloo collectives, coordinator on 127.0.0.1) equal 1 process x 8,
on a flat mesh and on a hybrid one (config.mesh.dcn_fsdp=2: fsdp split across the processes).

Every process is a subprocess with a timeout, so a peer that never arrives fails the test instead
of hanging it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigjax import checkpoint

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow  # two-process runs, 90-350 s each on 2 cores; CI runs the slow pass

BASE = [
  '--config=configs/mlp_breast_cancer.py:smoke',
  '--config.mesh.data=2',
  '--config.mesh.fsdp=2',
  '--config.mesh.tensor=2',
  '--config.log_every=1',
]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, extra, num_processes, devices):
  """Starts the processes of one run; returns the Popen list."""
  cmd = [sys.executable, '-m', 'bigjax.train', f'--workdir={workdir}', *BASE, *extra]
  if num_processes == 1:
    return [
      subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    ]
  port = _free_port()
  return [
    subprocess.Popen(
      cmd
      + [
        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
        f'--config.distributed.num_processes={num_processes}',
        f'--config.distributed.process_id={i}',
        '--config.distributed.timeout_s=60',
      ],
      cwd=REPO,
      env=subprocess_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]


def _wait(procs, timeout=240):
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs], [err for _, err in outputs]


def _train_losses(workdir):
  results = json.load(open(os.path.join(workdir, 'results.json')))
  return np.array([h['loss'] for h in results['history'] if h['split'] == 'train'])


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
  """The 1 process x 8 devices reference run (mesh data=2, fsdp=2, tensor=2)."""
  workdir = tmp_path_factory.mktemp('one')
  codes, errs = _wait(_start(workdir, [], 1, 8))
  assert codes == [0], errs
  assert open(workdir / 'sharding.txt').readline().strip() == 'mesh: data=2, fsdp=2, tensor=2'
  return workdir


# flat: config.mesh as in the reference (data spans the processes, device order); hybrid:
# dcn_fsdp=2 lays the same 2 x 2 x 2 mesh out with each process holding one fsdp column (so each
# process's batch shards are not contiguous) -- same losses either way.
@pytest.mark.parametrize(
  'extra, layout',
  [
    ([], 'mesh: data=2 (across 2 processes), fsdp=2, tensor=2'),
    (
      ['--config.mesh.fsdp=1', '--config.mesh.dcn_fsdp=2'],
      'mesh: data=2, fsdp=2 (across 2 processes), tensor=2',
    ),
  ],
  ids=['flat', 'hybrid'],
)
def test_two_processes_equal_one_process(tmp_path, one_process_run, extra, layout):
  codes, errs = _wait(_start(tmp_path / 'two', extra, 2, 4))
  assert codes == [0, 0], errs
  assert open(tmp_path / 'two' / 'sharding.txt').readline().strip() == layout
  np.testing.assert_allclose(
    _train_losses(tmp_path / 'two'), _train_losses(one_process_run), rtol=1e-5
  )
  _, a = checkpoint.load_latest(one_process_run / 'checkpoints')
  _, b = checkpoint.load_latest(tmp_path / 'two' / 'checkpoints')
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a['params'], b['params']
  )


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  procs = _start(
    tmp_path,
    ['--config.num_epochs=2000', '--config.checkpoint_every=100000', '--config.log_every=5'],
    2,
    4,
  )
  deadline = time.time() + 120
  while not (tmp_path / 'tensorboard').exists() and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(3)
  procs[1].send_signal(signal.SIGTERM)
  codes, errs = _wait(procs)
  assert codes == [143, 143], errs
  assert 'preemption of a peer process' in errs[0] and 'SIGTERM received' in errs[1]
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and saved[0] % 5 == 0


def test_a_lost_peer_ends_the_survivor_with_one_line_naming_it(tmp_path):
  """A peer that stops without closing its connections (a lost or frozen node: SIGSTOP here) used to
  hang the survivors until XLA's heartbeat abort (~100 s, a C++ trace); now process 0 exits within
  the configured peer timeout (3 s here; XLA's abort is set to 36 s) with one line naming the lost
  process and the last saved step."""
  procs = _start(
    tmp_path,
    [
      '--config.num_epochs=2000',
      '--config.checkpoint_every=20',
      '--config.log_every=5',
      '--config.distributed.peer_timeout_s=3',
    ],
    2,
    4,
  )
  deadline = time.time() + 120
  while not (tmp_path / 'checkpoints' / '20').exists() and time.time() < deadline:
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGSTOP)
  lost = time.time()
  try:
    procs[0].wait(timeout=60)
  finally:
    procs[1].kill()
  waited = time.time() - lost
  codes, errs = _wait(procs, timeout=60)
  assert codes == [3, -signal.SIGKILL], errs
  # (the progress bar shares stderr: split on its carriage returns too)
  lines = [l for l in errs[0].replace('\r', '\n').splitlines() if l.startswith('bigjax:')]
  assert lines[-1].startswith(
    'bigjax: process 1 of 2 stopped responding (no sign of life for 3 s); last saved step: '
  )
  assert lines[-1].endswith('Restart every process with the same command to resume from it')
  assert waited < 20, waited  # 3 s after its last sign of life (it may predate the SIGSTOP)
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved and f'last saved step: {saved[-1]} in ' in lines[-1]
