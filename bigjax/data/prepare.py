"""bigjax-prepare: your own data -> an array_record dataset that `config.data.name` can name.

  bigjax-prepare --input=IMAGES_DIR --output=DIR          one sub-folder per class (or
                                                          IMAGES_DIR/<split>/<class>/...)
  bigjax-prepare --input=train=a.jsonl,test=b.jsonl --output=DIR    (or .csv) texts or features
  bigjax-prepare --input=arrays.npz --output=DIR          (or .npy pairs: x=X.npy,y=Y.npy)
  bigjax-train --config=... --config.data.name=dir:DIR

Inputs:
  image folder   IMAGES_DIR/<class>/<file>.{jpg,jpeg,png,...}: classes are the sorted sub-folder
                 names; the encoded bytes are stored as they are (decoded per example at training
                 time: set config.data.image_size unless all images share one size). Top-level
                 folders named train / validation / test are splits, each with class sub-folders.
  CSV / JSONL    one record per row/line; --label_column (default 'label': strings become sorted
                 class names, integers 0..K-1 stay), --text_column (default 'text'; present: a text
                 dataset for config.data.view='lm' / 'classification'), else every other numeric
                 column, in order, becomes the 'features' vector (float32).
  .npz / .npy    inputs under image/images/x/inputs/features, labels under label/labels/y; uint8
                 arrays of rank 3 or 4 are images (N, H, W[, C]), others 'features'.
--input=PATH is the 'train' split; name splits with split=PATH,split=PATH; --test_fraction=F
holds out a seed-fixed fraction of 'train' as 'test' when no test split is given.
The result is DIR/bigjax_dataset.json + DIR/<split>-NNNNN.array_record (bigjax.data.records).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import csv
import json
import os

import numpy as np

from bigjax import cli
from bigjax.data import records
from bigjax.errors import DataError, UserError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
SPLIT_NAMES = ('train', 'validation', 'test')
INPUT_NAMES = ('image', 'images', 'x', 'inputs', 'features')
LABEL_NAMES = ('label', 'labels', 'y')

Splits = dict[str, list[dict]]


def _inputs(spec: str) -> dict[str, str]:
  """'a.jsonl' -> {'train': 'a.jsonl'}; 'train=a.csv,test=b.csv' -> both."""
  out = {}
  for part in filter(None, spec.split(',')):
    split, eq, path = part.partition('=')
    split, path = (split, path) if eq else ('train', split)
    out[split.strip()] = os.path.expanduser(path.strip())
  for split, path in out.items():
    if not os.path.exists(path):
      raise UserError(f'--input {split}={path}: no such file or folder')
  return out


# -- (a) a folder of images, one sub-folder per class --------------------------------------------
def _image_split(folder: str, classes: list[str]) -> list[dict]:
  rows = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for file in sorted(os.listdir(class_dir)):
      if file.lower().endswith(IMAGE_SUFFIXES):
        rows.append({'path': os.path.join(class_dir, file), 'label': label})
  return rows


def image_folder(folder: str) -> tuple[dict, Splits]:
  """(features, {split: [{'path', 'label'}]}) of an image folder (see the module doc)."""
  subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if subdirs and set(subdirs) <= set(SPLIT_NAMES):
    split_dirs = {s: os.path.join(folder, s) for s in subdirs}
  else:
    split_dirs = {'train': folder}
  classes = sorted(
    {c for d in split_dirs.values() for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))}
  )
  if not classes:
    raise UserError(
      f'--input={folder} has no class sub-folders; put each class\'s images in '
      f'{folder}/<class name>/'
    )
  splits = {s: _image_split(d, classes) for s, d in split_dirs.items()}
  if not any(splits.values()):
    raise UserError(f'--input={folder} holds no images ({", ".join(IMAGE_SUFFIXES)})')
  return _image_features(splits, classes), splits


def _image_features(splits: Splits, classes: list[str]) -> dict:
  """The image feature: channels 1 when every image is grayscale, else 3; the shape fixed when
  all images share one size (read from the file headers only)."""
  from PIL import Image

  modes, sizes = set(), set()
  for rows in splits.values():
    for row in rows:
      try:
        with Image.open(row['path']) as image:
          modes.add(image.mode)
          sizes.add(image.size)
      except OSError as e:
        raise DataError(
          f'{row["path"]} is not a readable image ({e}); remove or replace it'
        ) from None
  channels = 1 if modes <= {'L', '1'} else 3
  height_width: list[int | None] = [None, None]
  if len(sizes) == 1:
    width, height = next(iter(sizes))
    height_width = [height, width]
  return {
    'image': {'kind': 'image', 'shape': [*height_width, channels]},
    'label': {'kind': 'class_label', 'names': classes},
  }


def _read_image_rows(rows: list[dict]) -> Iterator[dict]:
  for row in rows:
    with open(row['path'], 'rb') as f:
      yield {'image': f.read(), 'label': np.int64(row['label'])}


# -- (b) CSV or JSONL ------------------------------------------------------------------------------
def _table_rows(path: str) -> list[dict]:
  if path.endswith(('.jsonl', '.json')):
    with open(path, encoding='utf-8') as f:
      out = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except ValueError as e:
            raise DataError(f'{path} line {n} is not JSON ({e}); fix that line') from None
      return out
  if path.endswith('.csv'):
    with open(path, newline='', encoding='utf-8') as f:
      return list(csv.DictReader(f))
  raise UserError(f'--input={path}: a table must be .csv or .jsonl')


def table(paths: dict[str, str], text_column: str, label_column: str) -> tuple[dict, Splits]:
  """(features, {split: records}) of CSV/JSONL files (see the module doc)."""
  raw = {split: _table_rows(path) for split, path in paths.items()}
  first = next((rows[0] for rows in raw.values() if rows), None)
  if first is None:
    raise UserError(f'--input={",".join(paths.values())} holds no rows')
  if label_column not in first:
    raise UserError(
      f'--label_column={label_column!r} is not a column of {next(iter(paths.values()))}; its '
      f'columns: {", ".join(first)}'
    )
  labels = [row.get(label_column) for rows in raw.values() for row in rows]
  names, label_of = _class_names(labels, label_column)
  features: dict = {'label': {'kind': 'class_label', 'names': names}}
  columns = [c for c in first if c != label_column]
  if text_column in first:
    features['text'] = {'kind': 'text'}
  else:
    features['features'] = {'kind': 'tensor', 'shape': [len(columns)], 'dtype': 'float32'}
  splits: Splits = {}
  for split, rows in raw.items():
    out = []
    for i, row in enumerate(rows):
      record: dict = {'label': np.int64(label_of[str(row.get(label_column))])}
      if text_column in first:
        text = row.get(text_column)
        if not isinstance(text, str):
          raise DataError(
            f'{paths[split]} record {i}: column {text_column!r} is {text!r}, not a text; fix it'
          )
        record['text'] = text.encode('utf-8')
      else:
        try:
          record['features'] = np.asarray([float(row[c]) for c in columns], np.float32)
        except (KeyError, TypeError, ValueError) as e:
          raise DataError(
            f'{paths[split]} record {i}: the feature columns {columns} must all be numbers '
            f'({type(e).__name__}: {e}); fix that record or give --text_column'
          ) from None
      out.append(record)
    splits[split] = out
  return features, splits


def _class_names(labels: list, column: str) -> tuple[list[str], dict[str, int]]:
  """Class names and {str(label): id}: integer labels 0..K-1 keep their ids, others are sorted."""
  if any(v is None or v == '' for v in labels):
    raise DataError(f'a record has no value in the label column {column!r}; fill it or drop it')
  try:
    ints = [int(v) for v in labels]
    if all(str(i) == str(v).strip() or i == v for i, v in zip(ints, labels)) and min(ints) >= 0:
      k = max(ints) + 1
      return [str(i) for i in range(k)], {str(i): i for i in range(k)} | {
        str(v): int(v) for v in labels
      }
  except (TypeError, ValueError):
    pass
  names = sorted({str(v) for v in labels})
  return names, {n: i for i, n in enumerate(names)}


# -- (c) npz / npy arrays --------------------------------------------------------------------------
def _pick(arrays: dict, names: Sequence[str], what: str, where: str) -> np.ndarray:
  key = next((k for k in names if k in arrays), None)
  if key is None:
    raise UserError(f'{where} has arrays {sorted(arrays)}; name the {what} one of {names}')
  return np.asarray(arrays[key])


def _load_arrays(path: str) -> dict:
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  raise UserError(f'--input={path}: arrays must be an .npz (or x=X.npy,y=Y.npy)')


def arrays(paths: dict[str, str]) -> tuple[dict, Splits]:
  """(features, {split: records}) of .npz files, or of x=X.npy,y=Y.npy for a single split."""
  if set(paths) == {'x', 'y'}:
    data = {'train': {'x': np.load(paths['x']), 'y': np.load(paths['y'])}}
  else:
    data = {split: _load_arrays(path) for split, path in paths.items()}
  splits: Splits = {}
  features: dict = {}
  for split, a in data.items():
    x = _pick(a, INPUT_NAMES, 'inputs', paths.get(split, 'the .npy files'))
    y = _pick(a, LABEL_NAMES, 'labels', paths.get(split, 'the .npy files'))
    if len(x) != len(y):
      raise DataError(f'split {split}: {len(x)} inputs but {len(y)} labels; give one label each')
    image = x.dtype == np.uint8 and x.ndim in (3, 4)
    if image and x.ndim == 3:
      x = x[..., None]
    key = 'image' if image else 'features'
    x = x if image else x.astype(np.float32)
    features[key] = {'kind': 'tensor', 'shape': list(x.shape[1:]), 'dtype': str(x.dtype)}
    splits[split] = [{key: x[i], 'label': np.int64(y[i])} for i in range(len(x))]
  all_labels = np.concatenate([[r['label'] for r in rows] for rows in splits.values()])
  if all_labels.min() < 0:
    raise DataError(f'labels must be class ids >= 0; found {int(all_labels.min())}')
  k = int(all_labels.max()) + 1
  features['label'] = {'kind': 'class_label', 'names': [str(i) for i in range(k)]}
  return features, splits


# -- the command ---------------------------------------------------------------------------------
def hold_out(splits: Splits, fraction: float, seed: int) -> Splits:
  """Moves a seed-fixed `fraction` of 'train' into 'test' (when there is no 'test' yet)."""
  if not fraction:
    return splits
  if not 0 < fraction < 1:
    raise UserError(f'--test_fraction={fraction} must be in (0, 1)')
  if 'test' in splits:
    raise UserError('--test_fraction with a test split given: drop one of them')
  train = splits['train']
  perm = np.random.default_rng(seed).permutation(len(train))
  n_test = int(round(fraction * len(train)))
  test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
  return {**splits, 'train': [train[i] for i in train_idx], 'test': [train[i] for i in test_idx]}


def prepare(
  inputs: str,
  output: str,
  *,
  text_column: str = 'text',
  label_column: str = 'label',
  test_fraction: float = 0.0,
  seed: int = 0,
) -> dict:
  """Writes the dataset of `inputs` (see the module doc) into `output`; returns its info."""
  paths = _inputs(inputs)
  first = next(iter(paths.values()))
  if os.path.isdir(first):
    if len(paths) != 1:
      raise UserError('--input: give one image folder (its splits are sub-folders)')
    features, rows = image_folder(first)
    rows = hold_out(rows, test_fraction, seed)
    splits: Mapping[str, Iterable[dict]] = {s: _read_image_rows(r) for s, r in rows.items()}
  elif first.endswith(('.csv', '.jsonl', '.json')):
    features, tables = table(paths, text_column, label_column)
    splits = hold_out(tables, test_fraction, seed)
  elif first.endswith(('.npz', '.npy')):
    features, arr = arrays(paths)
    splits = hold_out(arr, test_fraction, seed)
  else:
    raise UserError(
      f'--input={first}: not an image folder, .csv, .jsonl, .npz or .npy; see bigjax-prepare --help'
    )
  if os.path.exists(os.path.join(output, records.INFO_FILE)):
    raise UserError(f'--output={output} already holds a dataset; remove it or choose another')
  return records.write_dataset(output, features, splits)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.Parser('bigjax-prepare', __doc__)
  parser.string('input', None, 'An image folder, a .csv/.jsonl, or .npz; split=PATH,...', True)
  parser.string('output', None, 'The dataset folder to write (config.data.name=dir:OUTPUT).', True)
  parser.string('text_column', 'text', 'CSV/JSONL: the column holding the text.')
  parser.string('label_column', 'label', 'CSV/JSONL: the column holding the label.')
  parser.float('test_fraction', 0.0, "Hold out this fraction of 'train' as 'test'.")
  parser.integer('seed', 0, 'Seed of the --test_fraction hold-out.')

  def run(args: Sequence[str]) -> None:
    fv = parser.parse(args)
    info = prepare(
      fv.input,
      fv.output,
      text_column=fv.text_column,
      label_column=fv.label_column,
      test_fraction=fv.test_fraction,
      seed=fv.seed,
    )
    counts = ', '.join(f'{s} {v["num_examples"]}' for s, v in info['splits'].items())
    print(
      f'bigjax-prepare: wrote {fv.output} ({counts}); train with --config.data.name=dir:{fv.output}'
    )

  cli.run(run, argv)


if __name__ == '__main__':
  main()
