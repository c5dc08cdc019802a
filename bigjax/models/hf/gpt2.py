"""HuggingFace GPT-2 <-> bigjax `gpt.Model`: the config, the tensor mapping (one `hf.convert.Mapping`
for PyTorch state dicts, `save_pretrained` directories and export) and the exported config
(logits equal to 1e-4: tests/test_hf_parity.py, tests/test_hf_import.py)."""

import flax

from bigjax.errors import UserError
from bigjax.models.gpt import Model
from bigjax.models.hf import convert as hf_convert

MODEL = 'gpt'  # the bigjax model family (config.model.name)
MODEL_TYPES = ('gpt2',)  # config.json model_type
# bigjax field -> the HF config.json field that states it (for messages)
HF_NAMES = {
  'vocab_size': 'vocab_size',
  'num_layers': 'n_layer',
  'num_heads': 'n_head',
  'embed_dim': 'n_embd',
  'mlp_dim': 'n_inner',
  'max_len': 'n_positions',
  'norm_eps': 'layer_norm_epsilon',
}

_HF_GPT2_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh')  # both the tanh GELU that 'gelu' is


def config_from_hf(hf_config):
  """gpt.Model kwargs (a dict) reproducing a HuggingFace GPT2Config (or its to_dict()).

  Sets vocab_size, num_layers, num_heads, embed_dim, mlp_dim (n_inner or 4 * n_embd),
  max_len=n_positions, norm_eps=layer_norm_epsilon, positions='learned', activation='gelu',
  dropout=0.0 (set it for fine-tuning), use_bias=True. Raises UserError for settings gpt.Model
  cannot reproduce: activation_function other than gelu_new/gelu_pytorch_tanh,
  scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, scale_attn_weights=False,
  add_cross_attention, untied word embeddings.
  """
  get = lambda name, default=None: hf_convert.hf_field(hf_config, name, default)
  act = get('activation_function', 'gelu_new')
  if act not in _HF_GPT2_ACTIVATIONS:
    raise UserError(
      f'HF GPT-2 config activation_function={act!r} is not supported: gpt.Model '
      f'uses the tanh GELU ({" / ".join(_HF_GPT2_ACTIVATIONS)}); this checkpoint '
      'cannot be converted'
    )
  for name, default, unsupported in (
    ('scale_attn_by_inverse_layer_idx', False, True),
    ('reorder_and_upcast_attn', False, True),
    ('scale_attn_weights', True, False),
    ('add_cross_attention', False, True),
    ('tie_word_embeddings', True, False),
  ):
    if bool(get(name, default)) == unsupported:
      raise UserError(
        f'HF GPT-2 config {name}={get(name)!r} is not supported by gpt.Model (it '
        f'needs {name}={not unsupported}); this checkpoint cannot be converted'
      )
  d = get('n_embd')
  return dict(
    vocab_size=get('vocab_size'),
    num_layers=get('n_layer'),
    num_heads=get('n_head'),
    embed_dim=d,
    mlp_dim=get('n_inner') or 4 * d,
    max_len=get('n_positions'),
    norm_eps=get('layer_norm_epsilon', 1e-5),
    positions='learned',
    activation='gelu',
    dropout=0.0,
    use_bias=True,
  )


def architecture(hf_config) -> dict:
  """The gpt.Model fields a GPT-2 config.json fixes (config_from_hf without the training choice
  dropout, plus the layout fields norm, pre_ln and num_kv_heads)."""
  arch = config_from_hf(hf_config)
  del arch['dropout']
  return dict(arch, norm='layernorm', pre_ln=True, num_kv_heads=None)


def _check_model(model, what):
  hf_convert.require(
    model,
    dict(positions='learned', norm='layernorm', activation='gelu', use_bias=True, pre_ln=True),
    what,
  )
  if model.num_kv_heads not in (None, model.num_heads):
    raise UserError(
      f'{what}: config field num_kv_heads={model.num_kv_heads} does not match GPT-2 '
      'weights, which need num_kv_heads=None; start from config_from_hf(...)'
    )
  if model.embed_dim % model.num_heads:
    raise UserError(
      f'{what}: config embed_dim={model.embed_dim} is not divisible by num_heads={model.num_heads}'
    )


def mapping(model: Model, what: str = 'gpt2') -> hf_convert.Mapping:
  """GPT2LMHeadModel / GPT2Model tensors <-> gpt.Model params.

  GPT-2's Conv1D weights are (in, out) already: c_attn (D, 3D) splits into query/key/value kernels
  (D, N, H) and biases (N, H); attn.c_proj (D, D) is the 'out' kernel (N, H, D). lm_head is the
  tied token embedding (checked equal when present). Buffers (attn.bias, attn.masked_bias) and
  other heads are ignored.
  """
  _check_model(model, what)
  d, v = model.embed_dim, model.vocab_size
  m = model.mlp_dim or 4 * d
  copy = hf_convert.copy

  def norm(name, path):
    return [
      copy(f'{name}.weight', (d,), f'{path}/scale'),
      copy(f'{name}.bias', (d,), f'{path}/bias'),
    ]

  rules = [
    copy('wte.weight', (v, d), 'embed/embedding'),
    copy('wpe.weight', (model.max_len, d), 'position_embed/embedding'),
    *norm('ln_f', 'stack/final_norm'),
  ]
  for i in range(model.num_layers):
    p, q = f'h.{i}.', f'stack/layer_{i}/'
    attn = q + 'self_attention/'
    qkv = ('query', 'key', 'value')
    rules += [
      *norm(p + 'ln_1', q + 'attention_norm'),
      hf_convert.split(
        p + 'attn.c_attn.weight', (d, 3 * d), tuple(f'{attn}{x}/kernel' for x in qkv), axis=1
      ),
      hf_convert.split(
        p + 'attn.c_attn.bias', (3 * d,), tuple(f'{attn}{x}/bias' for x in qkv), axis=0
      ),
      copy(p + 'attn.c_proj.weight', (d, d), attn + 'out/kernel'),
      copy(p + 'attn.c_proj.bias', (d,), attn + 'out/bias'),
      *norm(p + 'ln_2', q + 'mlp_norm'),
      copy(p + 'mlp.c_fc.weight', (d, m), q + 'mlp/wi/kernel'),
      copy(p + 'mlp.c_fc.bias', (m,), q + 'mlp/wi/bias'),
      copy(p + 'mlp.c_proj.weight', (m, d), q + 'mlp/wo/kernel'),
      copy(p + 'mlp.c_proj.bias', (d,), q + 'mlp/wo/bias'),
    ]
  return hf_convert.Mapping(
    prefix='transformer.',
    rules=rules,
    unprefixed=('lm_head.',),
    tied=(('lm_head.weight', 'embed/embedding'),),
  )


def hf_config(model: Model) -> dict:
  """The GPT2Config (as config.json's dict) of a gpt.Model with GPT-2's layout."""
  _check_model(model, 'export')
  return dict(
    architectures=['GPT2LMHeadModel'],
    model_type='gpt2',
    vocab_size=model.vocab_size,
    n_layer=model.num_layers,
    n_head=model.num_heads,
    n_embd=model.embed_dim,
    n_inner=model.mlp_dim or 4 * model.embed_dim,
    n_positions=model.max_len,
    layer_norm_epsilon=model.norm_eps,
    activation_function='gelu_new',
    tie_word_embeddings=True,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )


def params_from_hf(state_dict, config):
  """gpt.Model params from a HuggingFace GPT-2 PyTorch state dict.

  state_dict: {name: torch tensor or numpy array} of GPT2LMHeadModel or GPT2Model, names with or
  without the 'transformer.' prefix (e.g. hf_model.state_dict()). config: gpt.Model kwargs (dict
  or ConfigDict), normally config_from_hf(hf_model.config); scan=True is supported (layers
  stacked on a leading axis), remat/attention/dtype are free. Returns the unboxed tree that
  `Model(**config).init(...)['params']` builds, as float32 numpy arrays, ready for
  `model.apply({'params': params}, tokens_BT)` (see `mapping` for the layout). Raises UserError
  naming any missing entry or shape mismatch, and for config fields that HF GPT-2 weights cannot
  fill.
  """
  what = 'gpt.params_from_hf'
  model = hf_convert.build(Model, hf_convert.model_kwargs(config, what), what)
  rules = mapping(model, what)
  target = hf_convert.abstract_params(model, min(8, model.max_len))
  source = hf_convert.StateDictSource(state_dict, rules.prefix, what)
  flat, _ = hf_convert.load_all(source, rules, hf_convert.flat_shapes(target), what)
  return hf_convert.check_tree(flax.traverse_util.unflatten_dict(flat, sep='/'), target, what)
