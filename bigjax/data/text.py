"""Text datasets: from a TFDS name to a view's host arrays.

`TEXT_DATASETS` names the TFDS text datasets bigjax reads (`config.data.name`) and how: their text
and label features and the views they support. `load_text_split(name, split, view, seq_len, ...,
tokenizer='bytes', vocab_size=0)` reads a split whole through TFDS (offline builders are prepared
on first use, catalog sets must already be prepared; nothing is downloaded), tokenizes it with
`dataset_tokenizer` (bigjax.data.tokenizers) and applies the view (bigjax.data.text_views: 'lm',
'classification', 'pairs'). `label_count` is the number of classes of a view's labels. A
tokenizer is trained on `sample_texts` (a bounded sample read by random access), so a C4-sized
train split is never read whole; packed LM training (bigjax.data.packing) streams it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import re

import numpy as np

from bigjax import registry
from bigjax.data import caches, pipeline, sources, text_views, tokenizers
from bigjax.errors import DataError, UserError

# The byte tokenizer's ids, for callers outside bigjax/data that still read them from here; new
# code imports them from bigjax.data.tokenizers.

ALL_VIEWS = ('lm', 'classification', 'pairs')
# A `dir:` / `hf:` record feature of token ids (uint16 / uint32 arrays): a pre-tokenized dataset,
# read by config.data.pack=True (bigjax.data.packing) instead of tokenizing text.
PRETOKENIZED_KEY = 'tokens'


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """How to read a TFDS text dataset: its text and label features and the views it supports."""

  text_key: str
  label_key: str | None
  views: tuple
  max_per_text: int | None  # passages per text in the 'classification' view
  sort_key: str | None = None  # records sorted by this feature (else data-source order)
  module: str | None = None  # imported first: registers the builder (glue is not by `import tfds`)


TEXT_DATASETS = registry.Registry('text datasets', 'config.data.name')
TEXT_DATASETS.add(
  'shakespeare',
  TextDataset('text', 'genre', ALL_VIEWS, text_views.MAX_PASSAGES_PER_WORK, sort_key='id'),
)
TEXT_DATASETS.add('lm1b', TextDataset('text', None, ('lm',), None))
# C4 and its variants ('c4/en', 'c4/realnewslike', ...): an entry also names its variants.
TEXT_DATASETS.add(
  'c4', TextDataset('text', None, ('lm',), None, module='tensorflow_datasets.text.c4')
)
TEXT_DATASETS.add('imdb_reviews', TextDataset('text', 'label', ('lm', 'classification'), 1))
TEXT_DATASETS.add(
  'glue/sst2',
  TextDataset('sentence', 'label', ('lm', 'classification'), 1, module='tensorflow_datasets.text'),
)


def _own_text_dataset(name: str) -> TextDataset | None:
  """The TextDataset of a `dir:` / `hf:` dataset with a text feature (its first), labelled by its
  'label' class feature when it has one; None for other names."""
  if sources.parse_name(name)[0] == 'tfds':
    return None
  feats = sources.features(name)
  text_key = next((k for k, f in feats.items() if f.kind == 'text'), None)
  if text_key is None and PRETOKENIZED_KEY in feats:  # token ids (config.data.pack reads them)
    text_key = PRETOKENIZED_KEY
  if text_key is None:
    raise UserError(
      f'dataset {name!r} has no text feature (its features: {", ".join(sorted(feats))}); '
      "config.data.view needs one; set config.data.view=''"
    )
  labelled = 'label' in feats and feats['label'].kind == 'class_label'
  views = ('lm', 'classification') if labelled else ('lm',)
  return TextDataset(text_key, 'label' if labelled else None, views, None)


def text_key(name: str) -> str:
  """The record feature holding a text dataset's documents: its text, or PRETOKENIZED_KEY."""
  return _text_dataset(name).text_key


def _registered(name: str) -> TextDataset:
  """The TEXT_DATASETS entry of a TFDS name, else of its base name ('c4/en' -> 'c4');
  UserError listing the known names."""
  base = name.split('/')[0]
  return TEXT_DATASETS.get(base if name not in TEXT_DATASETS and base in TEXT_DATASETS else name)


def _text_dataset(name: str, view: str | None = None) -> TextDataset:
  """The entry of `name`, its builder registered with TFDS; checks that it supports `view`."""
  dataset = _own_text_dataset(name) or _registered(name)
  if view is not None:
    text_views.VIEWS.check(view)
    if view not in dataset.views:
      raise UserError(
        f'view {view!r} is not available for dataset {name!r}; its views: '
        f'{", ".join(dataset.views)}'
      )
  if dataset.module:
    importlib.import_module(dataset.module)
  return dataset


def load_texts(
  name: str, split: str, data_dir: str | None = None
) -> tuple[list[bytes], np.ndarray | None]:
  """Reads a text split whole: (texts, labels) with texts a list of N bytes and labels (N,) int32
  (None for unlabelled datasets). Offline datasets are prepared on first use; nothing downloads."""
  dataset = _text_dataset(name)
  source = sources.open_split(name, split, data_dir)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(f'split {split!r} of dataset {name!r} is empty')
  missing = {k for k in (dataset.text_key, dataset.label_key) if k} - set(records[0])
  if missing:
    raise DataError(
      f'dataset {name!r} records have keys {sorted(records[0])}, not '
      f'{sorted(missing)}; fix its entry in bigjax.data.text.TEXT_DATASETS'
    )
  sort_key = dataset.sort_key
  if sort_key:
    records.sort(key=lambda r: tokenizers.as_bytes(r[sort_key]))
  texts = [tokenizers.as_bytes(r[dataset.text_key]) for r in records]
  labels = None
  if dataset.label_key:
    labels = np.asarray([r[dataset.label_key] for r in records], np.int32)
  return texts, labels


# Records read to estimate a split's mean document size before sampling it (sample_texts).
_SIZE_PROBES = 64


def sample_texts(
  name: str,
  split: str,
  data_dir: str | None = None,
  max_bytes: int | None = None,
) -> list[bytes]:
  """About max_bytes of a text split's documents by random access, never reading the split whole:
  a tokenizer's training sample (the whole split when it is smaller). max_bytes: None reads
  tokenizers.SP_MAX_TRAIN_BYTES.

  The mean document size is estimated from _SIZE_PROBES evenly spaced records; then
  ceil(max_bytes / mean) evenly spaced records (a stride through the whole split) are read in a
  fixed (seed 0) random order until max_bytes are gathered, so a sample cut short by a low
  estimate is still spread over the split. Returns the texts in split order, sorted by the
  dataset's sort_key as `load_texts` orders them; host memory holds ~max_bytes plus one document.
  """
  max_bytes = tokenizers.SP_MAX_TRAIN_BYTES if max_bytes is None else max_bytes
  dataset = _text_dataset(name)
  if dataset.text_key == PRETOKENIZED_KEY:
    raise UserError(
      f'dataset {name!r} holds token ids, not text: no tokenizer can be trained on it; set '
      'config.data.tokenizer to the one that made them (its vocabulary: config.data.vocab_size)'
    )
  source = sources.open_split(name, split, data_dir)
  n = len(source)
  if n == 0:
    raise DataError(f'split {split!r} of dataset {name!r} is empty')
  keys = [k for k in (dataset.text_key, dataset.sort_key) if k]

  def read(index: int) -> dict:
    record = source[int(index)]
    if set(keys) - set(record):
      raise DataError(
        f'dataset {name!r} records have keys {sorted(record)}, not {sorted(set(keys) - set(record))}'
        '; fix its entry in bigjax.data.text.TEXT_DATASETS'
      )
    return {k: tokenizers.as_bytes(record[k]) for k in keys}

  def evenly_spaced(count: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))

  probes = evenly_spaced(_SIZE_PROBES)
  mean = max(1.0, sum(len(read(i)[dataset.text_key]) for i in probes) / len(probes))
  chosen = evenly_spaced(math.ceil(max_bytes / mean))
  picked, total = [], 0
  for j in np.random.default_rng(0).permutation(len(chosen)):
    if total >= max_bytes:
      break
    record = read(chosen[j])
    picked.append((int(chosen[j]), record))
    total += len(record[dataset.text_key])
  picked.sort(key=lambda p: p[0])
  records = [r for _, r in picked]
  if dataset.sort_key:
    records.sort(key=lambda r: r[dataset.sort_key])
  return [r[dataset.text_key] for r in records]


def label_count(name: str, view: str, data_dir: str | None = None) -> int | None:
  """Number of classes of the 'label' array of a text dataset's view: for 'classification' the
  dataset's label feature's (4 genres for shakespeare, 2 for imdb_reviews and glue/sst2), for
  'pairs' 2 (is_next), for 'lm' None (no labels). Reads the TFDS builder info, not the data."""
  dataset = _text_dataset(name, view)
  classes = text_views.VIEWS.get(view).num_classes
  if classes == text_views.DATASET_LABELS:
    assert dataset.label_key, f'TEXT_DATASETS[{name!r}] has a labelled view but no label_key'
    return pipeline.num_classes(name, data_dir, dataset.label_key)
  return classes


def tokenizer_cache_dir(name: str, train_split: str = 'train', data_dir: str | None = None) -> str:
  """Where `dataset_tokenizer` keeps the dataset's trained tokenizers (and bigjax.data.packing its
  token stores): beside the data, bigjax_tokenizers/<name>/<version>/<train split> under the TFDS
  data dir (config.data.data_dir, else TFDS's default), or bigjax_tokenizers/<train split> inside a
  `dir:` / `hf:` folder; where that cannot be written (a read-only dataset mount), the same path
  under the user's cache instead (bigjax.data.caches.writable)."""
  _text_dataset(name)
  safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', train_split)
  if safe != train_split:  # 'train[:90%]' and 'train[90%:]' must not share a model
    safe += '-' + hashlib.sha1(train_split.encode()).hexdigest()[:8]
  kind, path = sources.parse_name(name)
  if kind != 'tfds':  # beside the prepared records (a HuggingFace folder: likewise)
    return caches.writable(os.path.join(path, 'bigjax_tokenizers', safe))
  builder = pipeline.builder(name, data_dir)
  # config.data.data_dir when given: the builder's own root is TFDS's metadata folder under
  # tfds.testing.mock_data, which must not collect one test's token stores for the next.
  root = os.path.expanduser(data_dir) if data_dir else builder.data_dir_root
  return caches.writable(os.path.join(root, 'bigjax_tokenizers', name, str(builder.version), safe))


def dataset_tokenizer(
  name: str,
  tokenizer: str = 'bytes',
  vocab_size: int = 0,
  data_dir: str | None = None,
  train_split: str = 'train',
  pretrained_dir: str = '',
) -> tokenizers.Tokenizer:
  """The tokenizer of a text dataset: tokenizers.get_tokenizer(tokenizer, ...) trained on
  a sample of `train_split` only (`sample_texts`: at most SP_MAX_TRAIN_BYTES, never the whole
  split) and cached in `tokenizer_cache_dir` (the split is sampled, and the cache folder looked
  up, only by a tokenizer that needs them and has no cached model), or read from
  `pretrained_dir` (config.init_from.hf) by tokenizer='hf'."""
  return tokenizers.get_tokenizer(
    tokenizer,
    lambda: sample_texts(name, train_split, data_dir),
    vocab_size,
    lambda: tokenizer_cache_dir(name, train_split, data_dir),
    pretrained_dir,
  )


def load_text_split(
  name: str,
  split: str,
  view: str,
  seq_len: int,
  data_dir: str | None = None,
  seed: int = 0,
  tokenizer: str | tokenizers.Tokenizer = 'bytes',
  vocab_size: int = 0,
  train_split: str = 'train',
) -> dict:
  """A text split as host arrays in one of text_views.VIEWS (see bigjax.data.text_views for the
  shapes: e.g. 'lm' {'inputs': (N, seq_len + 1)}, 'classification' {'inputs': (N, seq_len),
  'label': (N,)}, 'pairs' adds 'segment_ids': (N, seq_len)), all int32.

  name: a name in TEXT_DATASETS ('shakespeare', 'lm1b', 'c4/en', ...) or a `dir:` / `hf:` text
  dataset; split: a TFDS split string; seed: used by the 'pairs' view only. tokenizer: 'bytes',
  'sentencepiece' (with vocab_size, trained on `train_split` and cached: see `dataset_tokenizer`)
  or a tokenizer object.
  """
  dataset = _text_dataset(name, view)
  make = text_views.VIEWS.get(view)
  text_views.check_seq_len(seq_len, make.min_seq_len)
  if isinstance(tokenizer, str):
    tokenizer = dataset_tokenizer(name, tokenizer, vocab_size, data_dir, train_split)
  texts, labels = load_texts(name, split, data_dir)
  return make.make(texts, labels, seq_len, seed, tokenizer, dataset.max_per_text)
