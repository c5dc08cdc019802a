"""bigjax.models.llama: causal masking, grouped-query attention equal to multi-head attention with
repeated key/value heads, rotary positions that only see relative positions, scan equal to the
unscanned stack, the parameter count and the analytic FLOPs. (Parity with HuggingFace Llama,
Mistral and Qwen2 is in tests/test_hf_import.py.)"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.models import llama

V = 50
SMALL = dict(
  vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=48, max_len=16
)


def _init(model, seed=0, t=12):
  tokens = jnp.zeros((1, t), jnp.int32)
  return flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens))['params']


def _tokens(b=2, t=12, seed=1):
  return np.random.default_rng(seed).integers(0, V, size=(b, t))


def test_causal_future_tokens_do_not_change_earlier_logits():
  model = llama.Model(**SMALL)
  params = _init(model)
  ids = _tokens()
  changed = ids.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % V
  apply = jax.jit(model.apply)
  a, b = apply({'params': params}, ids), apply({'params': params}, changed)
  assert a.shape == (2, 12, V) and a.dtype == jnp.float32
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)
  assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3  # and later positions do see them


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
  gqa = llama.Model(**SMALL)
  mha = llama.Model(**{**SMALL, 'num_kv_heads': 4})
  params = _init(gqa)
  groups = 4 // 2  # query head n uses kv head n // groups
  repeated = jax.tree.map(lambda x: x, params)
  for i in range(2):
    attn = repeated['stack'][f'layer_{i}']['self_attention']
    for name in ('key', 'value'):
      attn[name]['kernel'] = jnp.repeat(attn[name]['kernel'], groups, axis=1)  # (D, K, H) -> N
  ids = _tokens()
  np.testing.assert_allclose(
    jax.jit(gqa.apply)({'params': params}, ids),
    jax.jit(mha.apply)({'params': repeated}, ids),
    rtol=1e-5,
    atol=1e-5,
  )


def test_rotary_attention_sees_relative_positions_only():
  """Shifting every position by 7 leaves causal self-attention unchanged (q_m . k_n depends on
  m - n only); stretching them (2p) changes it, so the rotation is really applied."""
  layer = llama.Attention(num_heads=4, num_kv_heads=2, head_dim=8)
  x = 20 * jax.random.normal(jax.random.key(0), (2, 10, 32))  # logits of order 1
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  variables = jax.jit(layer.init)(jax.random.key(1), x, pos)
  apply = jax.jit(layer.apply)
  base = apply(variables, x, pos)
  scale = np.abs(base).max()
  assert np.abs(apply(variables, x, pos + 7) - base).max() <= 1e-5 * scale
  assert np.abs(apply(variables, x, 2 * pos) - base).max() > 0.05 * scale


@pytest.mark.slow  # two more compiles (the scanned stack); scan is also covered by gpt's tests
def test_scan_equals_unscanned_stack():
  plain = llama.Model(**SMALL)
  scanned = llama.Model(**{**SMALL, 'scan': True})
  params = _init(plain)
  stack = dict(params['stack'])
  layers = [stack.pop(f'layer_{i}') for i in range(2)]
  stack['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  stacked = dict(params, stack=stack)
  want = jax.tree.map(lambda s: s.shape, _init(scanned))
  assert jax.tree.map(lambda s: s.shape, stacked) == want
  ids = _tokens()
  np.testing.assert_allclose(
    jax.jit(scanned.apply)({'params': stacked}, ids),
    jax.jit(plain.apply)({'params': params}, ids),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize('tie', [False, True])
def test_parameter_count_and_flops(tie):
  """Per layer: two RMSNorm scales, q (D, N, H), k and v (D, K, H), out (N, H, D), SwiGLU 3 D M;
  embedding V D, final norm D, untied head D V. FLOPs: 6 N_token T + 12 L T^2 N H."""
  model = llama.Model(**{**SMALL, 'tie_embeddings': tie})
  params = _init(model)
  d, n, k, h, m, layers = 32, 4, 2, 8, 48, 2
  per_layer = 2 * d + d * n * h + 2 * d * k * h + n * h * d + 3 * d * m
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == V * d + layers * per_layer + d + (0 if tie else d * V)
  assert ('lm_head' in params) != tie
  t = 12
  n_token = count - (0 if tie else V * d)  # the untied embedding is only looked up
  assert (
    model.train_flops_per_example(params, (t,)) == 6 * n_token * t + 12 * layers * t * t * n * h
  )


def test_bad_fields_raise_value_errors_naming_them():
  with pytest.raises(ValueError, match='num_kv_heads=3 must be a positive divisor of num_heads=4'):
    _init(llama.Model(**{**SMALL, 'num_kv_heads': 3}))
  with pytest.raises(ValueError, match='exceeds max_len=16'):
    _init(llama.Model(**SMALL), t=17)
  wide = llama.Model(**{**SMALL, 'num_heads': 3, 'num_kv_heads': 1, 'head_dim': 8})
  assert _init(wide)['stack']['layer_0']['self_attention']['query']['kernel'].shape == (32, 3, 8)


def test_llama_shakespeare_smoke_trains_one_step(one_device):
  """configs/llama_shakespeare.py:smoke builds, and one real train step from its init gives a
  finite loss near ln(260) (uniform over the byte vocabulary) and moves every parameter."""
  from bigjax import experiment, steps

  from conftest import load_config

  config = load_config('llama_shakespeare', 'smoke')
  config.optim.warmup_steps = 0
  exp = experiment.build(config, one_device)
  assert isinstance(exp.model, llama.Model) and exp.model.vocab_size == 260
  state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
  before = jax.device_get(state.params)
  new, metrics = exp.compile_train_step()(state, exp.to_global(exp.batches.batch(0)))
  metrics = jax.device_get(metrics)
  assert metrics['finite'] == 1.0 and abs(metrics['loss'] - np.log(260)) < 0.1
  after = jax.device_get(new.params)
  assert all(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  )
