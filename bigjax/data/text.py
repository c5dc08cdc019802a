"""Byte-level text tokenizer, and the views that turn a text split into host numpy arrays.

Token ids 0..255 are the bytes of the UTF-8 text; four specials follow: PAD=256, CLS=257, SEP=258,
MASK=259 (VOCAB_SIZE=260). No vocabulary file, nothing to train: every text round-trips exactly.

A split (its texts, read whole into host memory) becomes one of three views, each a dict of int32
arrays whose first axis is the example, ready for `pipeline.TrainBatches` / `eval_batches`:
  'lm'              lm_examples: {'inputs': (N, seq_len + 1)}; a causal LM predicts
                    inputs[:, 1:] from inputs[:, :-1].
  'classification'  genre_examples: {'inputs': (N, seq_len) starting with CLS, 'label': (N,)}:
                    passages of each text, labelled with the text's label (a Shakespeare work's
                    genre; a review's or sentence's own label for catalog datasets).
  'pairs'           pair_examples: {'inputs', 'segment_ids': (N, seq_len), 'label': (N,) is_next}:
                    BERT-style [CLS] A [SEP] B [SEP] PAD... for next-segment prediction (and, with
                    MASK, masked-LM).
`load_text_split(name, split, view, seq_len)` reads a split through TFDS (offline builders are
prepared on first use, catalog sets must already be prepared; nothing is downloaded) and applies the
view.
"""
import dataclasses
import re

import numpy as np

from bigjax.data import pipeline
from bigjax.errors import DataError, UserError

PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260
VIEWS = ('lm', 'classification', 'pairs')
# Passages per work in the Shakespeare 'classification' view: evenly spaced through the work, so a
# long play adds at most this many (at seq_len=256 the longest play has ~680 passages, the shortest
# poem 8). Catalog datasets take one passage (the first seq_len - 1 bytes) per review or sentence.
MAX_PASSAGES_PER_WORK = 128


def _as_bytes(text):
  return text.encode('utf-8') if isinstance(text, str) else bytes(text)


def encode(text):
  """str (UTF-8 encoded) or bytes -> (L,) int32 token ids in 0..255, one per byte."""
  return np.frombuffer(_as_bytes(text), np.uint8).astype(np.int32)


def decode(ids):
  """(L,) token ids -> str; special ids (>= 256) are dropped, invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids).reshape(-1)
  return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


def _check_seq_len(seq_len, minimum):
  if int(seq_len) != seq_len or seq_len < minimum:
    raise UserError(f'seq_len={seq_len} is too short for this view; use an integer >= {minimum} '
                    '(e.g. config.data.seq_len=256)')


def lm_examples(texts, seq_len):
  """Causal-LM windows over the texts concatenated (joined by a newline).

  texts: sequence of str/bytes. Window i is tokens[i*seq_len : i*seq_len + seq_len + 1], so
  consecutive windows share one byte and every byte after the first is a target exactly once; the
  tail shorter than a window is dropped. Returns {'inputs': (N, seq_len + 1) int32}.
  """
  _check_seq_len(seq_len, 1)
  tokens = encode(b'\n'.join(_as_bytes(t) for t in texts))
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise DataError(f'the texts hold {len(tokens)} bytes, fewer than one window of seq_len + 1 = '
                    f'{seq_len + 1}; lower seq_len')
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
  return {'inputs': tokens[idx]}


def genre_examples(texts, genres, seq_len, max_per_work=MAX_PASSAGES_PER_WORK):
  """Labelled passages: [CLS] + seq_len - 1 bytes of one text, labelled with that text's label.

  texts: sequence of str/bytes; genres: (len(texts),) int labels. Each text is cut into
  non-overlapping passages of seq_len - 1 bytes; the partial tail is dropped, except that a text
  shorter than one passage gives one passage padded with PAD. Of a text's passages at most
  `max_per_work` (None: all) are kept, evenly spaced from its first to its last, so long works do
  not dominate. Returns {'inputs': (N, seq_len) int32, 'label': (N,) int32}, texts in order.
  """
  _check_seq_len(seq_len, 2)
  genres = np.asarray(genres).reshape(-1)
  if len(genres) != len(texts):
    raise DataError(f'{len(texts)} texts but {len(genres)} labels; pass one label per text')
  width = seq_len - 1
  rows, labels = [], []
  for text, genre in zip(texts, genres):
    tokens = encode(text)
    n = len(tokens) // width
    if n == 0:
      starts = [0] if len(tokens) else []
    else:
      keep = n if max_per_work is None else min(n, max_per_work)
      starts = width * np.unique(np.linspace(0, n - 1, keep).round().astype(int))
    for start in starts:
      passage = tokens[start:start + width]
      rows.append(np.concatenate([[CLS], passage, np.full(width - len(passage), PAD)]))
      labels.append(genre)
  if not rows:
    raise DataError('the texts are empty: no passage to classify')
  return {'inputs': np.stack(rows).astype(np.int32), 'label': np.asarray(labels, np.int32)}


def segments(text, min_bytes):
  """A text's line groups: blank-line separated paragraphs (a speech, a stanza, a stage direction),
  consecutive ones merged until each holds >= min_bytes bytes (the last may hold fewer).
  Returns a list of bytes, in text order."""
  out, current = [], b''
  for paragraph in re.split(rb'\n[ \t]*\n', _as_bytes(text).strip()):
    paragraph = paragraph.strip(b'\n')
    if not paragraph:
      continue
    current = current + b'\n\n' + paragraph if current else paragraph
    if len(current) >= min_bytes:
      out.append(current)
      current = b''
  if current:
    out.append(current)
  return out


def pair_examples(texts, seq_len, seed):
  """BERT-style segment pairs for next-segment prediction.

  The texts are cut into `segments` of >= (seq_len - 3) // 4 bytes. Every segment A that has a
  successor in its own text makes one pair: with probability 1/2 B is that successor (label 1),
  otherwise B is a uniformly random segment, of any text, other than A and its successor (label 0).
  The pair is truncated to fit by trimming the longer side, A from its start and B from its end (the
  A|B boundary is kept). Row: [CLS] A [SEP] B [SEP] PAD...; segment_ids are 0 over [CLS] A [SEP],
  1 over B [SEP], 0 over padding. Deterministic given `seed`.
  Returns {'inputs': (N, seq_len) int32, 'segment_ids': (N, seq_len) int32, 'label': (N,) int32}.
  """
  _check_seq_len(seq_len, 8)
  budget = seq_len - 3
  segs, firsts = [], []  # firsts[i]: whether segment i has a successor in its own text
  for text in texts:
    parts = segments(text, budget // 4)
    segs.extend(parts)
    firsts.extend([True] * (len(parts) - 1) + [False] * min(len(parts), 1))
  anchors = np.flatnonzero(firsts)
  if len(anchors) == 0 or len(segs) < 3:
    raise DataError(f'the texts give {len(segs)} segments and no two consecutive ones; pair '
                    'examples need texts of several blank-line separated paragraphs')
  rng = np.random.default_rng(seed)
  is_next = rng.random(len(anchors)) < 0.5
  r = rng.integers(0, len(segs) - 2, size=len(anchors))  # uniform over segments other than i, i+1
  others = np.where(r < anchors, r, r + 2)
  inputs = np.full((len(anchors), seq_len), PAD, np.int32)
  segment_ids = np.zeros((len(anchors), seq_len), np.int32)
  for row, (i, nxt, other) in enumerate(zip(anchors, is_next, others)):
    a, b = encode(segs[i]), encode(segs[i + 1] if nxt else segs[other])
    keep_a = min(len(a), max(budget // 2, budget - len(b)))
    keep_b = min(len(b), budget - keep_a)
    a, b = a[len(a) - keep_a:], b[:keep_b]
    tokens = np.concatenate([[CLS], a, [SEP], b, [SEP]])
    inputs[row, :len(tokens)] = tokens
    segment_ids[row, keep_a + 2:len(tokens)] = 1
  return {'inputs': inputs, 'segment_ids': segment_ids, 'label': is_next.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """How to read a TFDS text dataset: its text and label features and the views it supports."""
  text_key: str
  label_key: str | None
  views: tuple
  max_per_text: int | None  # passages per text in the 'classification' view
  sort_key: str | None = None  # records sorted by this feature (else data-source order)


TEXT_DATASETS = {
    'shakespeare': TextDataset('text', 'genre', VIEWS, MAX_PASSAGES_PER_WORK, sort_key='id'),
    'lm1b': TextDataset('text', None, ('lm',), None),
    'imdb_reviews': TextDataset('text', 'label', ('lm', 'classification'), 1),
    'glue/sst2': TextDataset('sentence', 'label', ('lm', 'classification'), 1),
}


def _text_dataset(name, view=None):
  if name not in TEXT_DATASETS:
    raise DataError(f'config.data.name={name!r} is not a known text dataset; text datasets: '
                    f'{", ".join(TEXT_DATASETS)} (add one to bigjax.data.text.TEXT_DATASETS)')
  dataset = TEXT_DATASETS[name]
  if view is not None and view not in dataset.views:
    raise UserError(f'view {view!r} is not available for dataset {name!r}; its views: '
                    f'{", ".join(dataset.views)}')
  return dataset


def load_texts(name, split, data_dir=None):
  """Reads a text split whole: (texts, labels) with texts a list of bytes and labels (N,) int32
  (None for unlabelled datasets). Offline datasets are prepared on first use; nothing downloads."""
  dataset = _text_dataset(name)
  if name.startswith('glue/'):
    import tensorflow_datasets.text  # noqa: F401  registers glue (not registered by `import tfds`)
  source = pipeline._open(name, split, data_dir)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(f'split {split!r} of dataset {name!r} is empty')
  missing = {dataset.text_key, dataset.label_key} - {None} - set(records[0])
  if missing:
    raise DataError(f'dataset {name!r} records have keys {sorted(records[0])}, not '
                    f'{sorted(missing)}; fix its entry in bigjax.data.text.TEXT_DATASETS')
  if dataset.sort_key:
    records.sort(key=lambda r: _as_bytes(r[dataset.sort_key]))
  texts = [_as_bytes(r[dataset.text_key]) for r in records]
  labels = None
  if dataset.label_key:
    labels = np.asarray([r[dataset.label_key] for r in records], np.int32)
  return texts, labels


def load_text_split(name, split, view, seq_len, data_dir=None, seed=0):
  """A text split as host arrays in one of VIEWS (see the module docstring for the shapes).

  name: a key of TEXT_DATASETS ('shakespeare', 'lm1b', 'imdb_reviews', 'glue/sst2'); split: a TFDS
  split string; seed: used by the 'pairs' view only.
  """
  dataset = _text_dataset(name, view)
  _check_seq_len(seq_len, 8 if view == 'pairs' else 2)
  texts, labels = load_texts(name, split, data_dir)
  if view == 'lm':
    return lm_examples(texts, seq_len)
  if view == 'classification':
    return genre_examples(texts, labels, seq_len, max_per_work=dataset.max_per_text)
  return pair_examples(texts, seq_len, seed)
