"""HuggingFace BERT -> bigjax `bert.Model`: the config and the PyTorch state dict
(BertForPreTraining / BertForMaskedLM / BertModel; logits equal to 1e-4, tests/test_hf_parity.py)."""

import flax.linen as nn

from bigjax.errors import UserError
from bigjax.models.bert import Model
from bigjax.models.hf import convert as hf_convert

# ----------------------------------------------------------------------------------------------
# HuggingFace BERT weights (BertForPreTraining / BertForMaskedLM / BertModel PyTorch state dicts).

_HF_BERT_ACTIVATIONS = ('gelu', 'gelu_python')  # HF's exact (erf) GELUs, which 'gelu_exact' is


def config_from_hf(hf_config, head='pretrain', num_classes=2):
  """bert.Model kwargs (a dict) reproducing a HuggingFace BertConfig (or its to_dict()).

  Sets vocab_size, num_layers, num_heads, embed_dim, mlp_dim=intermediate_size,
  max_len=max_position_embeddings, type_vocab_size, norm_eps=layer_norm_eps,
  activation='gelu_exact', pre_ln=False, dropout=0.0 (set it, e.g. to hidden_dropout_prob, for
  fine-tuning), head, num_classes, and pad_id=hf_config.pad_token_id: HF BERT's pad id (0) is not
  bigjax's byte-level PAD (256), and bert.Model masks the tokens equal to pad_id out of
  attention as HF does with attention_mask = (ids != pad_token_id). pad_token_id None gives
  pad_id=-1 (no token is masked). Raises UserError for settings bert.Model cannot reproduce:
  hidden_act other than the exact GELU, position_embedding_type other than 'absolute',
  is_decoder, add_cross_attention; and for an unknown head.
  """
  get = lambda name, default=None: hf_convert.hf_field(hf_config, name, default)
  if head not in ('pretrain', 'classify'):
    raise UserError(f"bert.config_from_hf: head={head!r} is unknown; use 'pretrain' or 'classify'")
  act = get('hidden_act', 'gelu')
  if act not in _HF_BERT_ACTIVATIONS:
    raise UserError(
      f'HF BERT config hidden_act={act!r} is not supported: bert.Model uses the '
      f'exact GELU ({" / ".join(_HF_BERT_ACTIVATIONS)}); this checkpoint cannot be '
      'converted'
    )
  positions = get('position_embedding_type', 'absolute') or 'absolute'
  if positions != 'absolute':
    raise UserError(
      f'HF BERT config position_embedding_type={positions!r} is not supported: '
      "bert.Model has absolute learned positions only ('absolute')"
    )
  for name in ('is_decoder', 'add_cross_attention'):
    if get(name, False):
      raise UserError(
        f'HF BERT config {name}=True is not supported: bert.Model is an encoder '
        'without causal or cross-attention; this checkpoint cannot be converted'
      )
  pad = get('pad_token_id')
  return dict(
    vocab_size=get('vocab_size'),
    num_layers=get('num_hidden_layers'),
    num_heads=get('num_attention_heads'),
    embed_dim=get('hidden_size'),
    mlp_dim=get('intermediate_size'),
    max_len=get('max_position_embeddings'),
    type_vocab_size=get('type_vocab_size', 2),
    dropout=0.0,
    head=head,
    num_classes=num_classes,
    pad_id=-1 if pad is None else pad,
    activation='gelu_exact',
    norm_eps=get('layer_norm_eps', 1e-12),
    pre_ln=False,
  )


def params_from_hf(state_dict, config, init_params=None):
  """bert.Model params from a HuggingFace BERT PyTorch state dict.

  state_dict: {name: torch tensor or numpy array} of BertForPreTraining, BertForMaskedLM or
  BertModel (or another Bert* model: unknown entries are ignored), names with or without the
  'bert.' prefix. config: bert.Model kwargs (dict or ConfigDict), normally
  config_from_hf(hf_model.config, head=...); scan=True is supported. Returns the unboxed params
  tree as float32 numpy arrays, for `model.apply({'params': params}, tokens_BT, segment_ids_BT)`.

  nn.Linear weights (out, in) are transposed; query/key/value kernels become (D, N, H), biases
  (N, H), attention.output.dense the 'out' kernel (N, H, D). The encoder (embeddings, layers) is
  always required. Heads:
    head='pretrain': pooler (pooler.dense), MLM head (cls.predictions.transform.dense/LayerNorm;
      its decoder is the tied word embedding, checked equal when present; cls.predictions.bias ->
      'mlm_bias') and NSP head (cls.seq_relationship -> 'nsp'). BertModel has no MLM/NSP head and
      BertForMaskedLM no pooler/NSP head: a missing head raises UserError unless init_params is
      given.
    head='classify': pooler required. HF has no weights for bigjax's 'classifier' head, so without
      init_params the returned tree has every parameter except 'classifier'; complete it from a
      fresh init: `params = {**nn.meta.unbox(model.init(rng, tokens))['params'], **converted}`.
  init_params: optional, the same model's params from its init (boxed or unboxed, with or
  without the {'params': ...} wrapper). Heads absent from the state dict (and 'classifier') are
  then copied from it, so the result is the complete tree. Raises UserError naming any missing
  entry or shape mismatch, and for config fields that HF BERT weights cannot fill.
  """
  what = 'bert.params_from_hf'
  model = hf_convert.build(Model, hf_convert.model_kwargs(config, what), what)
  hf_convert.require(model, dict(activation='gelu_exact', pre_ln=False), what)
  if model.num_kv_heads not in (None, model.num_heads):
    raise UserError(
      f'{what}: config field num_kv_heads={model.num_kv_heads} does not match BERT '
      'weights, which need num_kv_heads=None; start from config_from_hf(...)'
    )
  if model.head not in ('pretrain', 'classify'):
    raise UserError(f"{what}: config head={model.head!r} is unknown; use 'pretrain' or 'classify'")
  if model.embed_dim % model.num_heads:
    raise UserError(
      f'{what}: config embed_dim={model.embed_dim} is not divisible by num_heads={model.num_heads}'
    )
  target = hf_convert.abstract_params(model, min(8, model.max_len))
  fresh = None
  if init_params is not None:
    fresh = nn.meta.unbox(init_params)
    if set(fresh) == {'params'}:
      fresh = fresh['params']
    fresh = hf_convert.check_tree(fresh, target, f'{what} (init_params)')
  sd = hf_convert.StateDict(state_dict, 'bert.', what)
  d, n, v = model.embed_dim, model.num_heads, model.vocab_size
  m, h = model.mlp_dim or 4 * d, d // n

  def norm(name):  # original-BERT conversions name LayerNorm's parameters gamma/beta
    return {
      'scale': sd.take((d,), f'{name}.weight', f'{name}.gamma'),
      'bias': sd.take((d,), f'{name}.bias', f'{name}.beta'),
    }

  def linear(name, d_in, d_out):  # nn.Linear: y = x @ weight.T + bias, weight (out, in)
    return {
      'kernel': sd.take((d_out, d_in), f'{name}.weight').T,
      'bias': sd.take((d_out,), f'{name}.bias'),
    }

  def layer(i):
    p = f'encoder.layer.{i}.'
    attn = {}
    for name in ('query', 'key', 'value'):
      proj = linear(p + f'attention.self.{name}', d, d)  # output features head-major
      attn[name] = {'kernel': proj['kernel'].reshape(d, n, h), 'bias': proj['bias'].reshape(n, h)}
    out = linear(p + 'attention.output.dense', d, d)
    attn['out'] = {'kernel': out['kernel'].reshape(n, h, d), 'bias': out['bias']}
    return {
      'self_attention': attn,
      'attention_norm': norm(p + 'attention.output.LayerNorm'),
      'mlp': {'wi': linear(p + 'intermediate.dense', d, m), 'wo': linear(p + 'output.dense', m, d)},
      'mlp_norm': norm(p + 'output.LayerNorm'),
    }

  word = sd.take((v, d), 'embeddings.word_embeddings.weight')
  params = {
    'embed': {'embedding': word},
    'position_embed': {
      'embedding': sd.take((model.max_len, d), 'embeddings.position_embeddings.weight')
    },
    'segment_embed': {
      'embedding': sd.take((model.type_vocab_size, d), 'embeddings.token_type_embeddings.weight')
    },
    'embed_norm': norm('embeddings.LayerNorm'),
    'stack': hf_convert.stack_layers([layer(i) for i in range(model.num_layers)], model.scan),
  }

  def mlm():
    sd.check_tied('cls.predictions.decoder.weight', word)
    return {
      'mlm_dense': linear('cls.predictions.transform.dense', d, d),
      'mlm_norm': norm('cls.predictions.transform.LayerNorm'),
      'mlm_bias': sd.take((v,), 'cls.predictions.bias', 'cls.predictions.decoder.bias'),
    }

  # (description, entry that marks the head as present, its params, converter)
  heads = [
    ('pooler', 'pooler.dense.weight', ('pooler',), lambda: {'pooler': linear('pooler.dense', d, d)})
  ]
  if model.head == 'pretrain':
    heads += [
      (
        'MLM head',
        'cls.predictions.transform.dense.weight',
        ('mlm_dense', 'mlm_norm', 'mlm_bias'),
        mlm,
      ),
      (
        'NSP head',
        'cls.seq_relationship.weight',
        ('nsp',),
        lambda: {'nsp': linear('cls.seq_relationship', d, 2)},
      ),
    ]
  for label, marker, names, convert in heads:
    if sd.has(marker):
      params.update(convert())
    elif fresh is not None:
      params.update({name: fresh[name] for name in names})
    else:
      raise UserError(
        f'{what}: state dict has no {label} ({marker!r}) for head={model.head!r} (BertModel '
        'checkpoints lack the MLM/NSP heads, BertForMaskedLM ones the pooler and NSP head); '
        'pass init_params=<params from model.init> to start missing heads fresh'
        + (", or convert with head='classify'" if label == 'NSP head' else '')
      )
  if model.head == 'classify':
    if fresh is not None:
      params['classifier'] = fresh['classifier']
    else:
      target = {k: t for k, t in target.items() if k != 'classifier'}
  return hf_convert.check_tree(params, target, what)
