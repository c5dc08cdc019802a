"""HuggingFace GPT-2 -> bigjax `gpt.Model`: the config and the PyTorch state dict (logits equal to
1e-4, tests/test_hf_parity.py)."""

from bigjax.errors import UserError
from bigjax.models.gpt import Model
from bigjax.models.hf import convert as hf_convert

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


def params_from_hf(state_dict, config):
  """gpt.Model params from a HuggingFace GPT-2 PyTorch state dict.

  state_dict: {name: torch tensor or numpy array} of GPT2LMHeadModel or GPT2Model, names with or
  without the 'transformer.' prefix (e.g. hf_model.state_dict()). config: gpt.Model kwargs (dict
  or ConfigDict), normally config_from_hf(hf_model.config); scan=True is supported (layers
  stacked on a leading axis), remat/attention/dtype are free. Returns the unboxed tree that
  `Model(**config).init(...)['params']` builds, as float32 numpy arrays, ready for
  `model.apply({'params': params}, tokens_BT)`.

  GPT-2's Conv1D weights are (in, out) already: c_attn (D, 3D) splits into query/key/value kernels
  (D, N, H) and biases (N, H); attn.c_proj (D, D) becomes the 'out' kernel (N, H, D). lm_head is
  the tied token embedding (checked equal when present). Buffers (attn.bias, attn.masked_bias)
  and other heads are ignored. Raises UserError naming any missing entry or shape mismatch, and
  for config fields that HF GPT-2 weights cannot fill.
  """
  what = 'gpt.params_from_hf'
  model = hf_convert.build(Model, hf_convert.model_kwargs(config, what), what)
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
  sd = hf_convert.StateDict(state_dict, 'transformer.', what)
  d, n, m = model.embed_dim, model.num_heads, model.mlp_dim or 4 * model.embed_dim
  h = d // n

  def norm(name):
    return {'scale': sd.take((d,), f'{name}.weight'), 'bias': sd.take((d,), f'{name}.bias')}

  def conv1d(name, d_in, d_out):  # Conv1D: y = x @ weight + bias, weight (in, out)
    return {
      'kernel': sd.take((d_in, d_out), f'{name}.weight'),
      'bias': sd.take((d_out,), f'{name}.bias'),
    }

  def layer(i):
    p = f'h.{i}.'
    qkv = conv1d(p + 'attn.c_attn', d, 3 * d)  # output columns [q | k | v], each head-major
    attn = {
      name: {
        'kernel': qkv['kernel'][:, j * d : (j + 1) * d].reshape(d, n, h),
        'bias': qkv['bias'][j * d : (j + 1) * d].reshape(n, h),
      }
      for j, name in enumerate(('query', 'key', 'value'))
    }
    out = conv1d(p + 'attn.c_proj', d, d)
    attn['out'] = {'kernel': out['kernel'].reshape(n, h, d), 'bias': out['bias']}
    return {
      'attention_norm': norm(p + 'ln_1'),
      'self_attention': attn,
      'mlp_norm': norm(p + 'ln_2'),
      'mlp': {'wi': conv1d(p + 'mlp.c_fc', d, m), 'wo': conv1d(p + 'mlp.c_proj', m, d)},
    }

  wte = sd.take((model.vocab_size, d), 'wte.weight')
  sd.check_tied('lm_head.weight', wte)
  stack = hf_convert.stack_layers([layer(i) for i in range(model.num_layers)], model.scan)
  stack['final_norm'] = norm('ln_f')
  params = {
    'embed': {'embedding': wte},
    'position_embed': {'embedding': sd.take((model.max_len, d), 'wpe.weight')},
    'stack': stack,
  }
  target = hf_convert.abstract_params(model, min(8, model.max_len))
  return hf_convert.check_tree(params, target, what)
