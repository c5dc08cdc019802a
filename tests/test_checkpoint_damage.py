"""A damaged newest checkpoint: warn naming it, fall back to the newest good one, lose nothing."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from bigjax import checkpoint, train

from conftest import load_config


def _config():
  config = load_config('mlp_breast_cancer', 'smoke')  # 3 epochs x 14 steps = 42 steps
  config.checkpoint_every, config.keep_checkpoints = 10, 3  # keeps 30, 40, 42
  return config


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finished')
  train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:1])
  return workdir


def _data_files(step_dir):
  return [
    f
    for f in glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True)
    if os.path.isfile(f)
  ]


def _truncate(step_dir):
  for f in _data_files(step_dir):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _delete_arrays(step_dir):
  for f in _data_files(step_dir):
    os.remove(f)


def _bit_flip(step_dir):
  for f in _data_files(step_dir):
    data = bytearray(open(f, 'rb').read())
    for i in range(0, len(data), 7):
      data[i] ^= 0xFF
    open(f, 'wb').write(bytes(data))


def _delete_named(name):
  def damage(step_dir):
    paths = glob.glob(os.path.join(step_dir, 'default', name))
    assert paths, name
    for p in paths:
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

  return damage


def _delete_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'default'))


DAMAGE = {
  'truncated arrays': _truncate,
  'deleted arrays': _delete_arrays,
  'bit-flipped arrays': _bit_flip,
  'missing manifest': _delete_named('manifest.ocdbt'),
  'missing metadata': _delete_named('_METADATA'),
  'missing item folder': _delete_item,
}


@pytest.mark.parametrize('how', list(DAMAGE), ids=list(DAMAGE))
def test_damaged_newest_step_falls_back_and_retrains_identically(
  how, finished_run, tmp_path, caplog
):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run, workdir)
  DAMAGE[how](str(workdir / 'checkpoints' / '42'))
  with caplog.at_level(logging.WARNING, logger='bigjax.checkpoint'):
    results = train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:1])
  assert 'checkpoint step 42 in' in caplog.text and 'cannot be restored' in caplog.text
  assert results['steps_this_run'] == 2  # resumed from step 40
  assert os.listdir(workdir / 'checkpoints_damaged')  # kept, not deleted
  _, a = checkpoint.load_latest(finished_run / 'checkpoints')
  _, b = checkpoint.load_latest(workdir / 'checkpoints')
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_two_damaged_steps_fall_back_two(finished_run, tmp_path, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run, workdir)
  _truncate(str(workdir / 'checkpoints' / '42'))
  _delete_item(str(workdir / 'checkpoints' / '40'))
  with caplog.at_level(logging.WARNING, logger='bigjax.checkpoint'):
    results = train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:1])
  assert 'step 42' in caplog.text and 'step 40' in caplog.text
  assert results['steps_this_run'] == 12  # from step 30
  _, a = checkpoint.load_latest(finished_run / 'checkpoints')
  _, b = checkpoint.load_latest(workdir / 'checkpoints')
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])


def test_a_save_in_flight_is_not_the_newest_committed_step(finished_run, tmp_path):
  """What a run that ends mid-save (a lost peer's message) reports: a step whose folder still has
  orbax's temporary name is not committed, and never restores."""
  directory = tmp_path / 'checkpoints'
  shutil.copytree(finished_run / 'checkpoints', directory)
  ckpt = checkpoint.Checkpointer(str(directory))
  assert ckpt.newest_committed_step() == 42
  os.rename(directory / '42', directory / '42.orbax-checkpoint-tmp-1234567')
  assert checkpoint.Checkpointer(str(directory)).newest_committed_step() == 40
  assert checkpoint.Checkpointer(str(tmp_path / 'none')).newest_committed_step() is None
