"""Text tokenizers, and the views that turn a text split into host numpy arrays.

Two tokenizers (`get_tokenizer`), both with the four specials at the END of the vocabulary: ids
below `num_regular_tokens = vocab_size - 4` are text, PAD, CLS, SEP, MASK are the last four ids.
  'bytes' (default)  ids 0..255 are the bytes of the UTF-8 text; PAD=256, CLS=257, SEP=258,
                     MASK=259 (VOCAB_SIZE=260). No vocabulary file, nothing to train. The
                     module-level `encode` / `decode` and PAD..MASK, VOCAB_SIZE are this one's.
  'sentencepiece'    a SentencePiece BPE model of vocab_size - 4 pieces (default vocab_size 1024)
                     trained on the dataset's TRAIN split only, with byte fallback, cached on disk
                     next to the TFDS data (see `dataset_tokenizer`). A token is several bytes:
                     divide a bits-per-token loss by `bytes_per_token` for bits per byte.
Both round-trip every UTF-8 text exactly, and encoding text never yields a special id.

A split (its texts, read whole into host memory) becomes one of three views, each a dict of int32
arrays whose first axis is the example, ready for `pipeline.TrainBatches` / `eval_batches`
(lengths below are in tokens, which for 'bytes' are bytes):
  'lm'              lm_examples: {'inputs': (N, seq_len + 1)}; a causal LM predicts
                    inputs[:, 1:] from inputs[:, :-1].
  'classification'  genre_examples: {'inputs': (N, seq_len) starting with CLS, 'label': (N,)}:
                    passages of each text, labelled with the text's label (a Shakespeare work's
                    genre; a review's or sentence's own label for catalog datasets).
  'pairs'           pair_examples: {'inputs', 'segment_ids': (N, seq_len), 'label': (N,) is_next}:
                    BERT-style [CLS] A [SEP] B [SEP] PAD... for next-segment prediction (and, with
                    MASK, masked-LM).
`load_text_split(name, split, view, seq_len, ..., tokenizer='bytes', vocab_size=0)` reads a split
through TFDS (offline builders are prepared on first use, catalog sets must already be prepared;
nothing is downloaded) and applies the view.
"""
import dataclasses
import hashlib
import io
import os
import re

import numpy as np

from bigjax.data import pipeline
from bigjax.errors import DataError, UserError

PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260
VIEWS = ('lm', 'classification', 'pairs')
# Passages per work in the Shakespeare 'classification' view: evenly spaced through the work, so a
# long play adds at most this many (at seq_len=256 the longest play has ~680 passages, the shortest
# poem 8). Catalog datasets take one passage (the first seq_len - 1 tokens) per review or sentence.
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


class ByteTokenizer:
  """The byte-level tokenizer: `encode` / `decode` above, specials PAD..MASK = 256..259."""
  name = 'bytes'
  vocab_size = VOCAB_SIZE
  num_regular_tokens = 256
  pad, cls, sep, mask = PAD, CLS, SEP, MASK

  def encode(self, text):
    return encode(text)

  def decode(self, ids):
    return decode(ids)


BYTES = ByteTokenizer()
TOKENIZERS = ('bytes', 'sentencepiece')
SP_DEFAULT_VOCAB_SIZE = 1024
# Training reads at most this many bytes of lines, evenly spaced through the train split (all of
# Shakespeare's 4.2 MB: ~1 s); larger corpora are subsampled deterministically.
SP_MAX_TRAIN_BYTES = 16 << 20
_SP_RECIPE = 1  # part of the cache file name: bump it when the training options below change
_WHITESPACE = '\u2581'  # SentencePiece's escaped space: in the input it would decode as ' '


def _sentencepiece():
  try:
    import sentencepiece
  except ImportError as e:
    raise UserError("tokenizer='sentencepiece' needs the sentencepiece package: "
                    "pip install 'sentencepiece>=0.2'") from e
  return sentencepiece


class SentencePieceTokenizer:
  """A trained SentencePiece model (serialized `model_proto` bytes) plus four specials after it.

  Ids 0..n-1 are the model's n pieces: 0 is <unk> (never produced: unknown characters fall back to
  byte pieces <0x00>..<0xFF>), 1 is the newline (user-defined: no piece spans a line break);
  PAD, CLS, SEP, MASK = n, n+1, n+2, n+3 are not in the model, so encoding never yields them.
  """
  name = 'sentencepiece'

  def __init__(self, model_proto):
    self.model_proto = bytes(model_proto)
    self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self.model_proto)
    n = self._sp.get_piece_size()
    self.num_regular_tokens, self.vocab_size = n, n + 4
    self.pad, self.cls, self.sep, self.mask = n, n + 1, n + 2, n + 3
    # A literal U+2581 in the text is encoded as its three UTF-8 byte pieces.
    self._escape = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in _WHITESPACE.encode()]

  def encode(self, text):
    """str or UTF-8 bytes -> (L,) int32 ids in 0..num_regular_tokens - 1."""
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
    ids = []
    for i, part in enumerate(text.split(_WHITESPACE)):
      if i:
        ids.extend(self._escape)
      ids.extend(self._sp.encode(part))
    return np.asarray(ids, np.int32)

  def decode(self, ids):
    """(L,) ids -> str; specials (>= num_regular_tokens) are dropped."""
    ids = np.asarray(ids).reshape(-1)
    return self._sp.decode(ids[ids < self.num_regular_tokens].tolist())


def _training_lines(texts, max_bytes):
  """The texts' non-empty lines (str), evenly spaced through them when they exceed max_bytes."""
  lines = [line for t in texts for line in _as_bytes(t).split(b'\n') if line]
  total = sum(map(len, lines))
  if total > max_bytes:
    keep = max(1, int(len(lines) * max_bytes / total))
    lines = [lines[i] for i in np.linspace(0, len(lines) - 1, keep).round().astype(int)]
  return [line.decode('utf-8', errors='replace') for line in lines]


def train_sentencepiece(texts, vocab_size, max_bytes=SP_MAX_TRAIN_BYTES):
  """Trains a SentencePieceTokenizer of `vocab_size` ids (specials included) on the texts' lines.

  BPE (deterministic, ~1 s on Shakespeare), byte_fallback, identity normalization with whitespace
  kept as is (so every text round-trips), the newline a piece of its own. Pass TRAIN texts only.
  """
  spm = _sentencepiece()
  lines = _training_lines(texts, max_bytes)
  if not lines:
    raise DataError('no text to train the SentencePiece tokenizer on: the train split is empty')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type='bpe',
        vocab_size=vocab_size - 4, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, input_sentence_size=0,
        max_sentence_length=1 << 20, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f'cannot train a SentencePiece tokenizer of vocab_size={vocab_size} on this '
                    f'train split ({e}); pick another config.data.vocab_size (at least ~300 for '
                    'the 256 byte pieces and the characters)') from e
  return SentencePieceTokenizer(model.getvalue())


def get_tokenizer(name='bytes', train_texts=None, vocab_size=0, cache_dir=None):
  """A tokenizer: .encode(text) -> int32 ids, .decode(ids) -> str, .vocab_size,
  .num_regular_tokens and the special ids .pad, .cls, .sep, .mask (the last four ids).

  name: 'bytes' (vocab_size 0 or 260) or 'sentencepiece' (vocab_size 0: SP_DEFAULT_VOCAB_SIZE).
  train_texts: the TRAIN split's texts, or a function returning them (called only when the model
  must be trained). cache_dir: where the SentencePiece model is kept, as
  `spm_bpe_{vocab_size}_r{recipe}.model`: loaded if there, else trained and written (atomically, so
  concurrent processes are safe: they train the same model); None trains without caching.
  """
  if name == 'bytes':
    if vocab_size not in (0, VOCAB_SIZE):
      raise UserError(f"the 'bytes' tokenizer has vocab_size {VOCAB_SIZE}, not {vocab_size}; use "
                      "config.data.vocab_size=0 (or tokenizer='sentencepiece')")
    return BYTES
  if name != 'sentencepiece':
    raise UserError(f'tokenizer {name!r} is unknown; use one of {", ".join(TOKENIZERS)}')
  vocab_size = vocab_size or SP_DEFAULT_VOCAB_SIZE
  path = None
  if cache_dir is not None:
    from etils import epath
    path = epath.Path(cache_dir) / f'spm_bpe_{vocab_size}_r{_SP_RECIPE}.model'
    if path.exists():
      return SentencePieceTokenizer(path.read_bytes())
  texts = train_texts() if callable(train_texts) else train_texts
  if texts is None:
    raise UserError('a SentencePiece tokenizer must be trained: pass train_texts (the train split)')
  tokenizer = train_sentencepiece(texts, vocab_size)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
    tmp.write_bytes(tokenizer.model_proto)
    tmp.replace(path)
  return tokenizer


def bytes_per_token(tokenizer, texts):
  """UTF-8 bytes per token of the texts joined by newlines, as the 'lm' view encodes them: a loss
  in bits per token divided by this is in bits per byte (1.0 for the 'bytes' tokenizer)."""
  joined = b'\n'.join(_as_bytes(t) for t in texts)
  return len(joined) / max(1, len(tokenizer.encode(joined)))


def _check_seq_len(seq_len, minimum):
  if int(seq_len) != seq_len or seq_len < minimum:
    raise UserError(f'seq_len={seq_len} is too short for this view; use an integer >= {minimum} '
                    '(e.g. config.data.seq_len=256)')


def lm_examples(texts, seq_len, tokenizer=BYTES):
  """Causal-LM windows over the texts concatenated (joined by a newline).

  texts: sequence of str/bytes. Window i is tokens[i*seq_len : i*seq_len + seq_len + 1], so
  consecutive windows share one token and every token after the first is a target exactly once; the
  tail shorter than a window is dropped. Returns {'inputs': (N, seq_len + 1) int32}.
  """
  _check_seq_len(seq_len, 1)
  tokens = tokenizer.encode(b'\n'.join(_as_bytes(t) for t in texts))
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise DataError(f'the texts hold {len(tokens)} tokens, fewer than one window of seq_len + 1 = '
                    f'{seq_len + 1}; lower seq_len')
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
  return {'inputs': tokens[idx]}


def genre_examples(texts, genres, seq_len, max_per_work=MAX_PASSAGES_PER_WORK, tokenizer=BYTES):
  """Labelled passages: [CLS] + seq_len - 1 tokens of one text, labelled with that text's label.

  texts: sequence of str/bytes; genres: (len(texts),) int labels. Each text is cut into
  non-overlapping passages of seq_len - 1 tokens; the partial tail is dropped, except that a text
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
    tokens = tokenizer.encode(text)
    n = len(tokens) // width
    if n == 0:
      starts = [0] if len(tokens) else []
    else:
      keep = n if max_per_work is None else min(n, max_per_work)
      starts = width * np.unique(np.linspace(0, n - 1, keep).round().astype(int))
    for start in starts:
      passage = tokens[start:start + width]
      rows.append(np.concatenate([[tokenizer.cls], passage,
                                  np.full(width - len(passage), tokenizer.pad)]))
      labels.append(genre)
  if not rows:
    raise DataError('the texts are empty: no passage to classify')
  return {'inputs': np.stack(rows).astype(np.int32), 'label': np.asarray(labels, np.int32)}


def segments(text, min_bytes, length=len):
  """A text's line groups: blank-line separated paragraphs (a speech, a stanza, a stage direction),
  consecutive ones merged until each holds >= min_bytes bytes (the last may hold fewer); `length`
  measures a group (e.g. in tokens instead of bytes). Returns a list of bytes, in text order."""
  out, current = [], b''
  for paragraph in re.split(rb'\n[ \t]*\n', _as_bytes(text).strip()):
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


def pair_examples(texts, seq_len, seed, tokenizer=BYTES):
  """BERT-style segment pairs for next-segment prediction.

  The texts are cut into `segments` of >= (seq_len - 3) // 4 tokens. Every segment A that has a
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
  length = len
  if not isinstance(tokenizer, ByteTokenizer):
    length = lambda group: len(tokenizer.encode(group))
  for text in texts:
    parts = segments(text, budget // 4, length)
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
  inputs = np.full((len(anchors), seq_len), tokenizer.pad, np.int32)
  segment_ids = np.zeros((len(anchors), seq_len), np.int32)
  for row, (i, nxt, other) in enumerate(zip(anchors, is_next, others)):
    a, b = tokenizer.encode(segs[i]), tokenizer.encode(segs[i + 1] if nxt else segs[other])
    keep_a = min(len(a), max(budget // 2, budget - len(b)))
    keep_b = min(len(b), budget - keep_a)
    a, b = a[len(a) - keep_a:], b[:keep_b]
    tokens = np.concatenate([[tokenizer.cls], a, [tokenizer.sep], b, [tokenizer.sep]])
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


def tokenizer_cache_dir(name, train_split='train', data_dir=None):
  """Where `dataset_tokenizer` keeps the dataset's trained tokenizers: under the TFDS data dir,
  bigjax_tokenizers/<name>/<version>/<train split>."""
  builder = pipeline._builder(name, data_dir)
  safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', train_split)
  if safe != train_split:  # 'train[:90%]' and 'train[90%:]' must not share a model
    safe += '-' + hashlib.sha1(train_split.encode()).hexdigest()[:8]
  return os.path.join(builder.data_dir_root, 'bigjax_tokenizers', name, str(builder.version), safe)


def dataset_tokenizer(name, tokenizer='bytes', vocab_size=0, data_dir=None, train_split='train'):
  """The tokenizer of a text dataset: get_tokenizer(tokenizer, ...) trained on `train_split` only
  and cached in `tokenizer_cache_dir` (the train split is read only when no model is cached)."""
  if tokenizer != 'sentencepiece':
    return get_tokenizer(tokenizer, vocab_size=vocab_size)  # 'bytes', or the unknown-name error
  _text_dataset(name)
  return get_tokenizer(tokenizer, lambda: load_texts(name, train_split, data_dir)[0], vocab_size,
                       tokenizer_cache_dir(name, train_split, data_dir))


def load_text_split(name, split, view, seq_len, data_dir=None, seed=0, tokenizer='bytes',
                    vocab_size=0, train_split='train'):
  """A text split as host arrays in one of VIEWS (see the module docstring for the shapes).

  name: a key of TEXT_DATASETS ('shakespeare', 'lm1b', 'imdb_reviews', 'glue/sst2'); split: a TFDS
  split string; seed: used by the 'pairs' view only. tokenizer: 'bytes', 'sentencepiece' (with
  vocab_size, trained on `train_split` and cached: see `dataset_tokenizer`) or a tokenizer object.
  """
  dataset = _text_dataset(name, view)
  _check_seq_len(seq_len, 8 if view == 'pairs' else 2)
  if isinstance(tokenizer, str):
    tokenizer = dataset_tokenizer(name, tokenizer, vocab_size, data_dir, train_split)
  texts, labels = load_texts(name, split, data_dir)
  if view == 'lm':
    return lm_examples(texts, seq_len, tokenizer)
  if view == 'classification':
    return genre_examples(texts, labels, seq_len, max_per_work=dataset.max_per_text,
                          tokenizer=tokenizer)
  return pair_examples(texts, seq_len, seed, tokenizer)
