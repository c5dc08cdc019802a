"""Resumed runs end where uninterrupted ones do with the step's randomness switched on.

The README: "the data order, dropout and augmentation are functions of the step, so the resumed run
ends with the same parameters as an uninterrupted one (tested bitwise)". The SIGKILL tests of
tests/test_train.py run without dropout, augmentation or MLM masking; these run with them:

- the randomness of a train step is a function of (seed, step): the same step gives the same bits,
  another step other bits (and without dropout/augmentation the step number changes nothing);
- mnist_cnn with dropout 0.3 and random crops + flips, stopped mid-epoch and resumed: bitwise;
- bert_shakespeare_mlm (dropout, per-step MLM masking, warmup + linear decay), SIGKILLed twice and
  re-run: bitwise;
- mnist_cnn with batch norm (model_state restored on resume): bitwise;
- stopped on one device and resumed on a (data=2, fsdp=2, tensor=2) mesh: the resumed state is
  sharded, and the run ends where the one-device run does (float summation order differs).

"Stopped" in-process: Preemption.stop_requested answers 'SIGTERM' after step K, so the loop saves
step K and raises Preempted exactly as on a real SIGTERM (tests/test_reliability.py sends one).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigjax import checkpoint, experiment, preemption, steps, train
from bigjax.errors import Preempted

from conftest import REPO, kill_after_checkpoint, load_config

STOP = 7  # mid-epoch (62 steps per epoch), and not a checkpoint_every (10) step


def _mnist_features():
  """mnist_cnn:smoke (20 steps, checkpoints every 10) with dropout and augmentation on."""
  config = load_config('mnist_cnn', 'smoke')
  config.model.kwargs.dropout = 0.3
  config.augment.update(enabled=True, crop_padding=2, flip=True)
  config.log_every = 1
  return config


def _stop_after(monkeypatch, step):
  """The run stops as on SIGTERM once `step` is done (that step is saved, Preempted raised)."""
  monkeypatch.setattr(
    preemption.Preemption, 'stop_requested', lambda self, s: 'SIGTERM' if s == step else False
  )


def _stopped_run(config, workdir, devices, step=STOP):
  with pytest.MonkeyPatch.context() as m:
    _stop_after(m, step)
    with pytest.raises(Preempted, match=f'SIGTERM received: saved step {step} in '):
      train.train_and_evaluate(config, str(workdir), devices=devices)
  assert _saved_steps(workdir) == [step]


def _saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def _train_losses(results):
  return [(h['step'], h['loss']) for h in results['history'] if h['split'] == 'train']


def _assert_bitwise(workdir_a, workdir_b, final):
  step_a, a = checkpoint.load_latest(os.path.join(workdir_a, 'checkpoints'))
  step_b, b = checkpoint.load_latest(os.path.join(workdir_b, 'checkpoints'))
  assert step_a == step_b == final
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, model_state, opt_state, step
  return a


@pytest.fixture(scope='module')
def mnist_runs(tmp_path_factory):
  """(root, results of the uninterrupted run): root/full ran 20 steps on one device; root/stopped
  stopped after step STOP (its only checkpoint)."""
  root = tmp_path_factory.mktemp('mnist_features')
  device = jax.devices()[:1]
  full = train.train_and_evaluate(_mnist_features(), str(root / 'full'), devices=device)
  assert full['step'] == 20 and full['devices'] == 1
  _stopped_run(_mnist_features(), root / 'stopped', device)
  return root, full


# ----------------------------------------------------------------------------------------------
# The step's randomness
# ----------------------------------------------------------------------------------------------
def _bert_smoke():
  config = load_config('bert_shakespeare_mlm', 'smoke')
  assert config.model.kwargs.dropout == 0.1 and config.task.kwargs.mask_rate == 0.15
  return config


def _without_randomness(config):
  if config.model.name == 'bert':
    config.model.kwargs.dropout = 0.0
    config.task.kwargs.mask_rate = 0.0
  else:
    config.model.kwargs.dropout = 0.0
    config.augment.enabled = False
  return config


@pytest.mark.slow  # 2 builds + 2 compiles + 2 inits, 10-15 s each
@pytest.mark.parametrize('name', ['mnist_cnn', 'bert_shakespeare_mlm'])
def test_train_step_randomness_is_a_function_of_the_step(name, one_device):
  """One batch, one state, the step counter set to 0, 0 again and 5: with dropout and augmentation
  (or MLM masking) the loss and gradient norm (and the new parameters) are bitwise equal for the
  same step and differ for another; with them off, the step counter changes nothing. (The
  optimizer's own count stays 0, so BERT's warmup gives lr 0 and its parameters do not move.)"""

  def outcomes(config):
    exp = experiment.build(config, one_device)
    train_step = exp.compile_train_step()
    batch = exp.batches.batch(3)
    init = jax.device_get(
      steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
    )
    out = []
    for step in (0, 0, 5):
      state = jax.device_put(init.replace(step=np.int32(step)), exp.shardings)
      new, metrics = train_step(state, exp.to_global(batch))  # donates `state`
      metrics = jax.device_get(metrics)
      out.append(
        ((float(metrics['loss']), float(metrics['grad_norm'])), jax.device_get(new.params))
      )
    return out

  config = _mnist_features() if name == 'mnist_cnn' else _bert_smoke()
  (m0, p0), (m0b, p0b), (m5, _) = outcomes(config)
  assert m0 == m0b and np.isfinite(m0).all()
  jax.tree.map(np.testing.assert_array_equal, p0, p0b)
  assert m0[0] != m5[0] and m0[1] != m5[1], (m0, m5)

  (n0, q0), _, (n5, q5) = outcomes(_without_randomness(config))
  assert n0 == n5 and n0 != m0
  jax.tree.map(np.testing.assert_array_equal, q0, q5)


@pytest.mark.slow  # rebalanced 2026-12-02: >60 s on the loaded 2-core machine; CI runs the slow pass
# ----------------------------------------------------------------------------------------------
# Stopped and resumed, one device: bitwise
# ----------------------------------------------------------------------------------------------
def test_dropout_and_augmentation_resume_bitwise(mnist_runs, tmp_path):
  root, full = mnist_runs
  workdir = tmp_path / 'resumed'
  shutil.copytree(root / 'stopped', workdir)
  resumed = train.train_and_evaluate(_mnist_features(), str(workdir), devices=jax.devices()[:1])
  assert resumed['step'] == 20 and resumed['steps_this_run'] == 20 - STOP
  assert not (workdir / 'config_changes.jsonl').exists()  # the same config, nothing changed
  _assert_bitwise(root / 'full', workdir, 20)
  assert _train_losses(resumed) == _train_losses(full)  # every step's loss, bit for bit
  assert resumed['eval'] == full['eval']


@pytest.mark.slow  # 3 runs, 10-15 s
def test_batch_norm_state_resumes_bitwise(tmp_path, one_device):
  """mnist_cnn with batch norm: model_state (running mean/var) is saved and restored too."""

  def config():
    c = load_config('mnist_cnn', 'smoke')
    c.model.kwargs.batch_norm = True
    c.log_every = 1
    return c

  full = train.train_and_evaluate(config(), str(tmp_path / 'full'), devices=one_device)
  _stopped_run(config(), tmp_path / 'stopped', one_device)
  resumed = train.train_and_evaluate(config(), str(tmp_path / 'stopped'), devices=one_device)
  assert resumed['steps_this_run'] == 20 - STOP
  state = _assert_bitwise(tmp_path / 'full', tmp_path / 'stopped', 20)
  stats = jax.tree.leaves(state['model_state'])
  assert stats and 'batch_stats' in state['model_state']
  means = [
    x for p, x in jax.tree_util.tree_leaves_with_path(state['model_state']) if 'mean' in str(p)
  ]
  assert means and all(np.abs(m).max() > 0 for m in means)  # statistics moved from their init
  assert _train_losses(resumed) == _train_losses(full)


# ----------------------------------------------------------------------------------------------
# BERT MLM (dropout + per-step masking, warmup + linear decay): SIGKILL and re-run
# ----------------------------------------------------------------------------------------------
BERT_STEPS, BERT_EVERY, BERT_KILLS = 200, 20, (40, 120)


def _cli(workdir, overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  cmd = [
    sys.executable,
    '-m',
    'bigjax.train',
    '--config=bert_shakespeare_mlm:smoke',
    f'--workdir={workdir}',
    '--config.log_every=10',
    *overrides,
  ]
  return cmd, env


@pytest.mark.slow  # 3 subprocesses, 60-75 s
def test_bert_mlm_killed_and_rerun_ends_bitwise_equal(tmp_path):
  """Two SIGKILLs (after checkpoints 40 and 120 of 200), the same command re-run each time: the
  final train state is bitwise the uninterrupted run's."""
  overrides = [f'--config.num_steps={BERT_STEPS}', f'--config.checkpoint_every={BERT_EVERY}']
  cmd, env = _cli(tmp_path / 'full', overrides)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=400)

  cmd, env = _cli(tmp_path / 'killed', overrides)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  for step in BERT_KILLS:
    kill_after_checkpoint(cmd, env, ckpts, step)
    saved = _saved_steps(tmp_path / 'killed')
    assert step in saved and max(saved) < BERT_STEPS, f'not killed mid-way: {saved}'
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=400)

  _assert_bitwise(tmp_path / 'full', tmp_path / 'killed', BERT_STEPS)
  with open(tmp_path / 'killed' / 'results.json') as f:
    results = json.load(f)
  assert results['steps_this_run'] <= BERT_STEPS - BERT_KILLS[-1]
  with open(tmp_path / 'full' / 'results.json') as f:
    assert json.load(f)['eval'] == results['eval']


# ----------------------------------------------------------------------------------------------
# Stopped on one device, resumed on 8
# ----------------------------------------------------------------------------------------------
def _param_bytes(sharding_txt):
  last = sharding_txt.read_text().splitlines()[-1]
  assert last.startswith('parameters: '), last
  return int(last.split()[1].replace(',', ''))


@pytest.mark.slow  # rebalanced 2026-12-02: >60 s on the loaded 2-core machine; CI runs the slow pass
def test_resume_onto_a_sharded_mesh(mnist_runs, tmp_path):
  root, full = mnist_runs
  workdir = tmp_path / 'mesh'
  shutil.copytree(root / 'stopped', workdir)
  config = _mnist_features()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  resumed = train.train_and_evaluate(config, str(workdir))  # all 8 devices
  assert resumed['devices'] == 8 and resumed['steps_this_run'] == 20 - STOP

  # The mesh change is an execution change: accepted without a flag and recorded.
  with open(workdir / 'config_changes.jsonl') as f:
    changes = {c['field']: (c['old'], c['new']) for c in map(json.loads, f)}
  assert changes['mesh.data'] == (-1, 2) and changes['mesh.fsdp'] == (1, 2)
  assert changes['mesh.tensor'] == (1, 2)
  assert set(changes) <= {f'mesh.{a}' for a in ('data', 'fsdp', 'tensor')}

  # The resumed state is laid out over the mesh: parameters split over fsdp/tensor.
  lines = (workdir / 'sharding.txt').read_text().splitlines()
  assert lines[0].startswith('mesh: ') and all(
    f'{a}=2' in lines[0] for a in ('data', 'fsdp', 'tensor')
  ), lines[0]
  split = [l for l in lines[1:-1] if 'fsdp' in l or 'tensor' in l]
  assert len(split) >= 4, lines  # every conv and dense kernel of the CNN
  assert _param_bytes(workdir / 'sharding.txt') < _param_bytes(root / 'full' / 'sharding.txt') / 2

  # The steps before STOP are the one-device run's own (bitwise); the rest agree to float order.
  ref, got = dict(_train_losses(full)), dict(_train_losses(resumed))
  assert sorted(got) == sorted(ref) == list(range(1, 21))
  assert [got[s] for s in range(1, STOP + 1)] == [ref[s] for s in range(1, STOP + 1)]
  np.testing.assert_allclose(
    [got[s] for s in range(STOP + 1, 21)], [ref[s] for s in range(STOP + 1, 21)], rtol=2e-5
  )
  _, a = checkpoint.load_latest(root / 'full' / 'checkpoints')
  step, b = checkpoint.load_latest(workdir / 'checkpoints')
  assert step == 20 and int(b['step']) == 20
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a['params'], b['params']
  )
  np.testing.assert_allclose(resumed['eval']['accuracy'], full['eval']['accuracy'], atol=2e-3)
