"""Faults a long job meets on a shared machine (Reliability v2), each through the CLI: the exit
status, the message's first line, and the files that must still be there, unchanged.

1. a changed optimizer on resume: refused, checkpoints untouched (was: "damaged", restart at 0);
2. two runs on one workdir: the second exits 2 naming the holder; a killed holder blocks nothing;
3. trajectory changes on resume: refused unless --allow_config_change, then recorded;
4. keep_checkpoints=0: refused;
5. damaged history.jsonl / config.json / best.json, a deleted best/: warning or one-line error;
6. values out of range (lr, clip_norm, num_steps, init_from regex, sampler arguments);
7. impossible or `~` workdirs, a full disk, an unpreparable data_dir, file permissions.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from bigjax import checkpoint, sample, train
from bigjax import workdir as workdir_lib

from conftest import REPO, file_digests

pytestmark = (
  pytest.mark.slow
)  # a trained run per test (20-90 s each on 2 cores); CI runs the slow pass

CNN = os.path.join(REPO, 'configs', 'mnist_cnn.py')
BASE = [
  f'--config={CNN}:smoke',
  '--config.num_steps=10',
  '--config.checkpoint_every=5',
  '--config.log_every=5',
]


def _main(argv, capsys):
  """(exit status, stderr lines that are bigjax's) of `bigjax-train argv`, run in this process."""
  try:
    train.main(['bigjax-train', *argv])
    code = 0
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, [l for l in (captured.out + captured.err).splitlines() if l.startswith('bigjax')]


@pytest.fixture
def run10(tmp_path, capsys):
  """A finished 10-step run (checkpoints 5 and 10) and its workdir."""
  workdir = tmp_path / 'run'
  code, lines = _main([*BASE, f'--workdir={workdir}'], capsys)
  assert code == 0, lines
  return workdir


# -- 1 and 3: config changes on resume ---------------------------------------------------------
@pytest.mark.parametrize(
  'change, field',
  [
    ('--config.optim.clip_norm=1.0', 'optim.clip_norm: 0.0 -> 1.0'),
    ('--config.optim.name=sgd', "optim.name: 'adam' -> 'sgd'"),
    ('--config.optim.weight_decay=0.1', 'optim.weight_decay: 0.0 -> 0.1'),
  ],
)
def test_a_changed_optimizer_state_is_refused_and_nothing_moves(run10, change, field, capsys):
  before = file_digests(run10)
  code, lines = _main([*BASE, f'--workdir={run10}', change], capsys)
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith(f'bigjax: error: the config changed since this run started ({field}')
  assert 'does not fit the train state this config builds' in lines[0]
  assert 'checkpoints in' in lines[0] and 'are kept as they are' in lines[0]
  assert file_digests(run10) == before  # checkpoints, history.jsonl, config.json: bitwise unchanged
  assert not os.path.exists(f'{run10}/checkpoints_damaged')
  # ...and even when the user allows trajectory changes, a structural one is still refused.
  code, lines = _main([*BASE, f'--workdir={run10}', change, '--allow_config_change'], capsys)
  assert code == 2 and 'does not fit the train state' in lines[0] and file_digests(run10) == before


def test_a_trajectory_change_is_refused_unless_allowed_and_then_recorded(run10, capsys):
  before = file_digests(run10)
  argv = [*BASE, f'--workdir={run10}', '--config.num_steps=15', '--config.optim.lr=0.01']
  code, lines = _main(argv, capsys)
  assert code == 2 and lines[-1:] == [
    'bigjax: error: the config changed since this run started: optim.lr: 0.001 -> 0.01; resuming '
    'with it changes the run. Undo the change, use a new --workdir, or pass '
    '--allow_config_change to continue with it (recorded in config_changes.jsonl)'
  ]
  assert file_digests(run10) == before
  code, lines = _main([*argv, '--allow_config_change', '--config.log_every=1'], capsys)
  assert code == 0, lines
  with open(run10 / 'config_changes.jsonl') as f:
    changes = [json.loads(l) for l in f]
  assert [(c['step'], c['field'], c['old'], c['new']) for c in changes] == [
    (10, 'log_every', 5, 1),
    (10, 'num_steps', 10, 15),
    (10, 'optim.lr', 0.001, 0.01),
  ]
  with open(run10 / 'config.json') as f:
    assert json.load(f)['optim']['lr'] == 0.001  # the config the run started with stays
  with open(run10 / 'results.json') as f:
    assert json.load(f)['step'] == 15


def test_extending_a_constant_lr_run_and_execution_changes_need_no_flag(run10, capsys):
  code, lines = _main(
    [
      *BASE,
      f'--workdir={run10}',
      '--config.num_steps=20',
      '--config.checkpoint_every=10',
      '--config.mesh.data=2',
      '--config.mesh.fsdp=4',
    ],
    capsys,
  )
  assert code == 0, lines
  assert any('resuming with config changes' in l and 'num_steps: 10 -> 20' in l for l in lines)
  with open(run10 / 'config_changes.jsonl') as f:
    fields = [json.loads(l)['field'] for l in f]
  assert fields == ['checkpoint_every', 'mesh.data', 'mesh.fsdp', 'num_steps']
  assert checkpoint.load_latest(run10 / 'checkpoints')[0] == 20


# -- 2: one writer per workdir -----------------------------------------------------------------
def test_a_second_run_on_a_held_workdir_exits_at_once_naming_the_holder(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lib.Lock(str(workdir)):
    code, lines = _main([*BASE, f'--workdir={workdir}'], capsys)
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith(f'bigjax: error: {workdir} is in use by process {os.getpid()} on ')
  assert sorted(os.listdir(workdir)) == ['.lock']  # nothing else was written


def test_a_killed_holder_leaves_no_lock_that_blocks(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  code = (
    'import os, signal, sys; from bigjax import workdir; '
    f'workdir.Lock({str(workdir)!r}).__enter__(); os.kill(os.getpid(), signal.SIGKILL)'
  )
  proc = subprocess.run([sys.executable, '-c', code], timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert os.path.exists(workdir / '.lock')  # the file stays, the lock went with the process
  code, lines = _main([*BASE, f'--workdir={workdir}'], capsys)
  assert code == 0, lines


# -- 4 and 6: values out of range (before anything is written) ---------------------------------
@pytest.mark.parametrize(
  'extra, expected',
  [
    ('--config.keep_checkpoints=0', 'config.keep_checkpoints=0 must be >= 1'),
    ('--config.optim.lr=-0.001', 'config.optim.lr=-0.001 must be >= 0.0'),
    ('--config.optim.clip_norm=-1', 'config.optim.clip_norm=-1.0 must be >= 0.0'),
    ('--config.num_steps=-5', 'config.num_steps=-5 must be >= 0'),
    ('--config.init_from.load=embed/(', "config.init_from.load pattern 'embed/(' is not a regular"),
  ],
)
def test_out_of_range_values_are_one_line_before_writing(tmp_path, capsys, extra, expected):
  code, lines = _main([*BASE, f'--workdir={tmp_path / "run"}', extra], capsys)
  assert code == 2 and len(lines) == 1 and expected in lines[0], lines
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'extra, expected',
  [
    (['--temperature=-1'], '--temperature=-1.0 must be >= 0'),
    (['--max_new_tokens=-5'], '--max_new_tokens=-5 must be >= 1'),
    (['--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
    (['--top_k=-1'], '--top_k=-1 must be >= 0'),
  ],
)
def test_sampler_arguments_out_of_range(tmp_path, capsys, extra, expected):
  with pytest.raises(SystemExit) as e:
    sample.main(['bigjax-sample', f'--workdir={tmp_path}', *extra])
  assert e.value.code == 2 and expected in capsys.readouterr().err


def test_sampling_a_run_without_checkpoints_is_one_line(tmp_path, capsys):
  from conftest import load_config

  config = load_config('gpt_shakespeare', 'smoke')
  (tmp_path / 'config.json').write_text(config.to_json())
  with pytest.raises(SystemExit) as e:
    sample.main(['bigjax-sample', f'--workdir={tmp_path}', '--max_new_tokens=2'])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err[-1] == (
    f'bigjax: error: {tmp_path} holds no checkpoint yet; train it first (or wait for its first '
    'checkpoint)'
  )


# -- 5: damaged run files ----------------------------------------------------------------------
def test_damaged_history_lines_are_dropped_with_a_warning(run10, capsys, caplog):
  with open(run10 / 'history.jsonl', 'ab') as f:
    f.write(b'\x00\xff\xfe garbage\nnull\n{"step": "x"}\n')
  code, lines = _main([*BASE, f'--workdir={run10}', '--config.num_steps=15'], capsys)
  assert code == 0, lines
  assert '3 unreadable line(s) dropped' in caplog.text
  with open(run10 / 'history.jsonl') as f:
    steps = [json.loads(l)['step'] for l in f]
  assert steps == [5, 10, 10, 15, 15]  # train 5, 10; eval 10; then the resumed run's train/eval


@pytest.mark.parametrize('content', ['', '{"seed": 0, "optim": {"lr"'])
def test_a_damaged_config_json_is_one_line_and_nothing_moves(run10, capsys, content):
  (run10 / 'config.json').write_text(content)
  before = file_digests(run10)
  code, lines = _main([*BASE, f'--workdir={run10}'], capsys)
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith(f'bigjax: error: {run10}/config.json is damaged')
  assert 'restore that file, or delete the workdir to start over' in lines[0]
  assert file_digests(run10) == before


def _early(workdir, steps):
  return [
    *BASE,
    f'--workdir={workdir}',
    f'--config.num_steps={steps}',
    '--config.eval_every=5',
    '--config.early_stopping.metric=accuracy',
    '--config.early_stopping.patience=0',
  ]


@pytest.mark.parametrize('damage', ['truncate best.json', 'delete best/'])
def test_damaged_best_state_never_crashes_the_end_of_a_run(tmp_path, capsys, caplog, damage):
  workdir = tmp_path / 'run'
  assert _main(_early(workdir, 10), capsys)[0] == 0
  with open(workdir / 'best.json') as f:
    best_step = json.load(f)['step']
  if damage == 'truncate best.json':
    (workdir / 'best.json').write_text('{"step": ')
  else:
    import shutil

    shutil.rmtree(workdir / 'best')
  # A run whose accuracy cannot improve any more (lr 0): the damaged best record is not replaced.
  code, lines = _main(
    [*_early(workdir, 15), '--config.optim.lr=0', '--allow_config_change'], capsys
  )
  assert code == 0, lines
  assert 'results carry no best state' in caplog.text and str(best_step) in caplog.text
  with open(workdir / 'results.json') as f:
    assert json.load(f)['best'] is None


# -- 7: the environment ------------------------------------------------------------------------
def test_impossible_and_tilde_workdirs(tmp_path, capsys, monkeypatch):
  (tmp_path / 'afile').write_text('x')
  code, lines = _main([*BASE, f'--workdir={tmp_path}/afile/run'], capsys)
  assert code == 2 and lines == [
    f'bigjax: error: --workdir={tmp_path}/afile/run: {tmp_path}/afile '
    'is a file, not a directory; choose another --workdir'
  ]
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  code, lines = _main([*BASE, '--config.num_steps=2', '--workdir=~/runs/x'], capsys)
  assert code == 0, lines
  assert (tmp_path / 'home' / 'runs' / 'x' / 'results.json').exists()
  assert not (tmp_path / '~').exists()


def test_a_full_disk_names_the_last_good_checkpoint_and_the_rerun_resumes(
  run10, capsys, monkeypatch
):
  real_save = checkpoint.ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 15:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', full_disk)
  argv = [*BASE, f'--workdir={run10}', '--config.num_steps=20']
  code, lines = _main(argv, capsys)
  assert code == 2 and lines[-1].startswith('bigjax: error:')
  assert lines[-1] == (
    f'bigjax: error: no space left on the device of {run10}/checkpoints while '
    'saving step 15; the last good checkpoint (step 10) still restores: free '
    'space (or lower config.keep_checkpoints) and run the same command again'
  )
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', real_save)
  code, lines = _main(argv, capsys)
  assert code == 0 and any('resuming at step 10' in l for l in lines), lines


def test_an_unpreparable_data_dir_is_one_line(tmp_path, capsys):
  (tmp_path / 'afile').write_text('x')
  code, lines = _main(
    [*BASE, f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path}/afile/tfds'],
    capsys,
  )
  assert code == 2 and len(lines) == 1
  assert "dataset 'mnist5k' cannot be prepared in" in lines[0] and 'writable' in lines[0]
  assert not (tmp_path / 'run').exists()


def test_run_files_follow_the_umask(run10):
  mask = os.umask(0)
  os.umask(mask)
  for name in ('config.json', 'results.json', 'sharding.txt'):
    assert os.stat(run10 / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_the_lock_is_per_process_0_and_released_after_the_run(run10):
  assert jax.process_index() == 0
  with workdir_lib.Lock(str(run10)):  # the finished run released it
    pass
