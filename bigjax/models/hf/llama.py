"""HuggingFace Llama / Mistral / Qwen2 (and SmolLM, a Llama) <-> bigjax `llama.Model`: the
architecture a config.json states, the tensor mapping (one `hf.convert.Mapping` for PyTorch state
dicts, `save_pretrained` directories and export) and the exported config (logits equal to 1e-4:
tests/test_hf_import.py).

HF's q_proj/k_proj rows are already in the half-split order its `rotate_half` (and bigjax's
`apply_rotary`) rotates, so every projection maps with a plain transpose.
"""

from __future__ import annotations

from bigjax.errors import UserError
from bigjax.models.hf import convert as hf_convert
from bigjax.models.llama import Model

MODEL = 'llama'  # the bigjax model family (config.model.name)
MODEL_TYPES = ('llama', 'mistral', 'qwen2')  # config.json model_type
# bigjax field -> the HF config.json field that states it (for messages)
HF_NAMES = {
  'vocab_size': 'vocab_size',
  'num_layers': 'num_hidden_layers',
  'num_heads': 'num_attention_heads',
  'num_kv_heads': 'num_key_value_heads',
  'embed_dim': 'hidden_size',
  'head_dim': 'head_dim',
  'mlp_dim': 'intermediate_size',
  'max_len': 'max_position_embeddings',
  'rope_theta': 'rope_parameters.rope_theta',
  'norm_eps': 'rms_norm_eps',
  'qkv_bias': 'attention_bias',
  'out_bias': 'attention_bias',
  'tie_embeddings': 'tie_word_embeddings',
}


def _rope_theta(get) -> float:
  """RoPE base from rope_parameters (transformers >= 5), rope_scaling or rope_theta (older
  config.json files); UserError for scaled variants (llama3, yarn, linear, dynamic, ...)."""
  rope = get('rope_parameters') or get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ('default', None):
    raise UserError(
      f"HF config rope_parameters.rope_type={kind!r} is not supported: llama.Model has plain "
      "RoPE ('default'); this checkpoint cannot be converted"
    )
  if rope.get('partial_rotary_factor', get('partial_rotary_factor', 1.0)) != 1.0:
    raise UserError('HF config partial_rotary_factor != 1 is not supported by llama.Model')
  return float(rope.get('rope_theta', get('rope_theta', 10000.0)))


def architecture(hf_config) -> dict:
  """llama.Model kwargs a LlamaConfig / MistralConfig / Qwen2Config (or its config.json dict)
  states: sizes, heads, kv heads, head_dim, rope_theta, rms_norm_eps, biases (Llama's
  attention_bias on q/k/v/o; Qwen2's q/k/v biases), tie_word_embeddings. A sliding window
  (Mistral's sliding_window, Qwen2's use_sliding_window) bounds max_len: within the window full
  causal attention is what HF computes (in windowed and full layers alike). Raises UserError for
  what llama.Model cannot reproduce: hidden_act other than silu, mlp_bias, scaled RoPE.
  """
  get = lambda name, default=None: hf_convert.hf_field(hf_config, name, default)
  kind = get('model_type', 'llama')
  if kind not in MODEL_TYPES:
    raise UserError(
      f'HF config model_type={kind!r} is not a Llama-family model ({", ".join(MODEL_TYPES)})'
    )
  act = get('hidden_act', 'silu')
  if act != 'silu':
    raise UserError(
      f"HF config hidden_act={act!r} is not supported: llama.Model's SwiGLU uses silu"
    )
  if get('mlp_bias', False):
    raise UserError('HF config mlp_bias=True is not supported: llama.Model has a bias-free MLP')
  d, n = get('hidden_size'), get('num_attention_heads')
  max_len = get('max_position_embeddings')
  windowed = kind == 'mistral' or get('use_sliding_window', False)
  windowed = windowed or 'sliding_attention' in (get('layer_types') or ())
  window = get('sliding_window') if windowed else None
  if window:  # every layer, windowed or not, attends fully within the window
    max_len = min(max_len, window)
  bias = bool(get('attention_bias', False))
  return dict(
    vocab_size=get('vocab_size'),
    num_layers=get('num_hidden_layers'),
    num_heads=n,
    num_kv_heads=get('num_key_value_heads') or n,
    embed_dim=d,
    head_dim=get('head_dim') or d // n,
    mlp_dim=get('intermediate_size'),
    max_len=max_len,
    rope_theta=_rope_theta(get),
    norm_eps=float(get('rms_norm_eps', 1e-6)),
    qkv_bias=bias or kind == 'qwen2',
    out_bias=bias,
    tie_embeddings=bool(get('tie_word_embeddings', False)),
  )


def mapping(model: Model, what: str = 'llama') -> hf_convert.Mapping:
  """LlamaForCausalLM / LlamaModel (and Mistral, Qwen2) tensors <-> llama.Model params.

  nn.Linear weights (out, in) are transposed: q_proj (N*H, D) -> query kernel (D, N, H), k_proj and
  v_proj (K*H, D) -> (D, K, H), o_proj (D, N*H) -> out kernel (N, H, D), gate/up_proj (M, D) ->
  wi_gate/wi_up (D, M), down_proj (D, M) -> wo (M, D), lm_head (V, D) -> lm_head kernel (D, V)
  (or, with tie_embeddings, checked equal to the embedding when present).
  """
  try:
    n, k, h = model.heads()
  except ValueError as e:
    raise UserError(f'{what}: {e}') from None
  d, v, m = model.embed_dim, model.vocab_size, model.mlp_dim or 4 * model.embed_dim
  copy, linear = hf_convert.copy, hf_convert.linear
  rules = [
    copy('embed_tokens.weight', (v, d), 'embed/embedding'),
    copy('norm.weight', (d,), 'stack/final_norm/scale'),
  ]
  for i in range(model.num_layers):
    p, q = f'layers.{i}.', f'stack/layer_{i}/'
    attn, hf_attn = q + 'self_attention/', p + 'self_attn.'
    for name, hf, heads in (('query', 'q_proj', n), ('key', 'k_proj', k), ('value', 'v_proj', k)):
      rules.append(linear(f'{hf_attn}{hf}.weight', (heads * h, d), f'{attn}{name}/kernel'))
      if model.qkv_bias:
        rules.append(copy(f'{hf_attn}{hf}.bias', (heads * h,), f'{attn}{name}/bias'))
    rules.append(linear(hf_attn + 'o_proj.weight', (d, n * h), attn + 'out/kernel'))
    if model.out_bias:
      rules.append(copy(hf_attn + 'o_proj.bias', (d,), attn + 'out/bias'))
    rules += [
      copy(p + 'input_layernorm.weight', (d,), q + 'attention_norm/scale'),
      copy(p + 'post_attention_layernorm.weight', (d,), q + 'mlp_norm/scale'),
      linear(p + 'mlp.gate_proj.weight', (m, d), q + 'mlp/wi_gate/kernel'),
      linear(p + 'mlp.up_proj.weight', (m, d), q + 'mlp/wi_up/kernel'),
      linear(p + 'mlp.down_proj.weight', (d, m), q + 'mlp/wo/kernel'),
    ]
  tied: tuple[tuple[str, str], ...] = ()
  if model.tie_embeddings:
    tied = (('lm_head.weight', 'embed/embedding'),)
  else:
    rules.append(linear('lm_head.weight', (v, d), 'lm_head/kernel'))
  return hf_convert.Mapping(prefix='model.', rules=rules, unprefixed=('lm_head.',), tied=tied)


def hf_config(model: Model, model_type: str = 'llama') -> dict:
  """The config.json dict of `model` as a LlamaForCausalLM (or Qwen2ForCausalLM: q/k/v biases
  without an output bias only exist there; or Mistral when model_type says so)."""
  n, k, h = model.heads()
  if model.out_bias and not model.qkv_bias:
    raise UserError('export: out_bias=True without qkv_bias has no HuggingFace Llama counterpart')
  if model.qkv_bias:
    model_type = 'llama' if model.out_bias else 'qwen2'
  elif model_type not in ('llama', 'mistral'):
    model_type = 'llama'
  classes = {
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
  }
  out = dict(
    architectures=[classes[model_type]],
    model_type=model_type,
    vocab_size=model.vocab_size,
    hidden_size=model.embed_dim,
    intermediate_size=model.mlp_dim or 4 * model.embed_dim,
    num_hidden_layers=model.num_layers,
    num_attention_heads=n,
    num_key_value_heads=k,
    head_dim=h,
    max_position_embeddings=model.max_len,
    rms_norm_eps=model.norm_eps,
    rope_parameters={'rope_type': 'default', 'rope_theta': model.rope_theta},
    hidden_act='silu',
    tie_word_embeddings=model.tie_embeddings,
    attention_dropout=model.dropout,
  )
  if model_type == 'qwen2':
    out.update(use_sliding_window=False)
  else:
    out.update(attention_bias=model.out_bias, mlp_bias=False)
  if model_type == 'mistral':
    out.update(sliding_window=None)
  return out
