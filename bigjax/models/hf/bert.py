"""HuggingFace BERT <-> bigjax `bert.Model`: the config, the tensor mapping (one
`hf.convert.Mapping` for PyTorch state dicts, `save_pretrained` directories and export) and the
exported config (BertForPreTraining / BertForMaskedLM / BertModel; logits equal to 1e-4:
tests/test_hf_parity.py, tests/test_hf_import.py)."""

import flax
import flax.linen as nn

from bigjax.errors import UserError
from bigjax.models.bert import Model
from bigjax.models.hf import convert as hf_convert

MODEL = 'bert'  # the bigjax model family (config.model.name)
MODEL_TYPES = ('bert',)  # config.json model_type
# bigjax field -> the HF config.json field that states it (for messages)
HF_NAMES = {
  'vocab_size': 'vocab_size',
  'num_layers': 'num_hidden_layers',
  'num_heads': 'num_attention_heads',
  'embed_dim': 'hidden_size',
  'mlp_dim': 'intermediate_size',
  'max_len': 'max_position_embeddings',
  'type_vocab_size': 'type_vocab_size',
  'pad_id': 'pad_token_id',
  'norm_eps': 'layer_norm_eps',
}

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


def architecture(hf_config) -> dict:
  """The bert.Model fields a BERT config.json fixes: config_from_hf without the bigjax-side
  choices (head, num_classes, dropout), plus num_kv_heads=None."""
  arch = config_from_hf(hf_config)
  for name in ('head', 'num_classes', 'dropout'):
    del arch[name]
  return dict(arch, num_kv_heads=None)


def _check_model(model, what):
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


# Optional parts: (group, what a checkpoint without it is) -- see `mapping`.
POOLER, MLM, NSP = 'pooler', 'MLM head', 'NSP head'


def mapping(model: Model, what: str = 'bert') -> hf_convert.Mapping:
  """BertForPreTraining / BertForMaskedLM / BertModel tensors <-> bert.Model params.

  nn.Linear weights (out, in) are transposed; query/key/value kernels become (D, N, H), biases
  (N, H), attention.output.dense the 'out' kernel (N, H, D). The encoder (embeddings, layers) is
  required; the pooler (pooler.dense), the MLM head (cls.predictions.transform.dense/LayerNorm,
  cls.predictions.bias -> 'mlm_bias'; its decoder is the tied word embedding, checked equal when
  present) and the NSP head (cls.seq_relationship -> 'nsp') are optional groups (BertModel has no
  MLM/NSP head, BertForMaskedLM no pooler/NSP head). head='classify' uses the pooler; HF has no
  weights for bigjax's 'classifier', which keeps its initialisation.
  """
  _check_model(model, what)
  d, v = model.embed_dim, model.vocab_size
  m = model.mlp_dim or 4 * d
  copy, linear = hf_convert.copy, hf_convert.linear

  def norm(name, path, group=''):  # original-BERT conversions name LayerNorm's params gamma/beta
    return [
      copy((f'{name}.weight', f'{name}.gamma'), (d,), f'{path}/scale', group),
      copy((f'{name}.bias', f'{name}.beta'), (d,), f'{path}/bias', group),
    ]

  def dense(name, d_in, d_out, path, group=''):
    return [
      linear(f'{name}.weight', (d_out, d_in), f'{path}/kernel', group),
      copy(f'{name}.bias', (d_out,), f'{path}/bias', group),
    ]

  rules = [
    copy('embeddings.word_embeddings.weight', (v, d), 'embed/embedding'),
    copy('embeddings.position_embeddings.weight', (model.max_len, d), 'position_embed/embedding'),
    copy(
      'embeddings.token_type_embeddings.weight',
      (model.type_vocab_size, d),
      'segment_embed/embedding',
    ),
    *norm('embeddings.LayerNorm', 'embed_norm'),
  ]
  for i in range(model.num_layers):
    p, q = f'encoder.layer.{i}.', f'stack/layer_{i}/'
    for name in ('query', 'key', 'value'):  # output features head-major
      rules += dense(p + f'attention.self.{name}', d, d, q + f'self_attention/{name}')
    rules += [
      *dense(p + 'attention.output.dense', d, d, q + 'self_attention/out'),
      *norm(p + 'attention.output.LayerNorm', q + 'attention_norm'),
      *dense(p + 'intermediate.dense', d, m, q + 'mlp/wi'),
      *dense(p + 'output.dense', m, d, q + 'mlp/wo'),
      *norm(p + 'output.LayerNorm', q + 'mlp_norm'),
    ]
  rules += dense('pooler.dense', d, d, 'pooler', POOLER)
  tied: tuple[tuple[str, str], ...] = ()
  if model.head == 'pretrain':
    rules += [
      *dense('cls.predictions.transform.dense', d, d, 'mlm_dense', MLM),
      *norm('cls.predictions.transform.LayerNorm', 'mlm_norm', MLM),
      copy(('cls.predictions.bias', 'cls.predictions.decoder.bias'), (v,), 'mlm_bias', MLM),
      *dense('cls.seq_relationship', d, 2, 'nsp', NSP),
    ]
    tied = (('cls.predictions.decoder.weight', 'embed/embedding'),)
  return hf_convert.Mapping(
    prefix='bert.',
    rules=rules,
    unprefixed=('cls.',),
    tied=tied,
    fresh=('^classifier/',),
  )


def hf_config(model: Model) -> dict:
  """The BertConfig (as config.json's dict) of a bert.Model with head='pretrain'."""
  _check_model(model, 'export')
  if model.head != 'pretrain':
    raise UserError(
      f"export: a bert run with head={model.head!r} has no HuggingFace counterpart here (bigjax's "
      "classifier head is not BertForSequenceClassification's); export a head='pretrain' run"
    )
  return dict(
    architectures=['BertForPreTraining'],
    model_type='bert',
    vocab_size=model.vocab_size,
    hidden_size=model.embed_dim,
    num_hidden_layers=model.num_layers,
    num_attention_heads=model.num_heads,
    intermediate_size=model.mlp_dim or 4 * model.embed_dim,
    max_position_embeddings=model.max_len,
    type_vocab_size=model.type_vocab_size,
    layer_norm_eps=model.norm_eps,
    hidden_act='gelu',
    pad_token_id=model.pad_id if model.pad_id >= 0 else None,
    hidden_dropout_prob=model.dropout,
    attention_probs_dropout_prob=model.dropout,
    tie_word_embeddings=True,
  )


def params_from_hf(state_dict, config, init_params=None):
  """bert.Model params from a HuggingFace BERT PyTorch state dict.

  state_dict: {name: torch tensor or numpy array} of BertForPreTraining, BertForMaskedLM or
  BertModel (or another Bert* model: unknown entries are ignored), names with or without the
  'bert.' prefix. config: bert.Model kwargs (dict or ConfigDict), normally
  config_from_hf(hf_model.config, head=...); scan=True is supported. Returns the unboxed params
  tree as float32 numpy arrays, for `model.apply({'params': params}, tokens_BT, segment_ids_BT)`
  (the layout: `mapping`). Heads:
    head='pretrain': pooler, MLM head and NSP head; a head the state dict lacks raises UserError
      unless init_params is given.
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
  rules = mapping(model, what)
  target = hf_convert.abstract_params(model, min(8, model.max_len))
  fresh = None
  if init_params is not None:
    fresh = nn.meta.unbox(init_params)
    if 'params' in fresh:  # model.init's variables ({'params': ...} and other collections)
      fresh = fresh['params']
    fresh = hf_convert.check_tree(fresh, target, f'{what} (init_params)')
  source = hf_convert.StateDictSource(state_dict, rules.prefix, what)
  flat, plan = hf_convert.load_all(source, rules, hf_convert.flat_shapes(target), what)
  if plan.absent_groups and fresh is None:
    group = plan.absent_groups[0]
    marker = next(r.name for r in rules.rules if r.group == group)
    raise UserError(
      f'{what}: state dict has no {group} ({marker!r}) for head={model.head!r} (BertModel '
      'checkpoints lack the MLM/NSP heads, BertForMaskedLM ones the pooler and NSP head); '
      'pass init_params=<params from model.init> to start missing heads fresh'
      + (", or convert with head='classify'" if group == NSP else '')
    )
  if fresh is not None:
    fresh_flat = flax.traverse_util.flatten_dict(fresh, sep='/')
    flat.update({k: fresh_flat[k] for k in plan.fresh})
  else:  # head='classify' without init_params: everything but the classifier
    target = {k: t for k, t in target.items() if k != 'classifier'}
  return hf_convert.check_tree(flax.traverse_util.unflatten_dict(flat, sep='/'), target, what)
