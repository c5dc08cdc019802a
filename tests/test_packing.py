"""Packed causal-LM windows (config.data.pack, bigjax/data/packing.py): every token is an input once,
segment ids and per-document positions restart at each document, a packed document's GPT logits
equal those of the document run alone, targets across a boundary carry no loss, a pre-tokenized
uint16 source packs like its text, and a GPT trains on the packed path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import experiment, train
from bigjax.data import packing, records, tokenizers
from bigjax.errors import DataError, UserError
from bigjax.models import gpt, llama
from bigjax.tasks import base, causal_lm

from conftest import load_config

DOC_LENGTHS = (5, 7, 30, 1, 12)


def _docs(lengths=DOC_LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n) for n in lengths]


def test_windows_cover_every_token_once_with_segments_and_positions(tmp_path):
  docs = _docs()
  info = packing.write_store(str(tmp_path / 's'), docs, 260, 'test')
  assert info == {'num_tokens': 55, 'num_documents': 5, 'dtype': 'uint16', 'vocab_size': 260}
  assert (tmp_path / 's' / packing.TOKENS_FILE).stat().st_size == 2 * 55  # 2 bytes a token
  windows = packing.PackedWindows(str(tmp_path / 's'), 8, 'test')
  assert len(windows) == (55 - 1) // 8
  rows = [windows[i] for i in range(len(windows))]
  flat = np.concatenate(docs)
  inputs = np.concatenate([r['inputs'][:-1] for r in rows])
  np.testing.assert_array_equal(inputs, flat[: 8 * len(windows)])  # each token an input once
  for i, r in enumerate(rows[:-1]):  # consecutive windows share one token
    assert r['inputs'][-1] == rows[i + 1]['inputs'][0]
  doc_of = np.repeat(np.arange(5), DOC_LENGTHS)
  pos_in_doc = np.concatenate([np.arange(n) for n in DOC_LENGTHS])
  for i, r in enumerate(rows):
    at = i * 8 + np.arange(9)
    np.testing.assert_array_equal(r['segment_ids'], doc_of[at] - doc_of[at[0]] + 1)
    starts = np.maximum(at - pos_in_doc[at], i * 8)  # a cut document restarts at the window
    np.testing.assert_array_equal(r['positions'], at - starts)
  np.testing.assert_array_equal(rows[0]['segment_ids'], [1, 1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(rows[0]['positions'], [0, 1, 2, 3, 4, 0, 1, 2, 3])
  np.testing.assert_array_equal(rows[1]['positions'], [0, 1, 2, 3, 0, 1, 2, 3, 4])


def test_store_width_follows_the_vocabulary_and_bad_ids_name_the_document(tmp_path):
  info = packing.write_store(str(tmp_path / 'wide'), [np.array([70_000, 1, 2])], 100_000, 'x')
  assert info['dtype'] == 'uint32'
  assert packing.PackedWindows(str(tmp_path / 'wide'), 2, 'x')[0]['inputs'][0] == 70_000
  with pytest.raises(DataError, match=r'ds document 1: token id 300 is outside .*\[0, 260\)'):
    packing.write_store(str(tmp_path / 'bad'), [np.array([1]), np.array([2, 300])], 260, 'ds')
  with pytest.raises(DataError, match='fewer than one window'):
    packing.write_store(str(tmp_path / 'short'), [np.array([1, 2])], 260, 'ds')
    packing.PackedWindows(str(tmp_path / 'short'), 8, 'ds')


MODELS = {
  'gpt_learned': lambda: gpt.Model(vocab_size=260, num_layers=2, num_heads=2, embed_dim=16),
  'gpt_rotary': lambda: gpt.Model(
    vocab_size=260, num_layers=2, num_heads=2, embed_dim=16, positions='rotary'
  ),
  'llama': lambda: llama.Model(vocab_size=260, num_layers=2, num_heads=2, embed_dim=16),
}


@pytest.mark.parametrize(
  'name',  # learned positions show the restart; rotary (relative) and llama: the slow pass
  [
    'gpt_learned',
    pytest.param('gpt_rotary', marks=pytest.mark.slow),
    pytest.param('llama', marks=pytest.mark.slow),
  ],
)
def test_a_packed_document_has_the_logits_of_the_document_alone(name):
  """Documents a (5 tokens) and b (7) in one row with segment ids and restarting positions: each
  one's logits equal those of it run alone; without segment ids b's differ (it sees a)."""
  model = MODELS[name]()
  a, b = (np.asarray(d, np.int32) for d in _docs((5, 7)))
  packed = np.concatenate([a, b])[None]
  segment_ids = np.asarray([[1] * 5 + [2] * 7])
  pos = np.asarray([list(range(5)) + list(range(7))])
  params = jax.jit(model.init)(jax.random.key(0), packed)['params']
  apply = jax.jit(model.apply)
  logits = apply({'params': params}, packed, segment_ids, pos)
  alone_a = apply({'params': params}, a[None])
  alone_b = apply({'params': params}, b[None])
  np.testing.assert_allclose(logits[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], alone_b[0], atol=1e-5)
  unmasked = apply({'params': params}, packed)
  assert np.abs(unmasked[0, 5:] - alone_b[0]).max() > 1e-3


def test_targets_across_a_boundary_carry_no_loss():
  task = causal_lm.Task(base.DataInfo(vocab_size=260))
  tokens = jnp.asarray([[3, 4, 5, 6, 7]])
  batch = task.prepare(
    {
      'inputs': tokens,
      'segment_ids': jnp.asarray([[1, 1, 2, 2, 2]]),
      'positions': jnp.asarray([[0, 1, 0, 1, 2]]),
    },
    None,
  )
  np.testing.assert_array_equal(batch['weights'], [[1, 0, 1, 1]])  # 4 -> 5 crosses documents
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 0, 1]])
  logits = jax.random.normal(jax.random.key(1), (1, 4, 260))
  loss, metrics = task.loss_and_metrics(logits, batch)
  nll = -jax.nn.log_softmax(logits)[0, jnp.arange(4), batch['targets'][0]]
  np.testing.assert_allclose(loss, (nll[0] + nll[2] + nll[3]) / 3, rtol=1e-6)
  out = task.eval_outputs(logits, batch)
  np.testing.assert_allclose(out['tokens'], [3.0])
  np.testing.assert_allclose(out['nll'], [nll[0] + nll[2] + nll[3]], rtol=1e-6)


def _text_dataset(root, texts, pretokenized=False):
  key = 'tokens' if pretokenized else 'text'
  feature = (
    {'kind': 'tensor', 'shape': [None], 'dtype': 'uint16'} if pretokenized else {'kind': 'text'}
  )

  def rows(split_texts):
    for t in split_texts:
      value = tokenizers.encode(t).astype(np.uint16) if pretokenized else t
      yield {key: value}

  records.write_dataset(
    str(root), {key: feature}, {'train': rows(texts[:-8]), 'test': rows(texts[-8:])}
  )
  return f'dir:{root}'


def _texts(n=160, seed=0):
  rng = np.random.default_rng(seed)
  phrases = ['the cat sat on the mat. ', 'a dog ran in the park. ', 'birds sing. ']
  return [''.join(rng.choice(phrases, int(rng.integers(1, 4)))) for _ in range(n)]


def _packed_config(name):
  config = load_config('lm1b_gpt', 'smoke')
  config.data.update(name=name, pack=True, eval_max_examples=0)
  return config


def test_a_pretokenized_uint16_source_packs_like_its_text(tmp_path):
  texts = _texts(40)
  text_batches = experiment.data_inputs.build(
    _packed_config(_text_dataset(tmp_path / 'text', texts)), tokenizers.BYTES, None
  )
  token_batches = experiment.data_inputs.build(
    _packed_config(_text_dataset(tmp_path / 'tok', texts, pretokenized=True)),
    tokenizers.BYTES,
    None,
  )
  for step in (0, 3):
    a, b = text_batches.train.batch(step), token_batches.train.batch(step)
    assert a.keys() == {'inputs', 'segment_ids', 'positions'} and a['inputs'].shape == (8, 17)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  bad = _packed_config('dir:unused')
  bad.data.view = 'classification'
  with pytest.raises(UserError, match="config.data.pack=True .* needs config.data.view='lm'"):
    experiment.data_inputs.check(bad)


@pytest.mark.slow  # >40 s on 2 busy cores: out of the default run (CI runs -m slow)
def test_a_gpt_trains_on_packed_windows(tmp_path):
  """Short documents of three phrases, packed: the tiny lm1b_gpt's eval loss (in-document targets
  only) falls below half of ln(260) in 60 steps."""
  config = _packed_config(_text_dataset(tmp_path / 'ds', _texts()))
  config.model.kwargs.update(embed_dim=32, mlp_dim=64)
  config.optim.lr = 1e-2
  config.update(num_steps=60, log_every=20, checkpoint_every=60)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert results['eval']['loss'] < 0.5 * np.log(260)
