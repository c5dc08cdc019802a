"""End to end: the shipped configs train, reach their accuracy bars, and shard and resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigjax import checkpoint, train

from conftest import REPO, load_config


def _losses(results):
  return np.array([h['loss'] for h in results['history'] if h['split'] == 'train'])


def test_mnist_cnn_smoke_loss_falls(tmp_path, one_device):
  config = load_config('mnist_cnn', 'smoke')
  config.log_every = 2
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  losses = _losses(results)
  assert results['step'] == 20 and len(losses) == 10
  assert losses[-1] < 0.6 * losses[0]  # 2.3 -> ~1.0 in 20 steps
  saved = json.load(open(tmp_path / 'results.json'))
  assert saved['eval']['accuracy'] == results['eval']['accuracy'] > 0.5
  assert os.listdir(tmp_path / 'tensorboard')


def test_mlp_breast_cancer_reaches_95_percent(tmp_path, one_device):
  results = train.train_and_evaluate(
    load_config('mlp_breast_cancer'), str(tmp_path), devices=one_device
  )
  report = results['eval']
  assert report['accuracy'] >= 0.95
  assert report['roc_auc'] >= 0.98 and report['f1'] >= 0.95
  assert np.sum(report['confusion_matrix']) == 114


@pytest.mark.slow  # 3 full trainings (~55 s); CI runs it in its `-m slow` pass
def test_mnist_cnn_reaches_96_percent_on_mnist5k(tmp_path, one_device):
  """The classic recipe, 10 epochs, 3 seeds: mean test accuracy >= 96% on the 1,000 held-out digits."""
  accuracies = []
  for seed in range(3):
    config = load_config('mnist_cnn')
    config.seed = seed
    results = train.train_and_evaluate(config, str(tmp_path / str(seed)), devices=one_device)
    assert results['step'] == 620 and results['eval']['top5_accuracy'] >= 0.99
    accuracies.append(results['eval']['accuracy'])
  assert np.mean(accuracies) >= 0.96 and min(accuracies) >= 0.95, accuracies


@pytest.mark.parametrize('name', ['mnist_cnn', 'mlp_breast_cancer'])
def test_sharded_training_matches_one_device(name, tmp_path, one_device):
  config = load_config(name, 'smoke')
  config.num_steps, config.log_every = 12, 1
  ref = train.train_and_evaluate(config, str(tmp_path / 'one'), devices=one_device)
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  sharded = train.train_and_evaluate(config, str(tmp_path / 'mesh'))
  assert sharded['devices'] == 8 and ref['devices'] == 1
  np.testing.assert_allclose(_losses(sharded), _losses(ref), rtol=2e-5)
  assert _losses(ref)[-1] < _losses(ref)[0]
  _, a = checkpoint.load_latest(tmp_path / 'one' / 'checkpoints')
  _, b = checkpoint.load_latest(tmp_path / 'mesh' / 'checkpoints')
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4), a['params'], b['params']
  )


KILL_RUNS = {  # config, overrides, kill after these checkpoint steps, final step
  'mnist_cnn': (
    'mnist_cnn',
    ['--config.num_epochs=4', '--config.checkpoint_every=30'],
    (60, 150),
    248,
  ),  # 62 steps per epoch: both kill points are mid-epoch
  'mlp_breast_cancer': (
    'mlp_breast_cancer',
    ['--config.num_epochs=100', '--config.checkpoint_every=50', '--config.mesh.data=1'],
    (100, 700),
    1400,
  ),
  'gpt_shakespeare': (
    'gpt_shakespeare:smoke',
    ['--config.num_steps=240', '--config.checkpoint_every=30'],
    (60, 150),
    240,
  ),
}


def _cli(config, workdir, overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  name, _, arg = config.partition(':')
  cmd = [
    sys.executable,
    '-m',
    'bigjax.train',
    f'--config=configs/{name}.py' + (f':{arg}' if arg else ''),
    f'--workdir={workdir}',
    '--config.log_every=10',
    *overrides,
  ]
  return cmd, dict(env, PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')])))


def _kill_after_checkpoint(cmd, env, ckpts, step):
  """Starts `cmd`, SIGKILLs it as soon as checkpoint `step` is committed."""
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  while not (ckpts / str(step)).exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.parametrize('name', list(KILL_RUNS))
def test_killed_and_rerun_ends_with_identical_parameters(name, tmp_path):
  """SIGKILL at two points (mid-epoch), re-run the same command each time: bitwise equal result."""
  config, overrides, kill_points, final = KILL_RUNS[name]
  cmd, env = _cli(config, tmp_path / 'full', overrides)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

  cmd, env = _cli(config, tmp_path / 'killed', overrides)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  for step in kill_points:
    _kill_after_checkpoint(cmd, env, ckpts, step)
    saved = [int(s) for s in os.listdir(ckpts) if s.isdigit()]
    assert step in saved and max(saved) < final, f'not killed mid-way: {saved}'
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

  step_a, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  step_b, b = checkpoint.load_latest(tmp_path / 'killed' / 'checkpoints')
  assert step_a == step_b == final
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise
  results = json.load(open(tmp_path / 'killed' / 'results.json'))
  assert results['steps_this_run'] < final - kill_points[-1] + 1
