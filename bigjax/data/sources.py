"""Random-access sources of records, chosen by `config.data.name`.

  NAME            a TFDS dataset (the offline builders in bigjax.data.offline, or any catalog name
                  prepared as array_record in config.data.data_dir): `tfds.data_source`.
  dir:PATH        a dataset `bigjax-prepare` wrote (bigjax.data.records): array_record files of
                  msgpack records, read through grain's ArrayRecordDataSource.
  hf:PATH         a HuggingFace `datasets` folder written by `save_to_disk` (a DatasetDict with
                  one entry per split), read from its memory-mapped Arrow files; no network.
A source has `len()` and `[i] -> {feature: ndarray | bytes}`; encoded images arrive as bytes (or,
from TFDS, as decoded arrays) and are decoded per example by bigjax.data.images. `features(name,
data_dir)` describes the records without reading them (`Feature.kind` in image / tensor / text /
class_label). Split strings take TFDS's slicing (`train[:500]`, `train[10%:]`) for every kind.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import re
from typing import Any, Protocol

import numpy as np

from bigjax import registry
from bigjax.data import records
from bigjax.errors import DataError


class Source(Protocol):
  """What grain reads: `len(source)` records, `source[i]` -> {feature: ndarray | bytes}."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Feature:
  """kind: 'image' (JPEG/PNG bytes or an HWC uint8 array of any size), 'tensor' (fixed shape),
  'text' (UTF-8 bytes) or 'class_label' (an int in [0, num_classes))."""

  kind: str
  num_classes: int | None = None
  shape: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of source, picked by the name's prefix: open(path, split, data_dir) -> Source,
  features(path, data_dir) -> {name: Feature}, nbytes(path, split, data_dir) -> the split's
  size on disk (a whole split's, for a sliced split string)."""

  open: Callable[[str, str, Any], Source]
  features: Callable[[str, Any], dict[str, Feature]]
  nbytes: Callable[[str, str, Any], int]


KINDS = registry.Registry('source kinds', 'config.data.name (prefix before the colon)')


def parse_name(name: str) -> tuple[str, str]:
  """'dir:/data/x' -> ('dir', '/data/x'); a TFDS name ('mnist', 'glue/sst2') -> ('tfds', name)."""
  prefix, sep, path = name.partition(':')
  if sep and len(prefix) > 1:  # 'C:\\...' is never a prefix; TFDS names hold no colon
    KINDS.check(prefix)
    return prefix, os.path.expanduser(path)
  return 'tfds', name


def open_split(name: str, split: str, data_dir: str | None = None) -> Source:
  """The split's random-access source (nothing is read yet); DataError naming the dataset and the
  fix when it is missing, unprepared, in the wrong format or lacks the split."""
  kind, path = parse_name(name)
  return KINDS.get(kind).open(path, split, data_dir)


def features(name: str, data_dir: str | None = None) -> dict[str, Feature]:
  """{feature name: Feature} of the dataset's records, from its metadata only."""
  kind, path = parse_name(name)
  return KINDS.get(kind).features(path, data_dir)


def split_bytes(name: str, split: str, data_dir: str | None = None) -> int:
  """Bytes on disk of the split named by `split` (its slice ignored), from metadata only."""
  kind, path = parse_name(name)
  return KINDS.get(kind).nbytes(path, split.split('[')[0], data_dir)


def num_classes(name: str, data_dir: str | None, label_key: str = 'label') -> int | None:
  """Classes of the `label_key` feature (None if it is not a class label, e.g. a regression
  target); DataError if the records have no such feature."""
  feats = features(name, data_dir)
  if label_key not in feats:
    raise DataError(
      f'dataset {name!r} has no feature {label_key!r}; its features: {", ".join(sorted(feats))}'
    )
  return feats[label_key].num_classes


# -- split strings: 'train', 'train[:500]', 'train[10%:90%]' --------------------------------------
_SLICE = re.compile(r'^(?P<split>[^\[\]]+)(?:\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$')


def _split_range(name: str, spec: str, sizes: dict[str, int]) -> tuple[str, int, int]:
  """('train[:500]', {'train': 4000}) -> ('train', 0, 500); DataError for an unknown split."""
  m = _SLICE.match(spec.strip())
  if m is None:
    raise DataError(
      f'split {spec!r} of dataset {name!r} is not a split name with an optional [start:stop] '
      "slice (e.g. 'train[:500]', 'train[90%:]'); fix config.data.*_split"
    )
  split = m['split']
  if split not in sizes:
    raise DataError(
      f'split {split!r} of dataset {name!r} does not exist; its splits: '
      f'{", ".join(sorted(sizes))}; fix config.data.*_split'
    )
  n = sizes[split]

  def bound(text, default):
    if not text:
      return default
    value = int(text[:-1]) * n // 100 if text.endswith('%') else int(text)
    return max(0, min(n, value + n if value < 0 else value))

  return split, bound(m['start'], 0), bound(m['stop'], n)


class SliceSource:
  """Records [start, stop) of a source."""

  def __init__(self, source: Source, start: int, stop: int):
    self._source, self._start, self._len = source, start, max(0, stop - start)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._len:
      raise IndexError(index)
    return self._source[self._start + index]


# -- TFDS ----------------------------------------------------------------------------------------
def _tfds_open(name, split, data_dir):
  from bigjax.data import pipeline

  return pipeline.open_source(name, split, data_dir)


def _tfds_features(name, data_dir):
  import tensorflow_datasets as tfds

  from bigjax.data import pipeline

  out = {}
  for key, feature in pipeline.builder(name, data_dir).info.features.items():
    if isinstance(feature, tfds.features.ClassLabel):
      out[key] = Feature('class_label', num_classes=feature.num_classes)
    elif isinstance(feature, tfds.features.Image):
      out[key] = Feature('image', shape=feature.shape)
    elif isinstance(feature, tfds.features.Text):
      out[key] = Feature('text')
    else:
      out[key] = Feature('tensor', shape=getattr(feature, 'shape', None))
  return out


def _tfds_nbytes(name, split, data_dir):
  from bigjax.data import pipeline

  info = pipeline.builder(name, data_dir).info.splits
  return int(info[split].num_bytes) if split in info else 0


KINDS.add('tfds', Kind(_tfds_open, _tfds_features, _tfds_nbytes))


# -- dir: a bigjax-prepare folder ----------------------------------------------------------------
def _feature(spec: dict) -> Feature:
  if spec['kind'] == 'class_label':
    return Feature('class_label', num_classes=len(spec['names']))
  return Feature(spec['kind'], shape=tuple(spec['shape']) if 'shape' in spec else None)


def _dir_open(path, split, data_dir):
  del data_dir
  info = records.read_info(path)
  sizes = {k: v['num_examples'] for k, v in info['splits'].items()}
  name, start, stop = _split_range(f'dir:{path}', split, sizes)
  entry = info['splits'][name]
  source = records.RecordSource(path, name, entry['files'], entry['num_examples'])
  return source if (start, stop) == (0, len(source)) else SliceSource(source, start, stop)


def _dir_features(path, data_dir):
  del data_dir
  return {k: _feature(v) for k, v in records.read_info(path)['features'].items()}


def _dir_nbytes(path, split, data_dir):
  del data_dir
  entry = records.read_info(path)['splits'].get(split, {'files': []})
  return sum(os.path.getsize(os.path.join(path, f)) for f in entry['files'])


KINDS.add('dir', Kind(_dir_open, _dir_features, _dir_nbytes))


# -- hf: a HuggingFace `datasets` save_to_disk folder --------------------------------------------
def _hf_dict(path: str):
  try:
    import datasets
  except ImportError:
    raise DataError(
      f'config.data.name=hf:{path} needs the datasets package: pip install datasets'
    ) from None
  if not os.path.isdir(path):
    raise DataError(
      f'config.data.name=hf:{path} is not a folder; name the directory `save_to_disk` wrote'
    )
  try:
    loaded = datasets.load_from_disk(path)
  except FileNotFoundError as e:
    raise DataError(
      f'config.data.name=hf:{path} is not a `datasets` save_to_disk folder ({e}); write it with '
      'DatasetDict.save_to_disk'
    ) from None
  if isinstance(loaded, datasets.Dataset):  # a single split saved on its own
    loaded = datasets.DatasetDict({'train': loaded})
  return loaded


class HFSource:
  """One split of a `datasets` DatasetDict: [i] -> {column: ndarray | bytes}, image columns as
  their encoded bytes (decoded per example by bigjax.data.images), strings as UTF-8 bytes."""

  def __init__(self, dataset, name: str, split: str):
    import datasets

    self.name, self.split = name, split
    self._images = [k for k, f in dataset.features.items() if isinstance(f, datasets.Image)]
    for column in self._images:
      dataset = dataset.cast_column(column, datasets.Image(decode=False))
    self._dataset = dataset

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._dataset[int(index)]
    out = {}
    for k, v in row.items():
      if k in self._images:
        v = v['bytes'] if v.get('bytes') is not None else open(v['path'], 'rb').read()
      elif isinstance(v, str):
        v = v.encode('utf-8')
      elif not isinstance(v, bytes):
        v = np.asarray(v)
      out[k] = v
    return out


def _hf_open(path, split, data_dir):
  del data_dir
  loaded = _hf_dict(path)
  name, start, stop = _split_range(f'hf:{path}', split, {k: len(v) for k, v in loaded.items()})
  source = HFSource(loaded[name], f'hf:{path}', name)
  return source if (start, stop) == (0, len(source)) else SliceSource(source, start, stop)


def _hf_features(path, data_dir):
  import datasets

  del data_dir
  out = {}
  for key, f in next(iter(_hf_dict(path).values())).features.items():
    if isinstance(f, datasets.ClassLabel):
      out[key] = Feature('class_label', num_classes=f.num_classes)
    elif isinstance(f, datasets.Image):
      out[key] = Feature('image')
    elif isinstance(f, datasets.Value) and f.dtype in ('string', 'large_string'):
      out[key] = Feature('text')
    else:
      out[key] = Feature('tensor')
  return out


def _hf_nbytes(path, split, data_dir):
  del data_dir
  loaded = _hf_dict(path)
  if split not in loaded:
    return 0
  return sum(os.path.getsize(f['filename']) for f in loaded[split].cache_files)


KINDS.add('hf', Kind(_hf_open, _hf_features, _hf_nbytes))
