"""Views: how a text split (its texts, read whole into host memory) becomes host numpy arrays.

A view is chosen by name (`config.data.view`) through `VIEWS`; each gives a dict of int32 arrays
whose first axis is the example, ready for `pipeline.TrainBatches` / `eval_batches` (lengths below
are in tokens, which for the 'bytes' tokenizer are bytes):
  'lm'              lm_examples: {'inputs': (N, seq_len + 1)}; a causal LM predicts
                    inputs[:, 1:] from inputs[:, :-1].
  'classification'  genre_examples: {'inputs': (N, seq_len) starting with CLS, 'label': (N,)}:
                    passages of each text, labelled with the text's label (a Shakespeare work's
                    genre; a review's or sentence's own label for catalog datasets).
  'pairs'           pair_examples: {'inputs', 'segment_ids': (N, seq_len), 'label': (N,) is_next}:
                    BERT-style [CLS] A [SEP] B [SEP] PAD... for next-segment prediction (and, with
                    MASK, masked-LM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import re

from absl import logging
import numpy as np

from bigjax import registry
from bigjax.data import tokenizers
from bigjax.data.tokenizers import BYTES, Text, Tokenizer
from bigjax.errors import DataError, UserError

# Passages per work in the Shakespeare 'classification' view: evenly spaced through the work, so a
# long play adds at most this many (at seq_len=256 the longest play has ~680 passages, the shortest
# poem 8). Catalog datasets take one passage (the first seq_len - 1 tokens) per review or sentence.
MAX_PASSAGES_PER_WORK = 128
# A view's classes when they are the dataset's label feature's (see View.num_classes).
DATASET_LABELS = 'dataset'


@dataclasses.dataclass(frozen=True)
class View:
  """A registered view.

  make(texts, labels, seq_len, seed, tokenizer, max_per_text) -> arrays (see the module doc);
  min_seq_len: the shortest seq_len it accepts; num_classes: classes of its 'label' array, an int,
  DATASET_LABELS (the dataset's label feature) or None (no labels).
  """

  make: Callable[..., dict]
  min_seq_len: int
  num_classes: int | str | None


VIEWS = registry.Registry('text views', 'config.data.view')


def check_seq_len(seq_len: int, minimum: int) -> None:
  """Raises UserError unless seq_len is an integer >= minimum."""
  if int(seq_len) != seq_len or seq_len < minimum:
    raise UserError(
      f'seq_len={seq_len} is too short for this view; use an integer >= {minimum} '
      '(e.g. config.data.seq_len=256)'
    )


def lm_examples(texts: Sequence[Text], seq_len: int, tokenizer: Tokenizer = BYTES) -> dict:
  """Causal-LM windows over the texts concatenated (joined by a newline).

  texts: sequence of str/bytes. Window i is tokens[i*seq_len : i*seq_len + seq_len + 1], so
  consecutive windows share one token and every token after the first is a target exactly once; the
  tail shorter than a window is dropped. Returns {'inputs': (N, seq_len + 1) int32}.
  """
  check_seq_len(seq_len, 1)
  tokens = tokenizer.encode(b'\n'.join(tokenizers.as_bytes(t) for t in texts))
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise DataError(
      f'the texts hold {len(tokens)} tokens, fewer than one window of seq_len + 1 = '
      f'{seq_len + 1}; lower seq_len'
    )
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
  return {'inputs': tokens[idx]}


def genre_examples(
  texts: Sequence[Text],
  genres: np.ndarray,
  seq_len: int,
  max_per_work: int | None = MAX_PASSAGES_PER_WORK,
  tokenizer: Tokenizer = BYTES,
) -> dict:
  """Labelled passages: [CLS] + seq_len - 1 tokens of one text, labelled with that text's label.

  texts: sequence of str/bytes; genres: (len(texts),) int labels. Each text is cut into
  non-overlapping passages of seq_len - 1 tokens; the partial tail is dropped, except that a text
  shorter than one passage gives one passage padded with PAD. Of a text's passages at most
  `max_per_work` (None: all) are kept, evenly spaced from its first to its last, so long works do
  not dominate. With max_per_work=1 (one example per review or sentence) a longer text is
  truncated to its first seq_len - 1 tokens, the standard choice for fine-tuning classifiers; a
  one-line warning counts those texts. Returns {'inputs': (N, seq_len) int32, 'label': (N,)
  int32}, texts in order.
  """
  check_seq_len(seq_len, 2)
  genres = np.asarray(genres).reshape(-1)
  if len(genres) != len(texts):
    raise DataError(f'{len(texts)} texts but {len(genres)} labels; pass one label per text')
  width = seq_len - 1
  rows, labels = [], []
  truncated = 0
  for text, genre in zip(texts, genres):
    tokens = tokenizer.encode(text)
    truncated += max_per_work == 1 and len(tokens) > width
    n = len(tokens) // width
    if n == 0:
      starts = np.zeros(1 if len(tokens) else 0, np.int64)
    else:
      keep = n if max_per_work is None else min(n, max_per_work)
      starts = width * np.unique(np.linspace(0, n - 1, keep).round().astype(int))
    for start in starts:
      passage = tokens[start : start + width]
      rows.append(
        np.concatenate([[tokenizer.cls], passage, np.full(width - len(passage), tokenizer.pad)])
      )
      labels.append(genre)
  if not rows:
    raise DataError('the texts are empty: no passage to classify')
  if truncated:
    logging.warning(
      'classification view: %d of %d texts are longer than seq_len - 1 = %d tokens and keep only '
      'their first %d (truncated); raise config.data.seq_len to keep more of each',
      truncated,
      len(texts),
      width,
      width,
    )
  return {'inputs': np.stack(rows).astype(np.int32), 'label': np.asarray(labels, np.int32)}


def segments(text: Text, min_bytes: int, length: Callable[[bytes], int] = len) -> list[bytes]:
  """A text's line groups: blank-line separated paragraphs (a speech, a stanza, a stage direction),
  consecutive ones merged until each holds >= min_bytes bytes (the last may hold fewer); `length`
  measures a group (e.g. in tokens instead of bytes). Returns a list of bytes, in text order."""
  out, current = [], b''
  for paragraph in re.split(rb'\n[ \t]*\n', tokenizers.as_bytes(text).strip()):
    paragraph = paragraph.strip(b'\n')
    if not paragraph:
      continue
    current = current + b'\n\n' + paragraph if current else paragraph
    if length(current) >= min_bytes:
      out.append(current)
      current = b''
  if current:
    out.append(current)
  return out


def pair_examples(
  texts: Sequence[Text], seq_len: int, seed: int, tokenizer: Tokenizer = BYTES
) -> dict:
  """BERT-style segment pairs for next-segment prediction.

  The texts are cut into `segments` of >= (seq_len - 3) // 4 tokens. Every segment A that has a
  successor in its own text makes one pair: with probability 1/2 B is that successor (label 1),
  otherwise B is a uniformly random segment, of any text, other than A and its successor (label 0).
  The pair is truncated to fit by trimming the longer side, A from its start and B from its end (the
  A|B boundary is kept). Row: [CLS] A [SEP] B [SEP] PAD...; segment_ids are 0 over [CLS] A [SEP],
  1 over B [SEP], 0 over padding. Deterministic given `seed`.
  Returns {'inputs': (N, seq_len) int32, 'segment_ids': (N, seq_len) int32, 'label': (N,) int32}.
  """
  check_seq_len(seq_len, 8)
  budget = seq_len - 3
  segs, firsts = [], []  # firsts[i]: whether segment i has a successor in its own text
  length: Callable[[bytes], int] = len
  if not isinstance(tokenizer, tokenizers.ByteTokenizer):
    length = lambda group: len(tokenizer.encode(group))
  for text in texts:
    parts = segments(text, budget // 4, length)
    segs.extend(parts)
    firsts.extend([True] * (len(parts) - 1) + [False] * min(len(parts), 1))
  anchors = np.flatnonzero(firsts)
  if len(anchors) == 0 or len(segs) < 3:
    raise DataError(
      f'the texts give {len(segs)} segments and no two consecutive ones; pair '
      'examples need texts of several blank-line separated paragraphs'
    )
  rng = np.random.default_rng(seed)
  is_next = rng.random(len(anchors)) < 0.5
  r = rng.integers(0, len(segs) - 2, size=len(anchors))  # uniform over segments other than i, i+1
  others = np.where(r < anchors, r, r + 2)
  inputs = np.full((len(anchors), seq_len), tokenizer.pad, np.int32)
  segment_ids = np.zeros((len(anchors), seq_len), np.int32)
  for row, (i, nxt, other) in enumerate(zip(anchors, is_next, others)):
    a, b = tokenizer.encode(segs[i]), tokenizer.encode(segs[i + 1] if nxt else segs[other])
    keep_a = min(len(a), max(budget // 2, budget - len(b)))
    keep_b = min(len(b), budget - keep_a)
    a, b = a[len(a) - keep_a :], b[:keep_b]
    tokens = np.concatenate([[tokenizer.cls], a, [tokenizer.sep], b, [tokenizer.sep]])
    inputs[row, : len(tokens)] = tokens
    segment_ids[row, keep_a + 2 : len(tokens)] = 1
  return {'inputs': inputs, 'segment_ids': segment_ids, 'label': is_next.astype(np.int32)}


# The registered views, one uniform signature: make(texts, labels (N,) int32 or None, seq_len,
# seed, tokenizer, max_per_text) -> arrays.


def _lm(texts, labels, seq_len, seed, tokenizer, max_per_text):
  return lm_examples(texts, seq_len, tokenizer)


def _classification(texts, labels, seq_len, seed, tokenizer, max_per_text):
  return genre_examples(texts, labels, seq_len, max_per_text, tokenizer)


def _pairs(texts, labels, seq_len, seed, tokenizer, max_per_text):
  return pair_examples(texts, seq_len, seed, tokenizer)


VIEWS.add('lm', View(_lm, min_seq_len=2, num_classes=None))
VIEWS.add('classification', View(_classification, min_seq_len=2, num_classes=DATASET_LABELS))
VIEWS.add('pairs', View(_pairs, min_seq_len=8, num_classes=2))
