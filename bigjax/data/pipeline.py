"""From a TFDS name to per-step global batches.

A split is read once from its TFDS data source into host memory (all datasets bigjax ships or
names fit easily), as a dict {'inputs': (N, ...), 'label': (N,)}. The batch for a training step is
a pure function of (seed, step): epoch e uses the permutation `default_rng([seed, e])` of the split,
drops the remainder, and each process takes only its own rows of the global batch. That makes
resuming at any step exact, mid-epoch included.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import os

import jax
import numpy as np

from bigjax.data import offline
from bigjax.errors import DataError

INPUT_KEYS = ('image', 'features')  # the first present becomes batch['inputs']


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
  """Number of classes of the dataset's `label_key` feature, from its TFDS builder info (read
  without preparing or reading the data); None if that feature is not a ClassLabel (e.g. a
  regression target). DataError if the dataset has no such feature."""
  import tensorflow_datasets as tfds

  features = builder(name, data_dir).info.features
  if label_key not in features:
    raise DataError(
      f'dataset {name!r} has no feature {label_key!r}; its features: {", ".join(sorted(features))}'
    )
  feature = features[label_key]
  return feature.num_classes if isinstance(feature, tfds.features.ClassLabel) else None


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
  source = open_source(name, split, data_dir)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(f'split {split!r} of dataset {name!r} is empty')
  key = next((k for k in INPUT_KEYS if k in records[0]), None)
  if key is None or 'label' not in records[0]:
    raise DataError(
      f'dataset {name!r} records have keys {sorted(records[0])}; bigjax expects one '
      f'of {INPUT_KEYS} and "label"'
    )
  inputs = _stack(name, split, [r[key] for r in records])
  labels = np.asarray([r['label'] for r in records], np.int32)
  return {'inputs': inputs, 'label': labels}


def _stack(name, split, values):
  """np.stack that names the first record whose shape or dtype differs from record 0."""
  first = np.asarray(values[0])
  for i, v in enumerate(values):
    v = np.asarray(v)
    if v.shape != first.shape or v.dtype != first.dtype:
      raise DataError(
        f'dataset {name!r} split {split!r} record {i}: shape {v.shape} dtype {v.dtype}, '
        f'expected {first.shape} {first.dtype} like record 0'
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


@dataclasses.dataclass
class TrainBatches:
  """Process-local training batches, a pure function of the step.

  arrays: the split, {'inputs': (N, ...), 'label': (N,)}; batch_size: the global batch size.
  `batch(step)` returns this process's rows: {'inputs': (B/P, ...), 'label': (B/P,)}.
  """

  arrays: dict
  batch_size: int
  seed: int

  def __post_init__(self):
    n = len(self.arrays['inputs'])
    self.steps_per_epoch = n // self.batch_size
    if self.steps_per_epoch == 0:
      raise DataError(
        f'config.batch_size={self.batch_size} is larger than the training split '
        f'({n} examples); lower config.batch_size'
      )
    procs = jax.process_count()
    self._rows = slice(
      jax.process_index() * self.batch_size // procs,
      (jax.process_index() + 1) * self.batch_size // procs,
    )
    self._epoch, self._perm = None, None

  def batch(self, step: int) -> dict:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.arrays['inputs']))
    idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size][self._rows]
    return {k: v[idx] for k, v in self.arrays.items()}


def eval_batches(arrays: dict, batch_size: int) -> Iterator[dict]:
  """Yields process-local eval batches covering every example once.

  The last batch is padded to `batch_size`; batch['mask'] (B/P,) is 1.0 on real examples.
  """
  n = len(arrays['inputs'])
  procs, pid = jax.process_count(), jax.process_index()
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    rows = slice(pid * batch_size // procs, (pid + 1) * batch_size // procs)
    batch = {k: v[idx[rows]] for k, v in arrays.items()}
    batch['mask'] = mask[rows]
    yield batch
