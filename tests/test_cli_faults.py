"""Reliability rows of the README through the command line: the exit status, the one `bigjax:` line
on stderr (exactly, where the README gives it), and what is on disk afterwards.

- SIGINT (Ctrl-C) mid-training: one checkpoint written, exit 143;
- config.init_from with a path holding no checkpoint, a pattern matching nothing, a parameter the
  source lacks, a shape the source does not have: exit 2, one line, no workdir created;
- NaN/Inf under nan_policy='raise': exit 1 with the fix, nothing saved at or after the bad step;
- a workdir holding a run of another task: exit 2, nothing touched;
- a crash while writing config.json / results.json: the old file intact, no temporary left over;
- bigjax-sample on a trained run: the prompt, then at most max_new_tokens bytes, the greedy
  continuation of the model (checked against full forward passes), the same on every call.
"""

import errno
import json
import os
import shutil
import signal
import sys

import flax
import jax
import numpy as np
import pytest

from bigjax import checkpoint, experiment, init_from, reporting, sample, train
from bigjax import steps as steps_lib

from conftest import file_digests, load_config, signal_once_training


def _bigjax_lines(text):
  return [l for l in text.replace('\r', '\n').splitlines() if l.startswith('bigjax')]


def _main(argv, capsys):
  """(exit status, bigjax's lines on stderr) of `bigjax-train argv`, run in this process."""
  try:
    train.main(['bigjax-train', *argv])
    code = 0
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  return code, _bigjax_lines(err)


def _steps(workdir):
  ckpts = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []


CNN_SMOKE = ['--config=mnist_cnn:smoke', '--config.num_steps=2', '--config.checkpoint_every=2']


def _cnn_config(**fields):
  config = load_config('mnist_cnn', 'smoke')
  config.update(dict(num_steps=2, checkpoint_every=2, **fields))
  return config


@pytest.fixture(scope='module')
def cnn_run(tmp_path_factory):
  """A finished 2-step mnist_cnn:smoke run (one device); tests work on copies of it."""
  workdir = tmp_path_factory.mktemp('cnn') / 'run'
  train.train_and_evaluate(_cnn_config(), str(workdir), devices=jax.devices()[:1])
  return workdir


# ----------------------------------------------------------------------------------------------
# SIGINT
# ----------------------------------------------------------------------------------------------
def test_sigint_saves_one_checkpoint_and_exits_143(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [
    sys.executable,
    '-m',
    'bigjax.train',
    '--config=mlp_breast_cancer',
    f'--workdir={workdir}',
    '--config.checkpoint_every=100000',
    '--config.num_epochs=10000',
    '--config.log_every=10',
  ]
  code, err = signal_once_training(cmd, tmp_path, workdir, signal.SIGINT)  # 140,000 steps
  assert code == 143, err
  steps = _steps(workdir)
  assert len(steps) == 1 and 10 <= steps[0] < 140_000, steps
  assert _bigjax_lines(err) == [
    f'bigjax: SIGINT received: saved step {steps[0]} in {workdir / "checkpoints"}; '
    'run the same command again to resume'
  ], err
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  step, state = checkpoint.load_latest(workdir / 'checkpoints')
  assert step == int(state['step']) == steps[0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  assert not (workdir / 'results.json').exists()


# ----------------------------------------------------------------------------------------------
# init_from
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mlm_source(tmp_path_factory):
  """A bert_shakespeare_mlm:smoke workdir with one checkpoint (its initial state, saved as step 1):
  what bert_genre:smoke fine-tunes from."""
  workdir = tmp_path_factory.mktemp('mlm') / 'run'
  config = load_config('bert_shakespeare_mlm', 'smoke')
  exp = experiment.build(config, jax.devices()[:1])
  state = steps_lib.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'))
  ckpt.save(1, state)
  ckpt.close()
  return workdir


def test_init_from_the_pretraining_run_loads_the_encoder(mlm_source, one_device):
  """The control for the faults below: bert_genre's own pattern copies every encoder parameter
  of the source and leaves the new classifier head alone."""
  config = load_config('bert_genre', f'smoke,init={mlm_source}')
  exp = experiment.build(config, one_device)
  chosen = init_from.load_matching(
    exp.abstract.params, config.init_from.checkpoint, config.init_from.load
  )
  _, source = checkpoint.load_latest(mlm_source / 'checkpoints')
  source = flax.traverse_util.flatten_dict(source['params'], sep='/')
  here = flax.traverse_util.flatten_dict(exp.abstract.params, sep='/')
  assert sorted(chosen) == sorted(k for k in here if not k.startswith('classifier/'))
  assert any(k.startswith('classifier/') for k in here)
  for k, v in chosen.items():
    np.testing.assert_array_equal(v, source[k])


INIT_FAULTS = {  # name: (config arg or extra flags, with {src} / {missing}; start of the message)
  'missing path': (
    'init={missing}',
    [],
    "config.init_from.checkpoint='{missing}' holds no checkpoint; give a workdir of a finished "
    'run (or its checkpoints/ directory)',
  ),
  'pattern matching nothing': (
    'init={src}',
    ['--config.init_from.load=^embed/,^nothing/'],
    "config.init_from.load pattern(s) ['^nothing/'] match no parameter; parameters look like ",
  ),
  'parameter the source lacks': (
    'init={src}',
    ['--config.init_from.load=^stack/,^classifier/'],
    "config.init_from: parameter classifier/bias matches '^classifier/' but the checkpoint in "
    '{src} has no such parameter; narrow config.init_from.load',
  ),
  'another shape': (
    'init={src}',
    ['--config.model.kwargs.mlp_dim=128'],
    'config.init_from: parameter stack/layer_0/mlp/wi/bias has shape (128,) here but (64,) in '
    '{src}; the model configs differ',
  ),
}


@pytest.mark.parametrize('fault', list(INIT_FAULTS))
def test_init_from_faults_are_one_line_exit_2_and_create_no_workdir(
  fault, mlm_source, tmp_path, capsys
):
  arg, extra, expected = INIT_FAULTS[fault]
  names = dict(src=mlm_source, missing=tmp_path / 'no_such_run')
  workdir = tmp_path / 'genre'
  code, lines = _main(
    [f'--config=bert_genre:smoke,{arg.format(**names)}', f'--workdir={workdir}', *extra], capsys
  )
  assert code == 2
  assert len(lines) == 1 and lines[0].startswith('bigjax: error: '), lines
  assert lines[0][len('bigjax: error: ') :].startswith(expected.format(**names)), lines[0]
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# NaN through the CLI
# ----------------------------------------------------------------------------------------------
def test_nan_exits_1_with_the_fix_and_saves_nothing_after_it(tmp_path, capsys):
  """Adam with lr=1e30: step 1 (from the initial parameters) is finite and saved, its update puts
  the weights at ~1e30 and step 2's logits overflow."""
  workdir = tmp_path / 'run'
  code, lines = _main(
    [
      '--config=mlp_breast_cancer:smoke',
      f'--workdir={workdir}',
      '--config.optim.lr=1e30',
      '--config.log_every=1',
      '--config.checkpoint_every=1',
    ],
    capsys,
  )
  assert code == 1
  assert lines == [
    'bigjax: loss or gradient norm is NaN/Inf at step 2; last good checkpoint: step 1 in '
    f'{workdir / "checkpoints"}. Lower config.optim.lr, set config.optim.clip_norm, or use '
    'config.nan_policy=skip'
  ], lines
  assert _steps(workdir) == [1]
  _, state = checkpoint.load_latest(workdir / 'checkpoints')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  assert max(np.abs(x).max() for x in jax.tree.leaves(state['params'])) > 1e29  # the huge step
  assert not (workdir / 'results.json').exists()


# ----------------------------------------------------------------------------------------------
# A workdir of another task
# ----------------------------------------------------------------------------------------------
def test_a_workdir_of_another_task_is_refused_and_untouched(cnn_run, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(cnn_run, workdir)
  before = file_digests(workdir)
  code, lines = _main([*CNN_SMOKE, f'--workdir={workdir}', '--config.task.name=regression'], capsys)
  assert code == 2
  assert lines == [
    f'bigjax: error: {workdir} holds a run with a different config.task; use a new --workdir, '
    'or delete that workdir to start over'
  ], lines
  assert file_digests(workdir) == before


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
class _HalfWriter:
  """A file whose write puts half the data on disk, then fails as a full disk does."""

  def __init__(self, f):
    self.f = f

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()

  def write(self, data):
    self.f.write(data[: len(data) // 2])
    self.f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_writing(monkeypatch, target, how):
  """Makes reporting.write_atomic(`target`, ...) crash mid-way: 'write' after half the bytes are
  in the temporary file, 'replace' at the rename. Other files are written as usual."""
  real_write, real_fdopen, real_replace = reporting.write_atomic, os.fdopen, os.replace
  calls = []

  def half_fdopen(fd, *args, **kwargs):
    return _HalfWriter(real_fdopen(fd, *args, **kwargs))

  def failing_replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == target:
      raise OSError(errno.EIO, os.strerror(errno.EIO))
    return real_replace(src, dst, *args, **kwargs)

  def write_atomic(path, data):
    if os.path.basename(path) != target:
      return real_write(path, data)
    calls.append(path)
    with pytest.MonkeyPatch.context() as m:
      if how == 'write':
        m.setattr(os, 'fdopen', half_fdopen)
      else:
        m.setattr(os, 'replace', failing_replace)
      return real_write(path, data)

  monkeypatch.setattr(reporting, 'write_atomic', write_atomic)
  return calls


@pytest.mark.parametrize('how', ['write', 'replace'])
@pytest.mark.parametrize('target', ['config.json', 'results.json'])
def test_a_crash_while_writing_leaves_the_old_file_and_no_partial_one(
  target, how, cnn_run, tmp_path, monkeypatch, one_device
):
  workdir = tmp_path / 'run'
  shutil.copytree(cnn_run, workdir)
  config = _cnn_config()
  if target == 'config.json':
    # config.json is rewritten only while the run has no checkpoint: a run that died before its
    # first one, re-run with another seed.
    shutil.rmtree(workdir / 'checkpoints')
    config.seed = 1
  # else: re-running a finished run redoes the final eval and rewrites results.json.
  old = (workdir / target).read_bytes()
  others = set(os.listdir(workdir))
  calls = _fail_writing(monkeypatch, target, how)
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(config, str(workdir), devices=one_device)
  assert e.value.errno == (errno.ENOSPC if how == 'write' else errno.EIO)
  assert calls == [str(workdir / target)]  # the write was attempted, and crashed
  assert (workdir / target).read_bytes() == old
  json.loads(old)
  left = set(os.listdir(workdir)) - others
  assert not [n for n in os.listdir(workdir) if n.startswith('.tmp')], left
  assert left <= {'checkpoints'}, left


# ----------------------------------------------------------------------------------------------
# bigjax-sample end to end
# ----------------------------------------------------------------------------------------------
def _greedy_by_full_forward(workdir, prompt, n):
  """The greedy continuation of the run's model, one full forward pass per token (no KV cache)."""
  import ml_collections

  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = experiment.tokenizer_for(config)
  data = experiment.data_info(config, tokenizer)
  model = experiment.make_model(config.model, data, experiment.make_task(config.task, data))
  _, state = checkpoint.load_latest(os.path.join(workdir, 'checkpoints'))
  ids = [int(i) for i in tokenizer.encode(prompt)]
  length = len(ids) + n
  # Causal: the tokens after position i do not change its logits, so one compiled forward over a
  # zero-padded window serves every step.
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  new = []
  for _ in range(n):
    window = np.zeros((1, length), np.int32)
    window[0, : len(ids) + len(new)] = ids + new
    logits = forward(state['params'], window)
    new.append(int(np.argmax(logits[0, len(ids) + len(new) - 1])))
  return prompt + tokenizer.decode(np.array(new))


def test_bigjax_sample_end_to_end(tmp_path, capsys, one_device):
  workdir = tmp_path / 'gpt'
  config = load_config('gpt_shakespeare', 'smoke')
  config.num_steps = 10
  train.train_and_evaluate(config, str(workdir), devices=one_device)
  capsys.readouterr()
  argv = [
    'bigjax-sample',
    f'--workdir={workdir}',
    '--prompt=ROMEO.',
    '--max_new_tokens=8',
    '--temperature=0',
  ]
  outs = []
  for _ in range(2):
    sample.main(argv)  # returns on success
    captured = capsys.readouterr()
    assert not _bigjax_lines(captured.err), captured.err
    outs.append(captured.out)
  text = outs[0][:-1]
  assert outs[0].endswith('\n') and outs[0] == outs[1]
  assert text.startswith('ROMEO.') and len(text) > len('ROMEO.')
  assert len(text) - len('ROMEO.') <= 8  # one character at most per generated byte
  assert text == _greedy_by_full_forward(workdir, 'ROMEO.', 8)
