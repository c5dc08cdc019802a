"""TFDS builders and data sources, and whole splits read into host arrays (config.data.load =
'memory').

`open_source` opens a TFDS split for random access (never downloading; the offline builders are
prepared on first use); `load_split` reads any source's split (bigjax.data.sources: TFDS, `dir:`,
`hf:`) whole into {'inputs': (N, ...), 'label': (N,)}. The batches by step over those arrays (or
over a streamed source) are bigjax.data.loader's: `TrainBatches` and `eval_batches` here are the
same objects, kept under the names the rest of bigjax has always used.
"""

from __future__ import annotations

from collections.abc import Iterator
import os

import numpy as np

from bigjax.data import loader, offline, sources
from bigjax.data.inputs import INPUT_KEYS
from bigjax.errors import DataError

TrainBatches = loader.TrainBatches


def _data_dir(data_dir):
  return os.path.expanduser(data_dir) if data_dir else None


def builder(name: str, data_dir: str | None):
  """The TFDS builder of `name` in `data_dir` (None: the default TFDS data dir), nothing prepared
  or downloaded; DataError unless `name` is an offline dataset or in the TFDS catalog."""
  import tensorflow_datasets as tfds

  known_offline = ', '.join(offline.NAMES)
  base = name.split('/')[0]  # 'glue/sst2' -> 'glue'
  if base not in offline.NAMES and base not in tfds.list_builders(with_community_datasets=False):
    raise DataError(
      f'config.data.name={name!r} is not a TFDS dataset; offline datasets: '
      f'{known_offline}; or any TFDS catalog name (e.g. mnist, cifar10) prepared in '
      'config.data.data_dir'
    )
  return tfds.builder(name, data_dir=_data_dir(data_dir))


def num_classes(name: str, data_dir: str | None, label_key: str = 'label') -> int | None:
  """Number of classes of the dataset's `label_key` feature, from its metadata (read without
  preparing or reading the data); None if that feature is not a class label (e.g. a regression
  target). DataError if the dataset has no such feature. Any source kind (bigjax.data.sources)."""
  return sources.num_classes(name, data_dir, label_key)


def _not_prepared(name, where):
  return DataError(
    f'dataset {name!r} is not prepared in {where} and bigjax does not download at run time; on a '
    f'machine with internet run `tfds build {name} --file_format=array_record --data_dir=DIR` '
    f'and pass --config.data.data_dir=DIR, or use an offline dataset ({", ".join(offline.NAMES)})'
  )


def open_source(name: str, split: str, data_dir: str | None):
  """The split's TFDS data source (random access, `len` records; each a dict of numpy values),
  never downloading; offline datasets are prepared on first use."""
  import tensorflow_datasets as tfds

  dataset = builder(name, data_dir)
  if name in offline.NAMES and not dataset.is_prepared():
    tfds.disable_progress_bar()
    try:
      dataset.download_and_prepare(file_format='array_record')
    except FileExistsError:  # another process (a sweep's parallel runs, a second host process)
      dataset = builder(name, data_dir)  # finished preparing the same version first
      if not dataset.is_prepared():
        raise
    except (PermissionError, NotADirectoryError) as e:
      raise DataError(
        f'dataset {name!r} cannot be prepared in {dataset.data_dir_root}: {e.strerror}; pass a '
        'writable --config.data.data_dir (or set TFDS_DATA_DIR)'
      ) from None
  try:
    return tfds.data_source(name, split=split, data_dir=_data_dir(data_dir), download=False)
  except (AssertionError, FileNotFoundError, OSError, NotImplementedError) as e:
    if dataset.is_prepared():  # prepared, but as TFRecord: no random access without TensorFlow
      raise DataError(
        f'dataset {name!r} in {dataset.data_dir} is not in array_record format; '
        f'rebuild it with `tfds build {name} --file_format=array_record`'
      ) from e
    raise _not_prepared(name, dataset.data_dir) from e
  except (ValueError, KeyError) as e:
    if not dataset.is_prepared():
      raise _not_prepared(name, dataset.data_dir) from e
    raise DataError(
      f'split {split!r} of dataset {name!r} cannot be read ({e}); its splits: '
      f'{", ".join(dataset.info.splits)}; check config.data.*_split'
    ) from e


def check_available(name: str, split: str, data_dir: str | None) -> None:
  """Raises DataError (with the command that fixes it) unless the split can be read offline."""
  open_source(name, split, data_dir)


def load_split(name: str, split: str, data_dir: str | None = None) -> dict:
  """Reads a whole split into host memory.

  Returns {'inputs': (N, ...) array, 'label': (N,) int32}; `inputs` is the record's 'image' (uint8,
  NHWC) or 'features' (float32). Offline datasets are prepared on first use.
  """
  source = sources.open_split(name, split, data_dir)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(f'split {split!r} of dataset {name!r} is empty')
  key = next((k for k in INPUT_KEYS if k in records[0]), None)
  if key is None or 'label' not in records[0]:
    raise DataError(
      f'dataset {name!r} records have keys {sorted(records[0])}; bigjax expects one '
      f'of {INPUT_KEYS} and "label"'
    )
  values = [r[key] for r in records]
  if key == 'image' and isinstance(values[0], (bytes, np.bytes_)):  # encoded: same size needed
    values = _decode_all(name, split, data_dir, values)
  inputs = _stack(name, split, values)
  labels = np.asarray([r['label'] for r in records], np.int32)
  return {'inputs': inputs, 'label': labels}


def _decode_all(name, split, data_dir, values):
  from bigjax.data import images

  shape = sources.features(name, data_dir).get('image', sources.Feature('image')).shape
  channels = int(shape[-1]) if shape and shape[-1] in (1, 3) else 3
  out = []
  for i, value in enumerate(values):
    image = images.decode(value, channels, f'dataset {name!r} split {split!r} record {i}')
    out.append(np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], channels))
  return out


def _stack(name, split, values):
  """np.stack that names the first record whose shape or dtype differs from record 0, and the fix:
  images of several sizes are decoded and cropped to one by config.data.image_size (streamed)."""
  first = np.asarray(values[0])
  for i, v in enumerate(values):
    v = np.asarray(v)
    if v.shape != first.shape or v.dtype != first.dtype:
      fix = (
        "set config.data.image_size (e.g. 224) to stream the images cropped to one size"
        if first.ndim == 3 and v.ndim == 3
        else 'give every record the same shape and prepare the dataset again'
      )
      raise DataError(
        f'dataset {name!r} split {split!r} record {i}: shape {v.shape} dtype {v.dtype}, '
        f'expected {first.shape} {first.dtype} like record 0; {fix}'
      )
  return np.stack(values)


def check_labels(arrays: dict, num_classes: int, name: str, split: str) -> None:
  """Raises DataError naming the first record whose label is outside [0, num_classes)."""
  bad = np.flatnonzero((arrays['label'] < 0) | (arrays['label'] >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise DataError(
      f'dataset {name!r} split {split!r} record {i}: label {arrays["label"][i]} is '
      f'outside [0, {num_classes}); check config.task.kwargs.num_classes'
    )


def check_tokens(arrays: dict, vocab_size: int, name: str, split: str) -> None:
  """Raises DataError naming the first record holding a token id outside [0, vocab_size)."""
  tokens = arrays['inputs']
  bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
  if bad.size:
    i, j = (int(v) for v in bad[0][:2])
    raise DataError(
      f'dataset {name!r} split {split!r} record {i}: token id {tokens[i, j]} at '
      f'position {j} is outside the vocabulary [0, {vocab_size}); check '
      'config.task.kwargs.vocab_size and config.model.kwargs.vocab_size'
    )


CV_SEED = 0  # fold assignment seed: fixed, so every config.seed sees the same folds


def cv_fold_ids(labels: np.ndarray, num_folds: int) -> np.ndarray:
  """Fold of every example of a split: labels (N,) int -> (N,) int64 in [0, num_folds).

  The test folds of scikit-learn's StratifiedKFold(num_folds, shuffle=True, random_state=CV_SEED):
  deterministic and stratified (every fold holds each class in proportion). DataError when
  num_folds is outside [2, N] or a class has fewer than num_folds examples.
  """
  from sklearn.model_selection import StratifiedKFold

  labels = np.asarray(labels).reshape(-1)
  n = len(labels)
  if not 2 <= num_folds <= n:
    raise DataError(
      f'config.data.cv_folds={num_folds} must lie in [2, {n}] (the training split '
      f'holds {n} examples)'
    )
  classes, counts = np.unique(labels, return_counts=True)
  if counts.min() < num_folds:  # StratifiedKFold would warn (some classes) or raise (all classes)
    rare, fewest = classes[counts.argmin()], counts.min()
    fix = (
      f'lower config.data.cv_folds to at most {fewest}'
      if fewest >= 2
      else 'no stratified split exists: drop that class or turn cross-validation off'
    )
    raise DataError(
      f'config.data.cv_folds={num_folds} is more than the {fewest} training '
      f'example(s) of label {rare}; stratified folds need at least cv_folds examples '
      f'of every class: {fix}'
    )
  folds = np.empty(n, np.int64)
  splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=CV_SEED)
  for fold, (_, held_out) in enumerate(splitter.split(np.zeros((n, 1)), labels)):
    folds[held_out] = fold
  return folds


def cv_split(arrays: dict, num_folds: int, fold: int) -> tuple[dict, dict]:
  """(train folds, held-out fold) of a split {'inputs': (N, ...), optional 'label': (N,)}, each in
  the split's original order; the held-out one is fold `fold` of cv_fold_ids (stratified when
  there are (N,) labels)."""
  labels = arrays.get('label')
  n = len(arrays['inputs'])
  labels = labels if labels is not None and labels.shape == (n,) else np.zeros(n, np.int32)
  held_out = cv_fold_ids(labels, num_folds) == fold
  return ({k: v[~held_out] for k, v in arrays.items()}, {k: v[held_out] for k, v in arrays.items()})


def standardize(train: dict, *others: dict) -> list[dict]:
  """Scales float 'inputs' to zero mean, unit variance using the training split's statistics."""
  mean = train['inputs'].mean(0)
  std = train['inputs'].std(0) + 1e-8
  return [dict(a, inputs=((a['inputs'] - mean) / std).astype(np.float32)) for a in (train, *others)]


def eval_batches(arrays: dict, batch_size: int) -> Iterator[dict]:
  """Yields process-local eval batches covering every example once.

  The last batch is padded to `batch_size`; batch['mask'] (B/P,) is 1.0 on real examples.
  """
  return iter(loader.EvalBatches(arrays, batch_size))
