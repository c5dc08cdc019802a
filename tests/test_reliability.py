"""NaN/Inf guard, preemption, corrupt checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bigjax import checkpoint, experiment, train
from bigjax.errors import NonFiniteError

from conftest import REPO, load_config


def _poisoned(monkeypatch, bad_rows):
  """Makes the training split hold NaN inputs at `bad_rows`."""
  real = experiment.load_data

  def load_data(config, tokenizer=None):
    tr, ev, name = real(config, tokenizer)
    tr['inputs'] = tr['inputs'].copy()
    tr['inputs'][bad_rows] = np.nan
    return tr, ev, name

  monkeypatch.setattr(experiment, 'load_data', load_data)


def _config():
  config = load_config('mlp_breast_cancer', 'smoke')
  config.batch_size, config.num_steps, config.log_every, config.checkpoint_every = 455, 12, 4, 4
  config.mesh.data = 1  # 455 is not divisible by 8 devices
  return config


def test_nan_policy_raise_names_the_step_and_last_good_checkpoint(
  tmp_path, monkeypatch, one_device
):
  config = _config()
  config.batch_size = 65  # 7 steps per epoch; NaN rows reach the batch in epoch 1 at the latest
  _poisoned(monkeypatch, [3])
  with pytest.raises(NonFiniteError, match=r'NaN/Inf at step (\d+); last good checkpoint'):
    train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  # Every checkpoint that was written holds finite parameters.
  if (tmp_path / 'checkpoints').exists() and os.listdir(tmp_path / 'checkpoints'):
    _, state = checkpoint.load_latest(tmp_path / 'checkpoints')
    assert all(np.isfinite(x).all() for x in __import__('jax').tree.leaves(state['params']))


def test_nan_policy_skip_drops_bad_updates_and_counts_them(tmp_path, monkeypatch, one_device):
  config = _config()
  config.batch_size, config.nan_policy = 65, 'skip'
  _poisoned(monkeypatch, [3])
  results = train.train_and_evaluate(config, str(tmp_path), devices=one_device)
  # Row 3 lands in exactly one batch per epoch; 12 steps = 1.7 epochs -> 1 or 2 skipped steps.
  assert 1 <= results['skipped_steps'] <= 2
  assert np.isfinite(results['eval']['loss']) and results['eval']['accuracy'] > 0.8


def test_sigterm_saves_and_rerun_resumes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  cmd = [
    sys.executable,
    '-m',
    'bigjax.train',
    '--config=configs/mnist_cnn.py',
    f'--workdir={tmp_path}',
    '--config.checkpoint_every=100000',
    '--config.num_epochs=4',
  ]
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 120
  while not (tmp_path / 'tensorboard').exists() and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(2)  # let it train some of its 248 steps
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert 'run the same command again to resume' in err
  steps = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 248
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  results = json.load(open(tmp_path / 'results.json'))
  assert results['step'] == 248 and results['steps_this_run'] == 248 - steps[0]
