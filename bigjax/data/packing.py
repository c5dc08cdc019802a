"""Packed causal-LM windows (config.data.pack): documents tokenized once into a flat token file,
read as windows of seq_len + 1 tokens that carry segment ids and per-document positions.

A split's documents (its records' text, tokenized by the dataset tokenizer, or a pre-tokenized
'tokens' feature of uint16/uint32 ids) are written once, streaming, into a token store:
  DIR/tokens.bin   every document's tokens, concatenated, as uint16 (vocab_size <= 65536) or uint32
  DIR/starts.npy   (D + 1,) int64: document d holds tokens starts[d] .. starts[d + 1] - 1
  DIR/packed.json  {'num_tokens', 'num_documents', 'dtype', 'vocab_size'} (written last: a folder
                   without it is not a store)
Both files are memory-mapped, so host memory does not grow with the dataset, and window i is the
contiguous slice tokens[i * T : i * T + T + 1] (T = seq_len): consecutive windows share one token,
so every token is a model input exactly once and a target at most once (the tail shorter than a
window is dropped). Window i's 'segment_ids' number the document pieces inside it 1, 2, ...; its
'positions' count from 0 at the start of each piece (a document cut by a window boundary restarts
at 0 in the next window, so positions stay below seq_len + 1 whatever a document's length).
A causal LM (bigjax.tasks.causal_lm) masks the targets whose segment differs from their input's
and the model (bigjax.models.gpt) attends only within a segment: no attention and no loss crosses
documents, and a packed document's logits equal those of the document run alone.

Concatenate-then-split (as nanodo and MaxText's default do) rather than first-fit bin packing:
window i is an O(1) slice of the store, so the batch of step s stays a pure function of (seed, s)
(bigjax.data.loader shuffles windows by epoch) and nothing is padded.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator
import hashlib
import json
import os
import shutil

import numpy as np

from bigjax import reporting
from bigjax.data import sources, text, tokenizers
from bigjax.errors import DataError

TOKENS_FILE, STARTS_FILE, INFO_FILE = 'tokens.bin', 'starts.npy', 'packed.json'
TOKENS_KEY = text.PRETOKENIZED_KEY
_PROBE = b'The quick brown fox jumps over 13 lazy dogs.\n'  # tells tokenizers apart
_FLUSH_TOKENS = 1 << 20  # tokens buffered before each write while building a store


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype holding ids in [0, vocab_size): uint16 up to 65536, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_store(
  directory: str, documents: Iterable[np.ndarray], vocab_size: int, where: str
) -> dict:
  """Writes a token store (module doc) from documents, each a 1-D array of token ids, streaming:
  only ~1M tokens and 8 bytes a document are held. Written to a temporary folder renamed into
  place, so concurrent writers (processes of one run) leave one complete store. DataError naming
  the document when an id lies outside [0, vocab_size). Returns the info dict."""
  dtype = token_dtype(vocab_size)
  tmp = f'{directory}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  starts = array.array('q', [0])
  buffered: list[np.ndarray] = []
  pending = 0
  with open(os.path.join(tmp, TOKENS_FILE), 'wb') as f:
    for d, doc in enumerate(documents):
      doc = np.asarray(doc)
      if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
        bad = int(doc[(doc < 0) | (doc >= vocab_size)][0])
        raise DataError(
          f'{where} document {d}: token id {bad} is outside the vocabulary [0, {vocab_size}); '
          'check config.data.tokenizer and config.data.vocab_size'
        )
      buffered.append(doc.astype(dtype))
      pending += doc.size
      starts.append(starts[-1] + doc.size)
      if pending >= _FLUSH_TOKENS:
        f.write(np.concatenate(buffered).tobytes())
        buffered, pending = [], 0
    if buffered:
      f.write(np.concatenate(buffered).tobytes())
  np.save(os.path.join(tmp, STARTS_FILE), np.frombuffer(starts, np.int64))
  info = {
    'num_tokens': int(starts[-1]),
    'num_documents': len(starts) - 1,
    'dtype': dtype.name,
    'vocab_size': vocab_size,
  }
  reporting.write_json_atomic(os.path.join(tmp, INFO_FILE), info)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process finished the same store first
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(directory, INFO_FILE)):
      raise
  return info


class PackedWindows:
  """A token store as a random-access source of windows: len() = (num_tokens - 1) // seq_len;
  [i] -> {'inputs', 'segment_ids', 'positions'}: (seq_len + 1,) int32 each (module doc).

  The memory maps are opened lazily and not pickled (grain's worker processes reopen them)."""

  def __init__(self, directory: str, seq_len: int, where: str):
    self.directory, self.seq_len, self.where = directory, seq_len, where
    with open(os.path.join(directory, INFO_FILE)) as f:
      self.info = json.load(f)
    self._len = max(0, (self.info['num_tokens'] - 1) // seq_len)
    if self._len == 0:
      raise DataError(
        f'{where} holds {self.info["num_tokens"]} tokens, fewer than one window of seq_len + 1 = '
        f'{seq_len + 1}; lower config.data.seq_len'
      )
    self._tokens: np.ndarray | None = None
    self._starts: np.ndarray | None = None

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_tokens': None, '_starts': None}

  def _open(self) -> tuple[np.ndarray, np.ndarray]:
    if self._tokens is None or self._starts is None:
      path = os.path.join(self.directory, TOKENS_FILE)
      self._tokens = np.memmap(path, self.info['dtype'], 'r', shape=(self.info['num_tokens'],))
      self._starts = np.load(os.path.join(self.directory, STARTS_FILE), mmap_mode='r')
    return self._tokens, self._starts

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    tokens, starts = self._open()
    lo = int(index) * self.seq_len
    at = lo + np.arange(self.seq_len + 1)
    docs = np.searchsorted(starts, at, side='right') - 1
    return {
      'inputs': np.asarray(tokens[lo : lo + self.seq_len + 1], np.int32),
      'segment_ids': (docs - docs[0] + 1).astype(np.int32),
      'positions': (at - np.maximum(starts[docs], lo)).astype(np.int32),
    }


def _documents(source: sources.Source, key: str, tokenizer) -> Iterator[np.ndarray]:
  """Each record's token ids: its pre-tokenized `key` array as stored, or its text tokenized."""
  for i in range(len(source)):
    value = source[i][key]
    if key == TOKENS_KEY:
      yield np.asarray(value).reshape(-1)
    else:
      yield tokenizer.encode(tokenizers.as_bytes(value))


def _tokenizer_tag(tokenizer) -> str:
  """A folder name per tokenizer: its name, vocabulary size and a hash of a probe's encoding."""
  digest = hashlib.sha1(np.asarray(tokenizer.encode(_PROBE), np.int64).tobytes()).hexdigest()
  return f'{tokenizer.name}-{tokenizer.vocab_size}-{digest[:8]}'


def windows(config, tokenizer, split: str) -> PackedWindows:
  """The packed windows of `split` of config.data.name, its token store built on first use (one
  streaming pass over the split) in the dataset's tokenizer cache folder and reused after."""
  d = config.data
  where = f'dataset {d.name!r} split {split!r}'
  key = text.text_key(d.name)
  base = text.tokenizer_cache_dir(d.name, d.train_split, d.data_dir)
  safe = hashlib.sha1(split.encode()).hexdigest()[:8]
  directory = os.path.join(base, 'packed', _tokenizer_tag(tokenizer), f'{split}-{safe}')
  if not os.path.exists(os.path.join(directory, INFO_FILE)):
    source = sources.open_split(d.name, split, d.data_dir)
    write_store(directory, _documents(source, key, tokenizer), tokenizer.vocab_size, where)
  return PackedWindows(directory, d.seq_len, where)
