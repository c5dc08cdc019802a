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
  results = train.train_and_evaluate(load_config('mlp_breast_cancer'), str(tmp_path),
                                     devices=one_device)
  report = results['eval']
  assert report['accuracy'] >= 0.95
  assert report['roc_auc'] >= 0.98 and report['f1'] >= 0.95
  assert np.sum(report['confusion_matrix']) == 114


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
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4),
               a['params'], b['params'])


def _cli(workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  cmd = [sys.executable, '-m', 'bigjax.train', '--config=configs/mnist_cnn.py',
         f'--workdir={workdir}', '--config.num_epochs=4', '--config.checkpoint_every=30',
         '--config.log_every=30', *overrides]
  return cmd, dict(env, PYTHONPATH=REPO)


def test_killed_and_rerun_ends_with_identical_parameters(tmp_path):
  cmd, env = _cli(tmp_path / 'full')
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

  cmd, env = _cli(tmp_path / 'killed')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 240
  while not (ckpts / '60').exists() and time.time() < deadline:  # step 60 is mid-epoch 1
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_before = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert 60 in steps_before and max(steps_before) < 248, 'the run was not killed mid-way'
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

  step_a, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  step_b, b = checkpoint.load_latest(tmp_path / 'killed' / 'checkpoints')
  assert step_a == step_b == 248
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise
  results = json.load(open(tmp_path / 'killed' / 'results.json'))
  assert results['steps_this_run'] < 248
