"""HuggingFace PyTorch -> bigjax converters: small randomly initialised GPT-2 and BERT models on CPU
give the same logits after bigjax.models.hf.gpt2 / hf.bert params_from_hf; bad state dicts and
configs raise UserError.

Needs transformers and torch (requirements-dev.txt). Nothing is downloaded: the models are built
from config objects with HF_HUB_OFFLINE=1.
"""

import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bigjax.errors import UserError  # noqa: E402
from bigjax.models import bert, gpt  # noqa: E402
from bigjax.models.hf import bert as bert_import  # noqa: E402
from bigjax.models.hf import gpt2 as gpt2_import  # noqa: E402

torch.set_num_threads(1)
GPT_VOCAB, BERT_VOCAB = 97, 89
TOL = dict(rtol=1e-4, atol=1e-5)


def _perturbed(model):
  """model in eval mode with its biases and LayerNorms (HF initialises them to 0 and 1) moved off
  their initial values, so that a misplaced bias or norm parameter changes the logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'ln_' in name or 'LayerNorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _hf_gpt2(**overrides):
  torch.manual_seed(0)
  kwargs = dict(
    vocab_size=GPT_VOCAB,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=GPT_VOCAB - 1,
    eos_token_id=GPT_VOCAB - 1,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    initializer_range=0.2,
  )
  config = transformers.GPT2Config(**{**kwargs, **overrides})
  return _perturbed(transformers.GPT2LMHeadModel(config))


def _hf_bert_config(**overrides):
  kwargs = dict(
    vocab_size=BERT_VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
    initializer_range=0.2,
  )
  return transformers.BertConfig(**{**kwargs, **overrides})


@pytest.fixture(scope='module')
def hf_gpt2():
  return _hf_gpt2()


@pytest.fixture(scope='module')
def hf_bert():
  torch.manual_seed(0)
  return _perturbed(transformers.BertForPreTraining(_hf_bert_config()))


def _fake_init(model):
  """What model.init returns (boxed {'params': ...}), filled with random numbers: faster."""
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _bert_batch():
  """ids (2, 12) with the second row padded (pad_token_id 0 after 8 tokens), segment ids."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, BERT_VOCAB, size=(2, 12))
  ids[1, 8:] = 0
  segments = np.zeros_like(ids)
  segments[:, 5:] = 1
  segments[1, 8:] = 0
  return ids, segments


@pytest.fixture(scope='module')
def hf_bert_outputs(hf_bert):
  ids, segments = _bert_batch()
  with torch.no_grad():
    out = hf_bert(
      input_ids=torch.tensor(ids),
      token_type_ids=torch.tensor(segments),
      attention_mask=torch.tensor(ids != 0, dtype=torch.long),
    )
  return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


@pytest.mark.parametrize('scan', [False, True])
def test_gpt2_lm_logits_match(hf_gpt2, scan):
  config = gpt2_import.config_from_hf(hf_gpt2.config)
  assert config['max_len'] == 32 and config['mlp_dim'] == 128
  config['scan'] = scan
  params = gpt2_import.params_from_hf(hf_gpt2.state_dict(), config)
  init = nn.meta.unbox(
    jax.eval_shape(gpt.Model(**config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )['params']
  assert jax.tree.structure(params) == jax.tree.structure(init)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
    lambda a: (a.shape, a.dtype), init
  )
  ids = np.random.default_rng(1).integers(0, GPT_VOCAB, size=(2, 16))
  with torch.no_grad():
    want = hf_gpt2(input_ids=torch.tensor(ids)).logits.numpy()
  got = jax.jit(gpt.Model(**config).apply)({'params': params}, ids)
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_gpt2_prefix_numpy_and_configdict_give_same_params(hf_gpt2):
  config = gpt2_import.config_from_hf(hf_gpt2.config)
  full = gpt2_import.params_from_hf(hf_gpt2.state_dict(), config)
  bare = {k: v.numpy() for k, v in hf_gpt2.transformer.state_dict().items()}  # no prefix
  assert not any(k.startswith('transformer.') for k in bare)
  other = gpt2_import.params_from_hf(bare, ml_collections.ConfigDict(config))
  jax.tree.map(np.testing.assert_array_equal, full, other)


def test_gpt2_missing_key_and_wrong_shape_raise(hf_gpt2):
  config = gpt2_import.config_from_hf(hf_gpt2.config)
  state = dict(hf_gpt2.state_dict())
  del state['transformer.h.1.mlp.c_fc.bias']
  with pytest.raises(UserError, match=r"h\.1\.mlp\.c_fc\.bias"):
    gpt2_import.params_from_hf(state, config)
  with pytest.raises(UserError, match=r"'wte\.weight' has shape \(97, 32\).*expects \(98, 32\)"):
    gpt2_import.params_from_hf(hf_gpt2.state_dict(), {**config, 'vocab_size': GPT_VOCAB + 1})
  state = dict(hf_gpt2.state_dict())
  state['transformer.h.0.attn.c_attn.weight'] = state['transformer.h.0.attn.c_attn.weight'][:, :64]
  with pytest.raises(UserError, match=r"c_attn\.weight' has shape \(32, 64\)"):
    gpt2_import.params_from_hf(state, config)
  state = dict(hf_gpt2.state_dict())
  state['lm_head.weight'] = state['lm_head.weight'] + 1.0
  with pytest.raises(UserError, match='untied'):
    gpt2_import.params_from_hf(state, config)
  with pytest.raises(UserError, match="positions='rotary'.*positions='learned'"):
    gpt2_import.params_from_hf(hf_gpt2.state_dict(), {**config, 'positions': 'rotary'})


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(activation_function='relu'), 'activation_function'),
    (dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx'),
    (dict(reorder_and_upcast_attn=True), 'reorder_and_upcast_attn'),
    (dict(scale_attn_weights=False), 'scale_attn_weights'),
  ],
)
def test_gpt2_unsupported_config_raises(overrides, match):
  config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, **overrides)
  with pytest.raises(UserError, match=match):
    gpt2_import.config_from_hf(config)


@pytest.mark.parametrize('scan', [False, True])
def test_bert_pretrain_logits_match_with_padding(hf_bert, hf_bert_outputs, scan):
  config = bert_import.config_from_hf(hf_bert.config)
  assert config['pad_id'] == 0 and config['activation'] == 'gelu_exact' and not config['pre_ln']
  config['scan'] = scan
  params = bert_import.params_from_hf(hf_bert.state_dict(), config)
  ids, segments = _bert_batch()
  out = jax.jit(bert.Model(**config).apply)({'params': params}, ids, segments)
  want_mlm, want_nsp = hf_bert_outputs
  np.testing.assert_allclose(np.asarray(out['nsp_logits']), want_nsp, **TOL)
  # Padded query positions are not compared: bert.Model zeroes their attention (padding_mask
  # masks padded queries too) while HF lets them attend to the real tokens. Real positions never
  # see padding in either model.
  valid = ids != 0
  np.testing.assert_allclose(np.asarray(out['mlm_logits'])[valid], want_mlm[valid], **TOL)


def test_bert_model_state_dict_classify_fills_classifier_from_init(hf_bert):
  """A BertModel state dict (no 'bert.' prefix) for head='classify'; with an identity classifier
  the logits are HF's pooler output."""
  d = hf_bert.config.hidden_size
  config = bert_import.config_from_hf(hf_bert.config, head='classify', num_classes=d)
  state = hf_bert.bert.state_dict()
  params = bert_import.params_from_hf(state, config)
  assert 'classifier' not in params and 'nsp' not in params and 'pooler' in params
  model = bert.Model(**config)
  ids, segments = _bert_batch()
  fresh = _fake_init(model)  # boxed, {'params': ...}, as model.init returns it
  filled = bert_import.params_from_hf(state, config, init_params=fresh)
  merged = {**nn.meta.unbox(fresh)['params'], **params}
  jax.tree.map(np.testing.assert_array_equal, filled, merged)
  filled['classifier'] = {'kernel': np.eye(d, dtype=np.float32), 'bias': np.zeros(d, np.float32)}
  got = jax.jit(model.apply)({'params': filled}, ids, segments)
  with torch.no_grad():
    want = hf_bert.bert(
      input_ids=torch.tensor(ids),
      token_type_ids=torch.tensor(segments),
      attention_mask=torch.tensor(ids != 0, dtype=torch.long),
    ).pooler_output
  np.testing.assert_allclose(np.asarray(got), want.numpy(), **TOL)


def test_bert_masked_lm_needs_init_params_for_missing_heads(hf_bert, hf_bert_outputs):
  """BertForMaskedLM has no pooler or NSP head: UserError for head='pretrain', unless init_params
  supplies them; its MLM logits still match."""
  hf_mlm = transformers.BertForMaskedLM(hf_bert.config).eval()
  missing, _ = hf_mlm.load_state_dict(hf_bert.state_dict(), strict=False)
  assert not missing
  state = hf_mlm.state_dict()
  assert not any(k.startswith(('bert.pooler', 'cls.seq_relationship')) for k in state)
  config = bert_import.config_from_hf(hf_mlm.config)
  with pytest.raises(UserError, match=r"no pooler \('pooler\.dense\.weight'\).*init_params"):
    bert_import.params_from_hf(state, config)
  no_nsp = {k: v for k, v in hf_bert.state_dict().items() if not k.startswith('cls.seq_rel')}
  with pytest.raises(UserError, match="NSP head.*head='classify'"):
    bert_import.params_from_hf(no_nsp, config)
  model = bert.Model(**config)
  ids, segments = _bert_batch()
  fresh = nn.meta.unbox(_fake_init(model))['params']
  params = bert_import.params_from_hf(state, config, init_params=fresh)
  np.testing.assert_array_equal(params['nsp']['kernel'], fresh['nsp']['kernel'])
  out = jax.jit(model.apply)({'params': params}, ids, segments)
  valid = ids != 0
  np.testing.assert_allclose(np.asarray(out['mlm_logits'])[valid], hf_bert_outputs[0][valid], **TOL)


def test_bert_missing_key_and_wrong_shape_raise(hf_bert):
  config = bert_import.config_from_hf(hf_bert.config)
  state = dict(hf_bert.state_dict())
  del state['bert.encoder.layer.1.attention.self.value.weight']
  with pytest.raises(UserError, match=r"encoder\.layer\.1\.attention\.self\.value\.weight"):
    bert_import.params_from_hf(state, config)
  with pytest.raises(UserError, match=r"intermediate\.dense\.weight' has shape \(64, 32\)"):
    bert_import.params_from_hf(hf_bert.state_dict(), {**config, 'mlp_dim': 48})
  with pytest.raises(UserError, match='untied'):
    bert_import.params_from_hf(
      {**hf_bert.state_dict(), 'cls.predictions.decoder.weight': torch.zeros(BERT_VOCAB, 32)},
      config,
    )
  with pytest.raises(UserError, match="pre_ln=True.*pre_ln=False"):
    bert_import.params_from_hf(hf_bert.state_dict(), {**config, 'pre_ln': True})


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(hidden_act='relu'), 'hidden_act'),
    (dict(position_embedding_type='relative_key'), 'position_embedding_type'),
    (dict(is_decoder=True), 'is_decoder'),
  ],
)
def test_bert_unsupported_config_raises(overrides, match):
  config = _hf_bert_config()
  for name, value in overrides.items():
    setattr(config, name, value)
  with pytest.raises(UserError, match=match):
    bert_import.config_from_hf(config)
  with pytest.raises(UserError, match='head'):
    bert_import.config_from_hf(_hf_bert_config(), head='regress')
