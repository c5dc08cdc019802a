"""Text tokenizers, chosen by name (`config.data.tokenizer`) through `TOKENIZERS`.

Every tokenizer puts its four specials at the END of the vocabulary: ids below
`num_regular_tokens = vocab_size - 4` are text, PAD, CLS, SEP, MASK are the last four ids.
  'bytes' (default)  ids 0..255 are the bytes of the UTF-8 text; PAD=256, CLS=257, SEP=258,
                     MASK=259 (VOCAB_SIZE=260). No vocabulary file, nothing to train. The
                     module-level `encode` / `decode` and PAD..MASK, VOCAB_SIZE are this one's.
  'sentencepiece'    a SentencePiece BPE model of vocab_size - 4 pieces (default vocab_size 1024)
                     trained on a dataset's TRAIN split only, with byte fallback, cached on disk
                     (see `text.dataset_tokenizer`). A token is several bytes: divide a
                     bits-per-token loss by `bytes_per_token` for bits per byte.
  'hf'               the tokenizer of the HuggingFace checkpoint in config.init_from.hf: its
                     tokenizer.json read with the `tokenizers` package (no transformers). Its
                     specials are the checkpoint's own ([PAD], <s>, ...: see `HFTokenizer`), not
                     four ids at the end, and its vocab_size is the checkpoint's config.json
                     vocab_size when that is larger (padded embeddings).
'bytes' and 'sentencepiece' round-trip every UTF-8 text exactly, and encoding text never yields a
special id.

A tokenizer object exposes `.name`, `.vocab_size`, `.num_regular_tokens`, the special ids `.pad`,
`.cls`, `.sep`, `.mask`, `.encode(text) -> (L,) int32` and `.decode(ids) -> str`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import io

import numpy as np

from bigjax import registry, reporting
from bigjax.errors import DataError, UserError

PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260
SP_DEFAULT_VOCAB_SIZE = 1024
# Training reads at most this many bytes of lines, evenly spaced through the train split (all of
# Shakespeare's 4.2 MB: ~1 s); larger corpora are subsampled deterministically.
SP_MAX_TRAIN_BYTES = 16 << 20
_SP_RECIPE = 1  # part of the cache file name: bump it when the training options below change
_WHITESPACE = '\u2581'  # SentencePiece's escaped space: in the input it would decode as ' '

Text = str | bytes
# Name -> factory(train_texts, vocab_size, cache_dir, pretrained_dir) -> tokenizer; see
# `get_tokenizer`.
TOKENIZERS = registry.Registry('tokenizers', 'config.data.tokenizer')


def as_bytes(text: Text) -> bytes:
  """str (UTF-8 encoded) or bytes -> bytes."""
  return text.encode('utf-8') if isinstance(text, str) else bytes(text)


def encode(text: Text) -> np.ndarray:
  """str (UTF-8 encoded) or bytes -> (L,) int32 token ids in 0..255, one per byte."""
  return np.frombuffer(as_bytes(text), np.uint8).astype(np.int32)


def decode(ids: np.ndarray) -> str:
  """(L,) token ids -> str; special ids (>= 256) are dropped, invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids).reshape(-1)
  return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class ByteTokenizer:
  """The byte-level tokenizer: `encode` / `decode` above, specials PAD..MASK = 256..259."""

  name = 'bytes'
  vocab_size = VOCAB_SIZE
  num_regular_tokens = 256
  pad, cls, sep, mask = PAD, CLS, SEP, MASK

  def encode(self, text: Text) -> np.ndarray:
    """str or bytes -> (L,) int32 ids in 0..255."""
    return encode(text)

  def decode(self, ids: np.ndarray) -> str:
    """(L,) ids -> str; specials dropped."""
    return decode(ids)


BYTES = ByteTokenizer()


def _sentencepiece():
  try:
    import sentencepiece
  except ImportError as e:
    raise UserError(
      "tokenizer='sentencepiece' needs the sentencepiece package: pip install 'sentencepiece>=0.2'"
    ) from e
  return sentencepiece


class SentencePieceTokenizer:
  """A trained SentencePiece model (serialized `model_proto` bytes) plus four specials after it.

  Ids 0..n-1 are the model's n pieces: 0 is <unk> (never produced: unknown characters fall back to
  byte pieces <0x00>..<0xFF>), 1 is the newline (user-defined: no piece spans a line break);
  PAD, CLS, SEP, MASK = n, n+1, n+2, n+3 are not in the model, so encoding never yields them.
  """

  name = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    self.model_proto = bytes(model_proto)
    self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self.model_proto)
    n = self._sp.get_piece_size()
    self.num_regular_tokens, self.vocab_size = n, n + 4
    self.pad, self.cls, self.sep, self.mask = n, n + 1, n + 2, n + 3
    # A literal U+2581 in the text is encoded as its three UTF-8 byte pieces.
    self._escape = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in _WHITESPACE.encode()]

  def encode(self, text: Text) -> np.ndarray:
    """str or UTF-8 bytes -> (L,) int32 ids in 0..num_regular_tokens - 1."""
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
    ids = []
    for i, part in enumerate(text.split(_WHITESPACE)):
      if i:
        ids.extend(self._escape)
      ids.extend(self._sp.encode(part))
    return np.asarray(ids, np.int32)

  def decode(self, ids: np.ndarray) -> str:
    """(L,) ids -> str; specials (>= num_regular_tokens) are dropped."""
    ids = np.asarray(ids).reshape(-1)
    return self._sp.decode(ids[ids < self.num_regular_tokens].tolist())


class HFTokenizer:
  """A HuggingFace fast tokenizer from a save_pretrained directory's tokenizer.json.

  encode: text -> ids without special tokens (no BOS/EOS/CLS added: the 'lm' view concatenates the
  texts); decode drops specials. num_regular_tokens: the tokenizer's own vocabulary size;
  vocab_size: the larger of that and config.json's vocab_size (the model's embedding rows). The
  special ids come from tokenizer_config.json's pad/cls/sep/mask tokens (cls falls back to the BOS
  token, sep to EOS), else config.json's pad/bos/eos_token_id; -1 where the checkpoint has none.
  """

  name = 'hf'

  def __init__(self, directory: str):
    import json
    import os

    directory = os.path.expanduser(directory)
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.exists(path):
      raise UserError(
        f"config.data.tokenizer='hf' needs {path}; save a fast tokenizer there "
        "(tokenizer.save_pretrained(dir)) or choose another config.data.tokenizer"
      )
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError as e:
      raise UserError("tokenizer='hf' needs the tokenizers package: pip install tokenizers") from e
    try:
      self._tok = _Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises bare Exceptions)
      raise UserError(
        f'{path} cannot be read by the tokenizers package ({e}); re-save it'
      ) from None

    def read(name):
      file = os.path.join(directory, name)
      if not os.path.exists(file):
        return {}
      with open(file) as f:
        return json.load(f)

    model_config, tok_config = read('config.json'), read('tokenizer_config.json')
    n = self._tok.get_vocab_size(with_added_tokens=True)
    self.num_regular_tokens = n
    self.vocab_size = max(n, int(model_config.get('vocab_size') or 0))

    def special(*names, config_id=None):
      for key in names:
        token = tok_config.get(key)
        token = token.get('content') if isinstance(token, dict) else token
        if isinstance(token, str) and self._tok.token_to_id(token) is not None:
          return self._tok.token_to_id(token)
      value = model_config.get(config_id) if config_id else None
      return value if isinstance(value, int) else -1

    self.pad = special('pad_token', config_id='pad_token_id')
    self.cls = special('cls_token', 'bos_token', config_id='bos_token_id')
    self.sep = special('sep_token', 'eos_token', config_id='eos_token_id')
    self.mask = special('mask_token')

  def encode(self, text: Text) -> np.ndarray:
    """str or UTF-8 bytes -> (L,) int32 ids, no special tokens added."""
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: np.ndarray) -> str:
    """(L,) ids -> str; special tokens dropped."""
    ids = np.asarray(ids).reshape(-1)
    return self._tok.decode(ids[(ids >= 0) & (ids < self.num_regular_tokens)].tolist())


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def _training_lines(texts: Iterable[Text], max_bytes: int) -> list[str]:
  """The texts' non-empty lines (str), evenly spaced through them when they exceed max_bytes."""
  lines = [line for t in texts for line in as_bytes(t).split(b'\n') if line]
  total = sum(map(len, lines))
  if total > max_bytes:
    keep = max(1, int(len(lines) * max_bytes / total))
    lines = [lines[i] for i in np.linspace(0, len(lines) - 1, keep).round().astype(int)]
  return [line.decode('utf-8', errors='replace') for line in lines]


def train_sentencepiece(
  texts: Sequence[Text], vocab_size: int, max_bytes: int = SP_MAX_TRAIN_BYTES
) -> SentencePieceTokenizer:
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
      sentence_iterator=iter(lines),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size - 4,
      byte_fallback=True,
      character_coverage=0.9995,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      user_defined_symbols=['\n'],
      unk_id=0,
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      input_sentence_size=0,
      max_sentence_length=1 << 20,
      num_threads=1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise UserError(
      f'cannot train a SentencePiece tokenizer of vocab_size={vocab_size} on this '
      f'train split ({e}); pick another config.data.vocab_size (at least ~300 for '
      'the 256 byte pieces and the characters)'
    ) from e
  return SentencePieceTokenizer(model.getvalue())


Texts = Sequence[Text] | Callable[[], Sequence[Text]] | None
CacheDir = str | Callable[[], str] | None


@TOKENIZERS.register('bytes')
def _bytes(
  train_texts: Texts, vocab_size: int, cache_dir: CacheDir, pretrained_dir: str = ''
) -> ByteTokenizer:
  del train_texts, cache_dir, pretrained_dir  # nothing to train, cache or read
  if vocab_size not in (0, VOCAB_SIZE):
    raise UserError(
      f"the 'bytes' tokenizer has vocab_size {VOCAB_SIZE}, not {vocab_size}; use "
      "config.data.vocab_size=0 (or tokenizer='sentencepiece')"
    )
  return BYTES


@TOKENIZERS.register('sentencepiece')
def _sentencepiece_model(
  train_texts: Texts, vocab_size: int, cache_dir: CacheDir, pretrained_dir: str = ''
) -> SentencePieceTokenizer:
  del pretrained_dir  # trained on the dataset, not read from a checkpoint
  vocab_size = vocab_size or SP_DEFAULT_VOCAB_SIZE
  cache_dir = cache_dir() if callable(cache_dir) else cache_dir
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
    reporting.write_atomic(str(path), tokenizer.model_proto)
  return tokenizer


@TOKENIZERS.register('hf')
def _hf(
  train_texts: Texts, vocab_size: int, cache_dir: CacheDir, pretrained_dir: str = ''
) -> HFTokenizer:
  del train_texts, cache_dir  # read from the checkpoint, never trained
  if not pretrained_dir:
    raise UserError(
      "config.data.tokenizer='hf' reads the tokenizer.json of config.init_from.hf, which is "
      'empty; set config.init_from.hf=<save_pretrained directory> or choose another tokenizer'
    )
  tokenizer = HFTokenizer(pretrained_dir)
  if vocab_size not in (0, tokenizer.vocab_size):
    raise UserError(
      f"config.data.vocab_size={vocab_size} contradicts the 'hf' tokenizer's {tokenizer.vocab_size} "
      f'({pretrained_dir}); set config.data.vocab_size=0'
    )
  return tokenizer


def get_tokenizer(
  name: str = 'bytes',
  train_texts: Texts = None,
  vocab_size: int = 0,
  cache_dir: CacheDir = None,
  pretrained_dir: str = '',
) -> Tokenizer:
  """The tokenizer called `name` in TOKENIZERS (unknown names: UserError naming them all).

  name: 'bytes' (vocab_size 0 or 260) or 'sentencepiece' (vocab_size 0: SP_DEFAULT_VOCAB_SIZE).
  train_texts: the TRAIN split's texts, or a function returning them (called only when the model
  must be trained). cache_dir: where the SentencePiece model is kept, or a function returning that
  folder (called only by tokenizers that cache), as `spm_bpe_{vocab_size}_r{recipe}.model`: loaded
  if there, else trained and written (atomically, so concurrent processes are safe: they train the
  same model); None trains without caching. pretrained_dir: the HuggingFace directory the 'hf'
  tokenizer reads (config.init_from.hf).
  """
  return TOKENIZERS.get(name)(train_texts, vocab_size, cache_dir, pretrained_dir)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[Text]) -> float:
  """UTF-8 bytes per token of the texts joined by newlines, as the 'lm' view encodes them: a loss
  in bits per token divided by this is in bits per byte (1.0 for the 'bytes' tokenizer)."""
  joined = b'\n'.join(as_bytes(t) for t in texts)
  return len(joined) / max(1, len(tokenizer.encode(joined)))
