"""Exact resume on the streaming path (config.data.load=stream: grain reads each step's records from
the TFDS array_record source): the SIGKILL runs of tests/test_train.py (MLP, CNN), a GPT on packed
windows of a `dir:` text dataset, and 2 processes x 4 devices, killed after a checkpoint and re-run,
end bitwise equal to an uninterrupted run; 1 worker process gives the same batches as none; and 2
processes' randomly cropped rows of a step are exactly the 1-process batch's."""

import os
import subprocess

import jax
import numpy as np
import pytest
import test_data
import test_multiprocess as mp
import test_packing
import test_train

from bigjax import checkpoint, experiment
from bigjax.data import loader, records
from bigjax.errors import UserError

from conftest import REPO, kill_after_checkpoint, load_config

STREAM = ['--config.data.load=stream']
# breast_cancer's config standardizes the features, which needs the whole split in memory.
RUNS = {
  'mlp_breast_cancer': [*STREAM, '--config.data.standardize=false'],
  'mnist_cnn': STREAM,
}


# The CNN streamed for 2 epochs (62 steps each), not test_train's 4: the kills at 30 and 90 still
# fall mid-epoch on both sides of the epoch boundary, at half the cost.
KILL_RUNS = {
  **test_train.KILL_RUNS,
  'mnist_cnn': (
    'mnist_cnn',
    ['--config.num_epochs=2', '--config.checkpoint_every=30'],
    (30, 90),
    124,
  ),
}


@pytest.mark.slow  # ~60 s (MLP) and ~60 s (CNN) on an idle 2-core machine
@pytest.mark.parametrize('name', ['mlp_breast_cancer', 'mnist_cnn'])
def test_streamed_run_killed_and_rerun_ends_with_identical_parameters(name, tmp_path):
  config, overrides, kill_points, final = KILL_RUNS[name]
  overrides = [*overrides, *RUNS[name]]
  cmd, env = test_train._cli(config, tmp_path / 'full', overrides)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  cmd, env = test_train._cli(config, tmp_path / 'killed', overrides)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  for step in kill_points:
    kill_after_checkpoint(cmd, env, ckpts, step)
    saved = [int(s) for s in os.listdir(ckpts) if s.isdigit()]
    assert step in saved and max(saved) < final, f'not killed mid-way: {saved}'
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  step_a, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  step_b, b = checkpoint.load_latest(tmp_path / 'killed' / 'checkpoints')
  assert step_a == step_b == final
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise


@pytest.mark.slow  # 4 runs of a few seconds of training each, ~15 s of start-up apiece
def test_a_packed_gpt_killed_and_rerun_ends_with_identical_parameters(tmp_path):
  """lm1b_gpt:smoke on packed windows of a 152-document dir: text dataset (token store streamed
  from disk, 48 steps an epoch): SIGKILL after checkpoints 20 and 40 of 60, re-run: bitwise equal
  to an uninterrupted run."""
  name = test_packing._text_dataset(tmp_path / 'ds', test_packing._texts())
  overrides = [
    f'--config.data.name={name}',
    '--config.num_steps=60',
    '--config.checkpoint_every=20',
  ]
  cmd, env = test_train._cli('lm1b_gpt:smoke', tmp_path / 'full', overrides)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  cmd, env = test_train._cli('lm1b_gpt:smoke', tmp_path / 'killed', overrides)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  for step in (20, 40):
    kill_after_checkpoint(cmd, env, ckpts, step)
    saved = [int(s) for s in os.listdir(ckpts) if s.isdigit()]
    assert step in saved and max(saved) < 60, f'not killed mid-way: {saved}'
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  step_a, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  step_b, b = checkpoint.load_latest(ckpts)
  assert step_a == step_b == 60
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise


def test_two_processes_crop_their_rows_exactly_as_one_process(monkeypatch):
  """Images of random sizes, inception-cropped and flipped per example: processes 0 and 1 of 2
  (jax.process_index / process_count patched) each read half of every step's rows, and their
  halves concatenate to exactly the 1-process batch, within and across the epoch boundary."""
  source = test_data._image_records(40)
  transform = test_data._crop_transform()
  one = loader.TrainBatches(source, 8, 1, transform)
  halves = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    halves.append(loader.TrainBatches(source, 8, 1, transform))
  for step in (0, 4, 5, 9):  # 5 steps an epoch
    whole = one.batch(step)
    parts = [h.batch(step) for h in halves]
    assert parts[0]['inputs'].shape == (4, 8, 8, 3)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.slow
def test_two_streaming_processes_killed_and_rerun_end_bitwise_equal(tmp_path):
  """2 processes x 4 devices on the streaming path, each reading only its own rows: SIGKILL both
  after checkpoint 10 of 20, re-run: the parameters equal an uninterrupted 2-process run's."""
  extra = [*RUNS['mlp_breast_cancer'], '--config.num_steps=20', '--config.checkpoint_every=10']
  codes, errs = mp._wait(mp._start(tmp_path / 'full', extra, 2, 4))
  assert codes == [0, 0], errs
  ckpts = tmp_path / 'killed' / 'checkpoints'
  procs = mp._start(tmp_path / 'killed', extra, 2, 4)
  import time

  deadline = time.time() + 240
  while not (ckpts / '10').exists() and time.time() < deadline:
    time.sleep(0.01)
  for p in procs:
    p.kill()
  for p in procs:
    p.wait()
  assert [int(s) for s in os.listdir(ckpts) if s.isdigit()] == [10]
  codes, errs = mp._wait(mp._start(tmp_path / 'killed', extra, 2, 4))
  assert codes == [0, 0], errs
  _, a = checkpoint.load_latest(tmp_path / 'full' / 'checkpoints')
  _, b = checkpoint.load_latest(ckpts)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _train_batches(**data):
  config = load_config('mnist_cnn', 'smoke')
  config.data.update(**data)
  return experiment.data_inputs.build(config, None, experiment.load_data).train


def _assert_streams_batches(batches, start, stop):
  streamed = list(batches.iterate(start, stop))
  assert len(streamed) == stop - start
  for step, batch in zip(range(start, stop), streamed):
    direct = batches.batch(step)
    for k in direct:
      np.testing.assert_array_equal(batch[k], direct[k])


def test_streamed_records_give_the_in_memory_batches_and_threads_keep_the_order():
  """mnist5k read per record from its array_record source equals the host-array path, step by
  step across the epoch boundary (62 steps an epoch); 2 reader threads stream exactly batch(s)."""
  memory = _train_batches(load='memory')
  stream = _train_batches(load='stream', threads=2)
  for step in (0, 61, 62, 200):
    a, b = memory.batch(step), stream.batch(step)
    assert a.keys() == b.keys() == {'inputs', 'label'}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      assert a[k].dtype == b[k].dtype
  _assert_streams_batches(stream, 58, 66)


@pytest.mark.slow  # starting a grain worker process takes ~10-40 s here
def test_a_worker_process_gives_the_same_batches():
  _assert_streams_batches(_train_batches(load='stream', workers=1), 58, 66)


def test_streamed_splits_refuse_array_access_and_bad_load_fields_are_one_line(tmp_path):
  """A 12-record dir: dataset (written here: nothing to prepare) streamed: its splits' arrays are
  NotInMemory, and config.data fields streaming cannot serve are one-line UserErrors."""
  rows = [{'features': np.full(3, i, np.float32), 'label': i % 2} for i in range(12)]
  features = {
    'features': {'kind': 'tensor', 'shape': [3], 'dtype': 'float32'},
    'label': {'kind': 'class_label', 'names': ['a', 'b']},
  }
  records.write_dataset(str(tmp_path / 'ds'), features, {'train': rows[:8], 'test': rows[8:]})
  config = load_config('mlp_mnist', 'smoke')
  config.data.update(name=f'dir:{tmp_path / "ds"}', load='stream')
  config.update(batch_size=4, eval_batch_size=4)
  splits = experiment.data_inputs.build(config, None, experiment.load_data)
  assert splits.evals.num_examples == 4 and splits.label_shape == ()
  np.testing.assert_array_equal(
    splits.check_eval['inputs'], np.repeat(np.arange(8, 12), 3).reshape(4, 3)
  )
  with pytest.raises(UserError, match=r"split 'train' is streamed .* config.data.load='memory'"):
    splits.train_arrays['inputs']
  with pytest.raises(UserError, match=r"split 'test' is streamed"):
    len(splits.eval_arrays)
  config.data.cv_folds = 5
  with pytest.raises(UserError, match='config.data.cv_folds needs the whole split in memory'):
    experiment.data_inputs.check(config)
  config.data.update(cv_folds=0, load='disk')
  with pytest.raises(UserError, match="config.data.load='disk' is unknown; use one of auto"):
    experiment.data_inputs.check(config)
