"""SLURM, against a real cluster (.ci/slurm/start brings up a single-node one; .ci/run does that
first): a failed run's log and SLURM log are shown; bad input is one line before anything is
submitted; and in the slow pass, the 2 x 2 smoke sweep through --launcher=slurm gives the local
launcher's results.md and a second invocation submits nothing, a 2-task srun run through
bigjax-launch equals 1 process x 2 devices, and a job signalled before its time limit saves, is
requeued and ends bitwise equal to an uninterrupted run."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import cluster_sweep
import jax
import numpy as np
import pytest

from bigjax import checkpoint, launch, sweep
from bigjax.cluster import slurm
from bigjax.errors import UserError

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.skipif(
  shutil.which('sbatch') is None, reason='sbatch not on PATH (no SLURM here; see .ci/slurm/start)'
)
MLP = ['--config=configs/mlp_breast_cancer.py:smoke']


@pytest.fixture(scope='module', autouse=True)
def one_device_runs():
  """The runs inherit os.environ (sbatch exports it): 1 CPU device each, not conftest's 8."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XLA_FLAGS', '')
    yield


@pytest.fixture(scope='module')
def slurm_sweep(tmp_path_factory):
  """The smoke sweep through --launcher=slurm (the CLI, in this process): (workdir, stderr)."""
  workdir = str(tmp_path_factory.mktemp('slurm_sweep') / 'out')
  path = cluster_sweep.sweep_file(tmp_path_factory)
  err = io.StringIO()  # the progress bar and the submission line
  with contextlib.redirect_stderr(err):  # returns when every run succeeded (else exits 1)
    sweep.main(['bigjax-sweep', f'--sweep={path}', f'--workdir={workdir}', '--launcher=slurm'])
  return workdir, err.getvalue()


@pytest.mark.slow  # 8 smoke runs: 4 SLURM jobs (65-95 s on 2 busy cores), the local reference (~70 s)
def test_slurm_sweep_gives_the_local_results(slurm_sweep, tmp_path_factory):
  workdir, err = slurm_sweep
  local = cluster_sweep.local_reference(tmp_path_factory)
  assert cluster_sweep.results_md(workdir) == cluster_sweep.results_md(local)
  assert re.search(r'submitted 4 run\(s\) as SLURM job \d+', err)
  assert 'pending=' in err and 'running=' in err  # the scheduler's states in the progress bar
  log = open(os.path.join(workdir, 'runs', 'lr=0.01', 'seed_1', 'log.txt')).read()
  assert re.search(r'==== bigjax.sweep .* \(SLURM job \d+_\d\)', log) and 'final eval' in log
  # One job array (no --jobs: no cap below its size) with a result per run.
  results = [f for f in os.listdir(os.path.join(workdir, 'slurm')) if f.endswith('result.pkl')]
  assert len(results) == 4 and len({f.split('_')[0] for f in results}) == 1
  script = open(os.path.join(workdir, 'slurm', f'{results[0].split("_")[0]}_submission.sh')).read()
  assert '#SBATCH --array=0-3%4' in script and '#SBATCH --signal=USR2@120' in script


@pytest.mark.slow  # needs the SLURM sweep above
def test_second_invocation_submits_nothing(slurm_sweep, tmp_path_factory, monkeypatch):
  workdir, _ = slurm_sweep
  before = sorted(os.listdir(os.path.join(workdir, 'slurm')))

  def no_slurm(*args, **kwargs):
    raise AssertionError(f'the second invocation ran a SLURM command: {args}')

  monkeypatch.setattr(slurm, '_run', no_slurm)
  monkeypatch.setattr(slurm, 'executor', no_slurm)
  path = cluster_sweep.sweep_file(tmp_path_factory)
  runs = sweep.run_sweep(path, workdir, launcher='slurm')
  assert [r.status for r in runs] == ['skipped'] * 4
  assert sorted(os.listdir(os.path.join(workdir, 'slurm'))) == before


@pytest.mark.slow  # slow: moved out of the default run 2026-12-06 (default run under 10 min on 2 cores)
def test_failed_runs_show_their_log_and_slurm_log(tmp_path):
  # A job array of 3 runs that exit 2 at start-up, at most 2 at once (--jobs=2): submission,
  # squeue states, the failures.
  path = tmp_path / 'sweep.py'
  path.write_text(
    'from bigjax import sweep\n\n\ndef get_sweep():\n  return sweep.Sweep(\n'
    "      config='mlp_breast_cancer:smoke',\n"
    "      settings=sweep.axis('batch_size', [8000, 9000, 10000]), metrics=['accuracy'])\n"
  )
  workdir = tmp_path / 'out'
  runs = sweep.run_sweep(str(path), str(workdir), launcher='slurm', jobs=2)
  assert [r.status for r in runs] == ['failed'] * 3
  for run, size in zip(runs, (8000, 9000, 10000)):
    message = run.message
    assert re.match(r'RunFailed: bigjax.train exited with status 2 \(SLURM job \d+_\d\)', message)
    assert f'config.batch_size={size} is larger than the training split' in message  # log.txt
    assert 'last lines of the SLURM log' in message and 'RunFailed' in message  # submitit's log
  (script,) = (workdir / 'slurm').glob('*_submission.sh')
  assert '#SBATCH --array=0-2%2' in script.read_text()  # the cap below the array's size


# ------------------------------------------------------------------------------------------------
# Bad input: one line, nothing submitted.
# ------------------------------------------------------------------------------------------------
def _squeue_ids():
  out = subprocess.run(['squeue', '-h', '--me', '--states=all', '-o', '%i'], capture_output=True)
  return set(out.stdout.decode().split())


@pytest.mark.parametrize(
  'flags, expected',
  [
    (['--partition=nope'], 'no such SLURM partition; the cluster has debug'),
    (['--cpus_per_task=512'], 'SLURM cannot give a job 1 node(s) x 1 task(s), 512 CPU(s) per task'),
    (['--nodes=3'], 'SLURM cannot give a job 3 node(s)'),
    (['--gpus_per_task=1'], 'Invalid generic resource (gres) specification'),
    (['--mem_gb=100000'], 'SLURM cannot give a job'),
    (['--nodes=0'], '--nodes=0 must be at least 1'),
    (['--nodes=2', '--launcher=local'], '--nodes: not a resource --launcher=local can ask for'),
  ],
  ids=['partition', 'cpus', 'nodes', 'gpus', 'memory', 'zero', 'local'],
)
def test_bad_request_is_one_line_before_anything_is_submitted(flags, expected, tmp_path, capsys):
  path = cluster_sweep.SWEEP
  (tmp_path / 'sweep.py').write_text(path)
  workdir = tmp_path / 'out'
  jobs_before = _squeue_ids()
  argv = ['bigjax-sweep', f'--sweep={tmp_path / "sweep.py"}', f'--workdir={workdir}']
  argv += flags if any(f.startswith('--launcher') for f in flags) else ['--launcher=slurm', *flags]
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(argv)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and err.startswith('bigjax: error: ') and '\n' not in err
  assert expected in err
  assert not workdir.exists() and _squeue_ids() <= jobs_before


def test_no_controller_is_one_line(tmp_path, monkeypatch):
  conf = tmp_path / 'slurm.conf'
  text = open(os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf')).read()
  conf.write_text(text + '\nSlurmctldPort=6999\nMessageTimeout=2\n')  # nothing listens there
  monkeypatch.setenv('SLURM_CONF', str(conf))
  (tmp_path / 'sweep.py').write_text(cluster_sweep.SWEEP)
  with pytest.raises(UserError, match=r'--launcher=slurm: no SLURM controller answers \(scontrol'):
    sweep.run_sweep(str(tmp_path / 'sweep.py'), str(tmp_path / 'out'), launcher='slurm')
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
  'flags, expected',
  [
    (['--partition=nope'], 'no such SLURM partition; the cluster has debug'),
    (['--cpus_per_task=512'], 'SLURM cannot give a job 1 node(s) x 1 task(s), 512 CPU(s) per task'),
    (['--tasks_per_node=2', '--nodes=2'], 'SLURM cannot give a job 2 node(s) x 2 task(s)'),
    (['--mem_gb=100000'], 'SLURM cannot give a job'),
  ],
  ids=['partition', 'cpus', 'nodes', 'memory'],
)
def test_bad_launch_request_is_one_line_before_anything_is_submitted(
  flags, expected, tmp_path, capsys
):
  workdir = tmp_path / 'out'
  jobs_before = _squeue_ids()
  with pytest.raises(SystemExit) as exit_info:
    launch.main(
      ['bigjax-launch', *flags, '--', '--config=mlp_breast_cancer:smoke', f'--workdir={workdir}']
    )
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and err.startswith('bigjax: error: ') and '\n' not in err
  assert expected in err
  assert not workdir.exists() and _squeue_ids() <= jobs_before


def test_failed_launch_shows_the_end_of_its_log(tmp_path, capsys):
  # A run that passes bigjax-launch's flag checks and exits 2 in the job (the batch does not fit
  # the data): exit status 1, the job's state changes, then the end of task 0's SLURM log.
  workdir = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_info:
    launch.main(
      [
        'bigjax-launch',
        '--time_min=5',
        '--',
        '--config=mlp_breast_cancer:smoke',
        f'--workdir={workdir}',
        '--config.batch_size=8000',
      ]
    )
  err = capsys.readouterr().err
  assert exit_info.value.code == 1, err
  job_id = re.search(r'submitted SLURM job (\d+) \(1 node\(s\) x 1 task\(s\)\)', err).group(1)
  assert f'SLURM job {job_id}: running' in err
  failed = err[err.index(f'bigjax: SLURM job {job_id} failed') :]
  # As a failed sweep run is shown: the end of the run's log.txt, then of its SLURM log.
  assert failed.startswith(
    f'bigjax: SLURM job {job_id} failed (RunFailed: bigjax.train exited with status 2 (SLURM job '
    f'{job_id}); see its log); last lines of {workdir / "log.txt"}:\n'
  )
  run_log, slurm_log = failed.split(f'last lines of the SLURM log {workdir / "slurm"}/')
  assert run_log.rstrip().endswith(
    '    bigjax: error: config.batch_size=8000 is larger than the training split (455 examples); '
    'lower config.batch_size'
  )
  assert 'RunFailed: bigjax.train exited with status 2' in slurm_log  # submitit's traceback


@pytest.mark.parametrize('command', ['sweep', 'launch'])
def test_workdir_the_nodes_do_not_see_is_one_line(command, tmp_path):
  # bigjax-sweep or bigjax-launch runs in a mount namespace of its own, with a tmpfs over its
  # workdir's parent: the marker file it writes there is invisible to slurmd's jobs, as on a
  # node-local disk.
  private = tmp_path / 'private'
  private.mkdir()
  (tmp_path / 'sweep.py').write_text(cluster_sweep.SWEEP)
  sweep_cmd = {
    'sweep': f'{sys.executable} -m bigjax.sweep --sweep={tmp_path / "sweep.py"} '
    f'--workdir={private / "out"} --launcher=slurm',
    'launch': f'{sys.executable} -m bigjax.launch -- --config=mlp_breast_cancer:smoke '
    f'--workdir={private / "out"}',
  }[command]
  unshare = (
    ['unshare', '--mount'] if os.geteuid() == 0 else ['unshare', '--mount', '--map-root-user']
  )
  jobs_before = _squeue_ids()
  proc = subprocess.run(
    [*unshare, 'sh', '-c', f'mount -t tmpfs tmpfs {private} && exec {sweep_cmd}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  err = proc.stderr.strip()
  assert proc.returncode == 2, err
  assert err.startswith('bigjax: error: ') and '\n' not in err
  assert 'is not on a filesystem the SLURM nodes see' in err
  # Only the check's own tiny job ran (named bigjax-shared-check); no run was submitted.
  names = subprocess.run(
    ['squeue', '-h', '--me', '--states=all', '-o', '%i %j'], capture_output=True, text=True
  ).stdout.splitlines()
  new = [n for n in names if n.split()[0] not in jobs_before]
  assert all(n.endswith('bigjax-shared-check') for n in new), new


# ------------------------------------------------------------------------------------------------
# bigjax-launch: multi-process training, time limits.
# ------------------------------------------------------------------------------------------------
def _launch(resource_flags, train_flags, **popen):
  cmd = [sys.executable, '-m', 'bigjax.launch', *resource_flags, '--', *MLP, *train_flags]
  return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(1), text=True, **popen)


def _train(train_flags, devices, log):
  """bigjax.train here (its output in `log`: a pipe would fill up with the progress bar)."""
  cmd = [sys.executable, '-m', 'bigjax.train', *MLP, *train_flags]
  out = open(log, 'w')
  return subprocess.Popen(
    cmd, cwd=REPO, env=subprocess_env(devices), stdout=out, stderr=subprocess.STDOUT
  )


def _losses(workdir):
  results = json.load(open(os.path.join(workdir, 'results.json')))
  return np.array([h['loss'] for h in results['history'] if h['split'] == 'train'])


def _params(workdir):
  return checkpoint.load_latest(os.path.join(workdir, 'checkpoints'))[1]['params']


@pytest.mark.slow  # a 2-task SLURM job and a local run (70-95 s on 2 busy cores)
def test_two_task_srun_run_equals_one_process_two_devices(tmp_path):
  flags = ['--config.log_every=1', '--config.num_steps=12']
  reference = _train([f'--workdir={tmp_path / "one"}', *flags], 2, tmp_path / 'one.log')
  launch = _launch(
    ['--tasks_per_node=2', '--time_min=10'],
    [f'--workdir={tmp_path / "srun"}', *flags],
    stderr=subprocess.PIPE,
  )
  _, err = launch.communicate(timeout=400)
  assert launch.returncode == 0, err
  assert reference.wait(timeout=400) == 0, (tmp_path / 'one.log').read_text()
  layout = open(tmp_path / 'srun' / 'sharding.txt').readline().strip()
  assert layout == 'mesh: data=2 (across 2 processes), fsdp=1, tensor=1'
  assert len(_losses(tmp_path / 'srun')) == 12
  np.testing.assert_allclose(_losses(tmp_path / 'srun'), _losses(tmp_path / 'one'), rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    _params(tmp_path / 'srun'),
    _params(tmp_path / 'one'),
  )
  job_id = re.search(r'submitted SLURM job (\d+)', err).group(1)
  # Task 0's output goes to the run's log.txt, task 1's to its own SLURM log.
  log = open(tmp_path / 'srun' / 'log.txt').read()
  assert f'(SLURM job {job_id}, task 0 of 2)' in log and 'final eval' in log
  out = open(tmp_path / 'srun' / 'slurm' / f'{job_id}_1_log.out').read()
  assert f'(SLURM job {job_id}, task 1 of 2)' in out


def _wait_for(predicate, timeout, what, proc):
  """predicate()'s first true value, polled while `proc` runs."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    assert proc.poll() is None, f'{proc.args} ended ({proc.returncode}) before {what}'
    time.sleep(0.5)
  raise AssertionError(f'timed out waiting for {what}')


def _job_field(job_id, name):
  out = subprocess.run(['scontrol', 'show', 'job', job_id], capture_output=True, text=True).stdout
  return re.search(rf'\b{name}=(\S+)', out).group(1)


def _steps_lasting(seconds, tmp_path):
  """How many MLP smoke steps take about `seconds` on this machine, from a short run's measured
  step time (it varies 5x between our machines: 0.7 ms on an AVX-512 EPYC, 3-5 ms on others)."""
  probe = _train([f'--workdir={tmp_path / "probe"}', '--config.num_steps=3000'], 1, tmp_path / 'p')
  assert probe.wait(timeout=300) == 0, (tmp_path / 'p').read_text()[-3000:]
  results = json.load(open(tmp_path / 'probe' / 'results.json'))
  return int(seconds / results['throughput']['step_time_s']) // 1000 * 1000


@pytest.mark.slow  # 4-6 min: 200 s of training twice at once, a requeued job waits 10 s (cred_expire)
def test_time_limit_signal_saves_requeues_and_ends_bitwise(tmp_path):
  # The job asks for the warning signal 300 s before its time limit (--signal_s=300). It starts
  # with 30 minutes; once it trains, the test sets the limit so that under 330 s are left, so
  # slurmctld's time-limit check (every 30 s) sends the warning within 60 s, 240-330 s before the
  # limit. After the requeue the limit goes back to 30 minutes, and the run resumes and ends. The
  # run must still be training when the warning comes: it lasts ~200 s at the probe's step time
  # (sized for 100 s, a run ended before the warning on 2026-12-06: the probe had run on a busier
  # machine than the job, which trained faster than the probe said).
  steps = _steps_lasting(200, tmp_path)
  flags = [f'--config.num_steps={steps}', '--config.log_every=100']
  flags.append('--config.checkpoint_every=100000')  # the only save before the end: the signal's
  reference = _train([f'--workdir={tmp_path / "reference"}', *flags], 1, tmp_path / 'ref.log')
  workdir = tmp_path / 'requeued'
  launch = _launch(
    ['--time_min=30', '--signal_s=300'], [f'--workdir={workdir}', *flags], stderr=subprocess.PIPE
  )
  job_id = None
  try:
    job = _wait_for(
      lambda: list((workdir / 'slurm').glob('*_submitted.pkl')), 300, 'the job', launch
    )
    job_id = job[0].name.split('_')[0]
    _wait_for(lambda: (workdir / 'history.jsonl').exists(), 300, 'training to start', launch)
    h, m, sec = (int(x) for x in _job_field(job_id, 'RunTime').split('-')[-1].split(':'))
    limit_min = (h * 3600 + m * 60 + sec + 330) // 60  # leaves 270-330 s
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', f'TimeLimit={limit_min}'], check=True)
    _wait_for(lambda: int(_job_field(job_id, 'Restarts')) >= 1, 150, 'the requeue', launch)
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'TimeLimit=30'], check=True)
    _, err = launch.communicate(timeout=600)
  except BaseException:
    for proc in (launch, reference):
      proc.kill()
    if job_id:
      subprocess.run(['scancel', job_id])
    raise
  assert launch.returncode == 0, err
  assert reference.wait(timeout=600) == 0, (tmp_path / 'ref.log').read_text()[-3000:]
  out = open(workdir / 'slurm' / f'{job_id}_0_log.out').read()
  slurm_log = open(workdir / 'slurm' / f'{job_id}_0_log.err').read()
  assert 'Caught signal SIGUSR2' in out and f'Requeued job {job_id}' in out  # submitit
  assert 'DUE TO TIME LIMIT' not in slurm_log  # signalled before the limit, not killed at it
  log = open(workdir / 'log.txt').read()  # the run's output: two launches of the same command
  assert log.count('==== bigjax-launch ') == 2 and 'resuming at step' in log
  saved = int(re.search(r'SIGUSR2 received: saved step (\d+)', log).group(1))
  results = json.load(open(workdir / 'results.json'))
  assert 0 < saved < steps and results['step'] == steps
  assert results['steps_this_run'] == steps - saved  # resumed, not restarted
  assert results['eval'] == json.load(open(tmp_path / 'reference' / 'results.json'))['eval']
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(tmp_path / 'reference'))
