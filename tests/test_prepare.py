"""bigjax-prepare (bigjax/data/prepare/): an image folder, a JSONL text file and npz arrays become
array_record datasets that `config.data.name=dir:PATH` trains on; a HuggingFace `datasets`
save_to_disk folder is read as a source (`hf:PATH`); bad inputs are one line naming the fix."""

import io
import json
import os

import jax
import numpy as np
import pytest

from bigjax import train
from bigjax.data import images, inputs, prepare, records, sources
from bigjax.errors import DataError, UserError

from conftest import load_config


def _png(array):
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _bar_image(rng, label):
  """A noisy RGB image of random size 20..40 px; class 0 has a bright left half, class 1 a bright
  right half."""
  h, w = rng.integers(20, 41, size=2)
  image = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
  half = slice(0, w // 2) if label == 0 else slice(w // 2, w)
  image[:, half] += 150
  return image


def _image_folder(root, n_per_class=48, seed=0):
  rng = np.random.default_rng(seed)
  for label, name in enumerate(['left', 'right']):
    os.makedirs(root / name)
    for i in range(n_per_class):
      (root / name / f'{i}.png').write_bytes(_png(_bar_image(rng, label)))
  return root


def _small_cnn(name, **data):
  config = load_config('mnist_cnn', 'smoke')
  config.data.update(name=name, **data)
  config.model.kwargs.update(conv_features=(8,), pool_after=(True,), dense_features=(16,))
  config.update(batch_size=16, eval_batch_size=32, num_steps=40, log_every=10)
  config.optim.lr = 3e-3
  return config


@pytest.mark.slow
def test_an_image_folder_is_prepared_streamed_and_learned(tmp_path):
  """Images of different sizes, one sub-folder per class -> dir:; streamed with inception crops
  at 16 px: the two classes are told apart (accuracy >= 0.9 on the held-out quarter)."""
  out = tmp_path / 'ds'
  info = prepare.prepare(str(_image_folder(tmp_path / 'images')), str(out), test_fraction=0.25)
  assert info['splits']['train']['num_examples'] == 72
  assert info['splits']['test']['num_examples'] == 24
  assert info['features']['label'] == {'kind': 'class_label', 'names': ['left', 'right']}
  assert info['features']['image']['shape'] == [None, None, 3]  # sizes differ
  config = _small_cnn(f'dir:{out}', image_size=16, image_flip=False)
  assert inputs.streams(config)  # encoded images: 'auto' streams
  results = train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert results['eval']['accuracy'] >= 0.9


@pytest.mark.slow
def test_jsonl_texts_are_prepared_and_a_gpt_learns_them(tmp_path):
  """JSONL texts -> a dir: text dataset for the 'lm' view: a tiny GPT's validation loss falls
  below half of its initial ln(260) on a text of repeated phrases."""
  rng = np.random.default_rng(0)
  phrases = ['the cat sat on the mat. ', 'a dog ran in the park. ']
  lines = [
    {'text': ''.join(rng.choice(phrases, 8)), 'label': ['cat', 'dog'][i % 2]} for i in range(120)
  ]
  path = tmp_path / 'texts.jsonl'
  path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  out = tmp_path / 'ds'
  info = prepare.prepare(f'train={path}', str(out), test_fraction=0.2)
  assert info['features'] == {
    'label': {'kind': 'class_label', 'names': ['cat', 'dog']},
    'text': {'kind': 'text'},
  }
  config = load_config('gpt_shakespeare', 'smoke')
  config.data.update(name=f'dir:{out}', eval_split='test')
  config.update(num_steps=60, log_every=20)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert results['eval']['loss'] < 0.5 * np.log(260)


def test_npz_arrays_are_prepared_and_an_mlp_learns_them(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 6)).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
  np.savez(tmp_path / 'train.npz', features=x[:320], label=y[:320])
  np.savez(tmp_path / 'test.npz', features=x[320:], label=y[320:])
  out = tmp_path / 'ds'
  spec = f'train={tmp_path / "train.npz"},test={tmp_path / "test.npz"}'
  info = prepare.prepare(spec, str(out))
  assert info['features']['features'] == {'kind': 'tensor', 'shape': [6], 'dtype': 'float32'}
  config = load_config('mlp_breast_cancer')
  config.data.update(name=f'dir:{out}', standardize=False)
  config.task.kwargs = {}
  config.update(num_epochs=10, batch_size=32)
  # The memory and the streaming path read the same records into the same batches.
  memory = inputs.build(config, None, _load_data)
  config.data.load = 'stream'
  stream = inputs.build(config, None, _load_data)
  for step in (0, 9, 10, 31):
    a, b = memory.train.batch(step), stream.train.batch(step)
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
    np.testing.assert_array_equal(a['label'], b['label'])
  results = train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert results['eval']['accuracy'] >= 0.9


def _load_data(config, tokenizer):
  from bigjax import experiment

  return experiment.load_data(config, tokenizer)


def test_a_datasets_save_to_disk_folder_is_a_source(tmp_path):
  """hf:PATH: splits, ClassLabel classes, encoded image bytes decoded per example; the batches
  hold exactly the saved images and labels."""
  datasets = pytest.importorskip('datasets')
  rng = np.random.default_rng(0)
  pics = [rng.integers(0, 255, size=(8, 8, 3)).astype(np.uint8) for _ in range(12)]
  features = datasets.Features(
    {'image': datasets.Image(), 'label': datasets.ClassLabel(names=['a', 'b', 'c'])}
  )
  rows = {
    'image': [{'bytes': _png(p), 'path': None} for p in pics],
    'label': [i % 3 for i in range(12)],
  }
  dd = datasets.DatasetDict(
    {
      'train': datasets.Dataset.from_dict(rows, features=features),
      'test': datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features),
    }
  )
  dd.save_to_disk(str(tmp_path / 'hf'))
  name = f'hf:{tmp_path / "hf"}'
  assert sources.num_classes(name, None) == 3
  source = sources.open_split(name, 'train[2:10]')
  assert len(source) == 8 and source[0]['image'][:4] == b'\x89PNG'
  config = _small_cnn(name, load='stream')
  config.update(batch_size=4, eval_batch_size=4)
  with pytest.raises(UserError, match='holds images of any size; set config.data.image_size'):
    inputs.build(config, None, _load_data)
  config.data.image_size = 8
  splits = inputs.build(config, None, _load_data)
  evals = list(splits.evals)
  assert len(evals) == 1 and evals[0]['inputs'].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(splits.evals.labels(), [0, 1, 2, 0])
  batch = splits.train.batch(0)
  assert batch['inputs'].shape == (4, 8, 8, 3) and batch['inputs'].dtype == np.uint8
  from PIL import Image

  for i in range(4):  # the saved image, resized by 1/0.875 and centre-cropped back to 8 px
    expected = images.center_crop(Image.fromarray(pics[i]), 8, 3)
    np.testing.assert_array_equal(evals[0]['inputs'][i], expected)


# -- bad input: one line naming the record or field and the fix -----------------------------------
def test_a_missing_or_unprepared_folder_names_the_fix(tmp_path):
  with pytest.raises(DataError, match='no such folder; run `bigjax-prepare'):
    sources.open_split(f'dir:{tmp_path / "nope"}', 'train')
  (tmp_path / 'tf').mkdir()
  (tmp_path / 'tf' / 'mnist-train.tfrecord-00000-of-00001').write_bytes(b'x')
  with pytest.raises(DataError, match='holds TFRecord files: bigjax reads array_record only'):
    sources.open_split(f'dir:{tmp_path / "tf"}', 'train')


def test_a_split_that_does_not_exist_lists_the_splits(tmp_path):
  np.savez(tmp_path / 'a.npz', x=np.zeros((4, 2), np.float32), y=np.arange(4))
  prepare.prepare(str(tmp_path / 'a.npz'), str(tmp_path / 'ds'))
  with pytest.raises(DataError, match="split 'validation' .* does not exist; its splits: train"):
    sources.open_split(f'dir:{tmp_path / "ds"}', 'validation')
  with pytest.raises(UserError, match='already holds a dataset'):
    prepare.prepare(str(tmp_path / 'a.npz'), str(tmp_path / 'ds'))


def test_a_corrupt_image_names_dataset_split_and_record(tmp_path):
  folder = _image_folder(tmp_path / 'images', n_per_class=4)
  (folder / 'right' / '2.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  out = tmp_path / 'ds'
  with pytest.raises(DataError, match=r'right/2.png is not a readable image .* remove or replace'):
    prepare.prepare(str(folder), str(out))  # the header scan at prepare time already fails ...
  # ... so write the records directly, as a dataset damaged after preparation would be.
  good = [{'image': _png(np.zeros((4, 4, 3), np.uint8)), 'label': np.int64(0)}] * 3
  bad = {'image': b'\xff\xd8 truncated jpeg', 'label': np.int64(1)}
  features = {
    'image': {'kind': 'image', 'shape': [None, None, 3]},
    'label': {'kind': 'class_label', 'names': ['a', 'b']},
  }
  records.write_dataset(str(out), features, {'train': [*good, bad], 'test': good})
  config = _small_cnn(f'dir:{out}', image_size=4)
  config.update(batch_size=4, eval_batch_size=4)
  with pytest.raises(
    DataError, match=rf"dataset 'dir:{out}' split 'train' record 3: the image does not decode"
  ):
    inputs.build(config, None, _load_data)


def test_table_inputs_with_a_bad_column_are_one_line(tmp_path):
  path = tmp_path / 't.csv'
  path.write_text('a,b,y\n1,2,0\n3,x,1\n')
  with pytest.raises(
    UserError, match="--label_column='label' is not a column .* its columns: a, b, y"
  ):
    prepare.prepare(str(path), str(tmp_path / 'ds'))
  with pytest.raises(
    DataError, match=r't.csv record 1: the feature columns \[.a., .b.\] must all be numbers'
  ):
    prepare.prepare(str(path), str(tmp_path / 'ds'), label_column='y')


def test_a_text_over_max_text_bytes_names_its_record(tmp_path, capsys):
  """--max_text_bytes=20: the 21-byte text of test.jsonl's record 1 is one line naming the file,
  the record and the fix (exit 2 from the command); at 21 the same files prepare."""
  (tmp_path / 'train.jsonl').write_text('{"text": "short", "label": 0}\n')
  (tmp_path / 'test.jsonl').write_text(
    '{"text": "fine", "label": 1}\n{"text": "twenty-one bytes long", "label": 0}\n'
  )
  spec = f'train={tmp_path / "train.jsonl"},test={tmp_path / "test.jsonl"}'
  with pytest.raises(DataError, match=r'test.jsonl record 1: its text is 21 bytes, longer than'):
    prepare.prepare(spec, str(tmp_path / 'ds'), max_text_bytes=20)
  with pytest.raises(SystemExit) as e:
    prepare.main(['bigjax-prepare', f'--input={spec}', '--output=x', '--max_text_bytes=20'])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and 'raise the limit' in err
  info = prepare.prepare(spec, str(tmp_path / 'ds'), max_text_bytes=21)
  assert info['splits']['test']['num_examples'] == 2


def test_the_command_line_writes_a_dataset_and_prints_how_to_use_it(tmp_path, capsys):
  np.savez(tmp_path / 'a.npz', x=np.zeros((4, 2), np.float32), y=np.arange(4))
  prepare.main(['bigjax-prepare', f'--input={tmp_path / "a.npz"}', f'--output={tmp_path / "ds"}'])
  assert f'--config.data.name=dir:{tmp_path / "ds"}' in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    prepare.main(['bigjax-prepare', f'--input={tmp_path / "missing.npz"}', '--output=x'])
  assert e.value.code == 2
  assert 'no such file or folder' in capsys.readouterr().err
