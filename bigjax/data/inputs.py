"""config.data -> the run's train batches (by step) and eval batches, through bigjax.data.loader.

`config.data.load` says where grain reads records from:
  'memory'  the split is read once into host arrays (`experiment.load_data`: text views, cross-
            validation folds and standardization need the whole split) and grain gathers each
            batch's rows from them; `Splits.train_arrays` / `eval_arrays` are those arrays.
  'stream'  grain reads each step's records from the source (sources.open_split: TFDS array_record,
            a `bigjax-prepare` folder, a HuggingFace save_to_disk folder) and turns each into an
            example in its map operations (decode, crop, flip: bigjax.data.images); host memory
            does not grow with the dataset, and the arrays are not available (`NotInMemory`).
  'auto'    'stream' for encoded images (config.data.image_size > 0) and splits larger than
            MEMORY_LIMIT_BYTES on disk, else 'memory'.
Either way batch(s) is a pure function of (seed, s) and the batches of the two modes are equal for
a dataset both can read (tests/test_data_resume.py). config.data.image_size > 0 (decode and crop
each image to one size) needs 'stream' or 'auto': 'memory' reads records as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
from typing import Any

import numpy as np

from bigjax.data import images, loader, sources
from bigjax.errors import DataError, UserError

LOADS = ('auto', 'memory', 'stream')  # config.data.load
MEMORY_LIMIT_BYTES = 1 << 30  # 'auto' streams splits larger than this on disk
INPUT_KEYS = ('image', 'features')  # the first present becomes batch['inputs']


class NotInMemory(Mapping):
  """Stands for a streamed split's host arrays: any access is a UserError naming the fix."""

  def __init__(self, what: str):
    self._what = what

  def _refuse(self):
    raise UserError(
      f'{self._what} is streamed (config.data.load=stream), not held in host memory; this needs '
      "the whole split as arrays: set config.data.load='memory' (small datasets only)"
    )

  def __getitem__(self, key):
    self._refuse()

  def __iter__(self) -> Iterator[str]:
    self._refuse()
    return iter(())

  def __len__(self) -> int:
    self._refuse()
    return 0

  def get(self, key, default=None):
    self._refuse()


@dataclasses.dataclass
class Splits:
  """What build() needs of the data: host arrays (memory mode) or NotInMemory, the batches, the
  shape of one label, and a batch of one example (shapes for initialisation)."""

  train_arrays: Any  # dict[str, np.ndarray] in memory mode, else NotInMemory
  eval_arrays: Any
  eval_name: str
  train: loader.TrainBatches
  evals: loader.EvalBatches
  label_shape: tuple[int, ...]
  sample: dict[str, np.ndarray]
  check_train: dict[str, np.ndarray]  # what task.check_data sees: the split, or batch 0
  check_eval: dict[str, np.ndarray]


def options(config) -> loader.Options:
  d = config.data
  return loader.Options(d.workers, d.threads, d.prefetch, d.device_prefetch)


def check(config) -> None:
  """UserError for config.data.load and the fields streaming cannot serve."""
  d = config.data
  if d.load not in LOADS:
    raise UserError(f'config.data.load={d.load!r} is unknown; use one of {", ".join(LOADS)}')
  if d.pack:
    if d.view != 'lm':
      raise UserError(
        f"config.data.pack=True packs causal-LM windows: it needs config.data.view='lm', not "
        f'{d.view!r}; set config.data.pack=False'
      )
    for field, on in (('cv_folds', d.cv_folds), ('standardize', d.standardize)):
      if on:
        raise UserError(f'config.data.pack=True cannot take config.data.{field}; turn it off')
  if d.load == 'memory' and d.image_size > 0:
    raise UserError(
      f"config.data.image_size={d.image_size} decodes and crops images per example while "
      "streaming; config.data.load='memory' reads records as they are and would ignore it: set "
      "config.data.load='stream' (or 'auto'), or config.data.image_size=0"
    )
  if d.load == 'stream' and not d.pack:
    for field, on in (('cv_folds', d.cv_folds), ('standardize', d.standardize)):
      if on:
        raise UserError(
          f"config.data.{field} needs the whole split in memory; set config.data.load='memory' "
          f'(or turn {field} off)'
        )
    if d.view:
      raise UserError(
        f"config.data.view={d.view!r} builds its examples from whole texts in memory; set "
        "config.data.load='memory' (or 'auto')"
      )


def streams(config) -> bool:
  """Whether config.data.load (after 'auto') reads records per step from the source."""
  d = config.data
  check(config)
  if d.load != 'auto':
    return d.load == 'stream'
  if d.view or d.cv_folds or d.standardize:
    return False
  if d.image_size > 0:
    return True
  return sources.split_bytes(d.name, d.train_split, d.data_dir) > MEMORY_LIMIT_BYTES


def build(config, tokenizer, load_data: Callable) -> Splits:
  """The run's Splits: streamed (see `streams`) or read by load_data(config, tokenizer) ->
  (train arrays, eval arrays, eval split name)."""
  if config.data.pack:
    return _packed(config, tokenizer)
  if streams(config):
    return _streamed(config)
  train, evals, eval_name = load_data(config, tokenizer)
  opts = options(config)
  batches = loader.TrainBatches(train, config.batch_size, config.seed, options=opts)
  label_shape = tuple(train['label'].shape[1:]) if 'label' in train else ()
  return Splits(
    train,
    evals,
    eval_name,
    batches,
    loader.EvalBatches(evals, config.eval_batch_size, options=opts),
    label_shape,
    {k: v[:1] for k, v in train.items()},
    train,
    evals,
  )


def _input_key(name: str, feats: Mapping[str, sources.Feature]) -> str:
  key = next((k for k in INPUT_KEYS if k in feats), None)
  if key is None or 'label' not in feats:
    raise DataError(
      f'dataset {name!r} records have features {sorted(feats)}; bigjax expects one of '
      f'{INPUT_KEYS} and "label" (or a text dataset with config.data.view)'
    )
  return key


def to_example(
  record: dict[str, Any],
  rng: np.random.Generator | None,
  index: int,
  *,
  key: str,
  where: str,
  image_size: int,
  channels: int,
  flip: bool,
) -> dict[str, np.ndarray]:
  """A record -> {'inputs', 'label'}: images decoded and cropped (train: inception crop + flip
  with rng; eval, rng None: resize + centre crop) when image_size > 0; arrays as they are."""
  value = record[key]
  if key == 'image' and (image_size > 0 or isinstance(value, (bytes, np.bytes_))):
    image = images.decode(value, channels, f'{where} record {index}')
    if image_size <= 0:
      value = np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], channels)
    elif rng is None:
      value = images.center_crop(image, image_size, channels)
    else:
      value = images.inception_crop(image, image_size, rng, channels, flip)
  else:
    value = np.asarray(value)
    if key == 'features':
      value = value.astype(np.float32)
  return {'inputs': value, 'label': np.asarray(record['label'], np.int32)}


def _streamed(config) -> Splits:
  d = config.data
  feats = sources.features(d.name, d.data_dir)
  key = _input_key(d.name, feats)
  shape = feats[key].shape
  if feats[key].kind == 'image' and d.image_size <= 0 and not (shape and None not in shape):
    raise UserError(
      f'dataset {d.name!r} holds images of any size; set config.data.image_size (e.g. 224) to '
      'decode, crop and resize them'
    )
  channels = int(shape[-1]) if shape and shape[-1] in (1, 3) else 3
  opts = options(config)

  def transform(split: str, train: bool) -> loader.Transform:
    fn = functools.partial(
      to_example,
      key=key,
      where=f'dataset {d.name!r} split {split!r}',
      image_size=d.image_size,
      channels=channels,
      flip=d.image_flip,
    )
    return loader.Transform(fn, random=train and d.image_size > 0)

  train_source = sources.open_split(d.name, d.train_split, d.data_dir)
  eval_source = sources.open_split(d.name, d.eval_split, d.data_dir)
  if d.eval_max_examples:
    eval_source = sources.SliceSource(eval_source, 0, min(d.eval_max_examples, len(eval_source)))
  batches = loader.TrainBatches(
    train_source, config.batch_size, config.seed, transform(d.train_split, True), opts
  )
  evals = loader.EvalBatches(
    eval_source, config.eval_batch_size, transform(d.eval_split, False), opts
  )
  first = batches.batch(0)
  sample = {k: v[:1] for k, v in first.items()}
  eval_first = evals.dataset[0]
  return Splits(
    NotInMemory(f'dataset {d.name!r} split {d.train_split!r}'),
    NotInMemory(f'dataset {d.name!r} split {d.eval_split!r}'),
    d.eval_split,
    batches,
    evals,
    tuple(first['label'].shape[1:]),
    sample,
    first,
    {k: v for k, v in eval_first.items() if k != 'mask'},
  )


def _packed(config, tokenizer) -> Splits:
  """config.data.pack: packed LM windows of both splits (bigjax.data.packing), streamed from
  their token stores; batches {'inputs', 'segment_ids', 'positions'}: (B, seq_len + 1) int32."""
  from bigjax.data import packing  # imports text -> pipeline -> this module

  check(config)
  d = config.data
  opts = options(config)
  train_source = packing.windows(config, tokenizer, d.train_split)
  eval_source: sources.Source = packing.windows(config, tokenizer, d.eval_split)
  if d.eval_max_examples:
    eval_source = sources.SliceSource(eval_source, 0, min(d.eval_max_examples, len(eval_source)))
  batches = loader.TrainBatches(train_source, config.batch_size, config.seed, options=opts)
  evals = loader.EvalBatches(eval_source, config.eval_batch_size, options=opts, label_key=None)
  first = batches.batch(0)
  return Splits(
    NotInMemory(f'dataset {d.name!r} split {d.train_split!r}'),
    NotInMemory(f'dataset {d.name!r} split {d.eval_split!r}'),
    d.eval_split,
    batches,
    evals,
    (),
    {k: v[:1] for k, v in first.items()},
    first,
    {k: v[None] for k, v in eval_source[0].items()},
  )
