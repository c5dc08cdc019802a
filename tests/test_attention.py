import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.errors import UserError
from bigjax.models import attention as A

B, T, S, N, H = 2, 5, 7, 4, 8
CHUNK = 3  # does not divide S = 7: the last key block is padded
# Compiling is most of these tests' time: inputs are numpy, each test jits its work once, and
# with XLA:CPU's backend optimisations off (these tests check numerics, not speed).
jit = functools.partial(
  jax.jit,
  compiler_options={'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True},
)


def _normal(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _qkv(T=T, S=S, K=N, seed=0):
  return (
    _normal((B, T, N, H), seed),
    _normal((B, S, K, H), seed + 1),
    _normal((B, S, K, H), seed + 2),
  )


def _valid(lengths, L):
  return np.arange(L)[None, :] < np.asarray(lengths)[:, None]


def _out_and_grads(fn, *args):
  """fn's output and the gradients of <output, fixed cotangent> w.r.t. each argument."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape))


# name: (T, S, K, mask, bias, causal); causal=True is handed to the reference as a mask.
_PAD_Q, _PAD_K = _valid([T, 3], T), _valid([S, 4], S)
_BIAS = _normal((1, N, T, S), 5)
CASES = {
  'none': (T, S, N, None, None, False),
  'causal': (T, S, N, None, None, True),
  'padding': (T, S, N, A.padding_mask(_PAD_Q, _PAD_K), None, False),
  'causal_padding': (T, S, N, A.padding_mask(_PAD_Q, _PAD_K), None, True),
  'bias': (T, S, N, None, _BIAS, False),
  'gqa': (T, S, 2, A.padding_mask(_PAD_Q, _PAD_K), None, True),
  'mqa': (T, S, 1, A.padding_mask(np.ones((B, T), bool), _PAD_K), _normal((B, 1, 1, S), 6), True),
  'T_lt_S': (2, 9, 2, None, None, True),  # decoding 2 tokens against 9 keys
}


@pytest.fixture(scope='module')
def attention_vs_reference():
  """{(case, implementation): ((out, grads), (ref, ref_grads))}, all computed under one jit."""

  def run(inputs):
    results = {}
    for name, (t, s, kv, mask, _, causal) in CASES.items():
      q, k, v, bias = inputs[name]
      full_mask = A.combine_masks(mask, A.causal_mask(t, s) if causal else None)
      want = _out_and_grads(
        lambda q, k, v, b: A.reference_attention(q, k, v, mask=full_mask, bias=b), q, k, v, bias
      )
      for impl in ('xla', 'chunked'):
        got = _out_and_grads(
          lambda q, k, v, b: A.dot_product_attention(
            q, k, v, mask=mask, bias=b, causal=causal, implementation=impl, chunk_size=CHUNK
          ),
          q,
          k,
          v,
          bias,
        )
        results[name, impl] = (got, want)
    return results

  inputs = {name: _qkv(t, s, kv) + (bias,) for name, (t, s, kv, _, bias, _) in CASES.items()}
  return jit(run)(inputs)


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
@pytest.mark.parametrize('case', list(CASES))
def test_dot_product_attention_matches_reference_values_and_gradients(
  attention_vs_reference, case, implementation
):
  t, _, _, _, bias, _ = CASES[case]
  (out, grads), (ref, ref_grads) = attention_vs_reference[case, implementation]
  assert out.shape == (B, t, N, H) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert (bias is None) == (grads[3] is None)  # q, k, v and (when given) bias
  for g, g_ref in zip(grads, ref_grads):
    if g is not None:
      assert g.shape == g_ref.shape
      np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  q, k, v = _qkv()
  mask = A.padding_mask(_valid([T, 2], T), _valid([S, 0], S))  # example 1: no valid key at all
  q6, k4, v4 = _qkv(6, 4)

  @jit
  def run(q, k, v, q6, k4, v4):
    res = {}
    for impl in ('xla', 'chunked'):
      fn = lambda q, k, v: A.dot_product_attention(
        q, k, v, mask=mask, implementation=impl, chunk_size=CHUNK
      )
      # Causal with T > S: the first T - S = 2 queries precede every key.
      late = A.dot_product_attention(q6, k4, v4, causal=True, implementation=impl, chunk_size=3)
      res[impl] = _out_and_grads(fn, q, k, v), late
    return res, A.reference_attention(q6, k4, v4, mask=A.causal_mask(6, 4))

  res, late_ref = run(q, k, v, q6, k4, v4)
  for impl, ((out, grads), late) in res.items():
    np.testing.assert_array_equal(out[1], 0.0, err_msg=impl)
    assert np.abs(np.asarray(out[0])).sum() > 0
    for g in grads:
      assert np.isfinite(g).all(), impl
      np.testing.assert_array_equal(g[1], 0.0, err_msg=impl)
    np.testing.assert_array_equal(late[:, :2], 0.0, err_msg=impl)
    np.testing.assert_allclose(late[:, 2:], late_ref[:, 2:], atol=1e-5, err_msg=impl)


def test_bfloat16_inputs_give_bfloat16_close_to_float32():
  q, k, v = _qkv(K=2)
  mask = A.padding_mask(_valid([T, 3], T), _valid([S, 4], S))

  @jit
  def run(q, k, v):
    f = lambda impl, dtype: A.dot_product_attention(
      *(x.astype(dtype) for x in (q, k, v)),
      mask=mask,
      causal=True,
      implementation=impl,
      chunk_size=CHUNK,
    )
    return {impl: (f(impl, jnp.bfloat16), f(impl, jnp.float32)) for impl in ('xla', 'chunked')}

  for impl, (out, out32) in run(q, k, v).items():
    assert out.dtype == jnp.bfloat16, impl
    np.testing.assert_allclose(out.astype(np.float32), out32, atol=3e-2, rtol=3e-2, err_msg=impl)


def test_chunked_handles_any_chunk_size():
  q, k, v = _qkv(K=2)
  sizes = (1, 2, 7, 128)  # 7 = S: one block; 128 > S: one padded block
  outs, ref = jit(
    lambda q, k, v: (
      [
        A.dot_product_attention(q, k, v, causal=True, implementation='chunked', chunk_size=c)
        for c in sizes
      ],
      A.reference_attention(q, k, v, mask=A.causal_mask(T, S)),
    )
  )(q, k, v)
  for c, out in zip(sizes, outs):
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=f'chunk_size={c}')
  with pytest.raises(UserError, match='chunk_size=0'):
    A.dot_product_attention(q, k, v, implementation='chunked', chunk_size=0)


def test_chunked_backward_with_dropout_matches_autodiff_of_its_forward():
  """The hand-written VJP (which regenerates the dropout pattern) equals plain autodiff."""
  q, k, v = _qkv(K=2)
  bias = _normal((1, N, T, 1), 7)  # broadcast over keys: its gradient sums over all key blocks
  mask = A.padding_mask(_valid([T, 3], T), _valid([S, 4], S))

  @jit
  def run(q, k, v, bias):
    rng = jax.random.key(3)
    chunked = A.chunked
    custom = lambda q, k, v, b: chunked._chunked_attention(q, k, v, mask, b, rng, True, 0.3, CHUNK)
    plain = lambda q, k, v, b: chunked._chunked_forward(q, k, v, mask, b, rng, True, 0.3, CHUNK)[0]
    return _out_and_grads(custom, q, k, v, bias), _out_and_grads(plain, q, k, v, bias)

  (out, grads), (ref, ref_grads) = run(q, k, v, bias)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_dropout_is_deterministic_per_rng_and_unbiased():
  q, k, v = _qkv(T=4, S=6)

  @jit
  def run(q, k, v):
    rngs = jax.random.split(jax.random.key(0), 2000)
    res = {}
    for impl in ('xla', 'chunked'):
      f = lambda rng, rate: A.dot_product_attention(
        q, k, v, dropout_rate=rate, dropout_rng=rng, implementation=impl, chunk_size=4
      )
      res[impl] = (jax.vmap(lambda r: f(r, 0.5))(rngs), f(rngs[0], 0.5), f(None, 0.0))
    return res

  for impl, (outs, first, clean) in run(q, k, v).items():
    np.testing.assert_allclose(outs[0], first, atol=1e-6, err_msg=impl)
    assert not np.allclose(first, clean), impl
    np.testing.assert_allclose(outs.mean(0), clean, atol=0.1, err_msg=impl)
  with pytest.raises(ValueError, match='dropout_rng'):
    A.dot_product_attention(q, k, v, dropout_rate=0.5)


def test_unknown_and_cudnn_implementations_raise_errors():
  q, k, v = _qkv()
  with pytest.raises(
    UserError,
    match=r"config\.model\.kwargs\.attention='flash' is unknown; "
    r"known attention implementations: chunked, cudnn, xla",
  ):
    A.dot_product_attention(q, k, v, implementation='flash')
  with pytest.raises(UserError, match=r"config\.model\.kwargs\.attention='cudnn' needs a GPU"):
    A.dot_product_attention(q, k, v, implementation='cudnn')
  with pytest.raises(UserError, match=r"config\.model\.kwargs\.attention='cudnn' does not support"):
    A.dot_product_attention(
      q, k, v, implementation='cudnn', dropout_rate=0.1, dropout_rng=jax.random.key(0)
    )
  # The layer knows nothing of the CLI: a ValueError about its attribute (build() maps it).
  with pytest.raises(
    ValueError, match=r"^attention='flash' is unknown; known: chunked, cudnn, xla"
  ):
    A.MultiHeadAttention(num_heads=4, head_dim=8, attention='flash').init(
      jax.random.key(0), np.zeros((1, 2, 8), np.float32)
    )


def test_cudnn_wrapper_masks_align_causally_and_zero_empty_rows(monkeypatch):
  """What the cudnn path hands jax.nn.dot_product_attention, checked with its XLA kernel on CPU."""
  monkeypatch.setattr(A.kernels, '_backend', lambda: 'gpu')
  xla_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(
    jax.nn,
    'dot_product_attention',
    lambda *a, implementation, **kw: xla_attention(*a, implementation='xla', **kw),
  )
  q, k, v = _qkv(T=3, S=S, K=2)
  with pytest.raises(UserError, match='bfloat16'):
    A.dot_product_attention(q, k, v, implementation='cudnn')
  mask = A.padding_mask(_valid([3, 3], 3), _valid([S, 0], S))
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out, ref = jit(
    lambda q, k, v: (
      A.dot_product_attention(q, k, v, mask=mask, causal=True, implementation='cudnn'),
      A.reference_attention(q, k, v, mask=A.combine_masks(mask, A.causal_mask(3, S))),
    )
  )(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), ref, atol=3e-2, rtol=3e-2)
  np.testing.assert_array_equal(out[1], 0.0)


def test_mask_helpers():
  want = np.array([[j <= i + 4 - 2 for j in range(4)] for i in range(2)])
  np.testing.assert_array_equal(A.causal_mask(2, 4), want[None, None])
  np.testing.assert_array_equal(A.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
  valid_q, valid_k = _valid([2, 1], 2), _valid([3, 1], 3)
  m = A.padding_mask(valid_q, valid_k)
  assert m.shape == (2, 1, 2, 3)
  np.testing.assert_array_equal(m[1, 0], [[True, False, False], [False, False, False]])
  assert A.padding_mask(valid_q).shape == (2, 1, 2, 2)
  assert A.combine_masks(None, None) is None
  np.testing.assert_array_equal(
    A.combine_masks(None, m, A.causal_mask(2, 3)), np.asarray(m) & np.asarray(A.causal_mask(2, 3))
  )


def test_sinusoidal_positions_match_the_paper_formula():
  pe = A.sinusoidal_positions(6, 10)
  assert pe.shape == (6, 10) and pe.dtype == jnp.float32
  want = np.zeros((6, 10))
  for pos in range(6):
    for i in range(5):
      want[pos, 2 * i] = np.sin(pos / 10000 ** (2 * i / 10))
      want[pos, 2 * i + 1] = np.cos(pos / 10000 ** (2 * i / 10))
  np.testing.assert_allclose(pe, want, atol=1e-6)


def test_rotary_matches_rotate_half_preserves_norms_and_is_relative():
  x = _normal((2, 3, 4, 8))
  pos = np.array([[0, 1, 5], [2, 7, 11]])
  q, k = x[:1, :1], x[1:, :1]  # (1, 1, 4, 8)

  @jit
  def run(x, q, k):
    dot = lambda p, d: (
      A.apply_rotary(q, jnp.array([[p]])) * A.apply_rotary(k, jnp.array([[p + d]]))
    ).sum(-1)
    return A.apply_rotary(x, pos), (dot(3, 4), dot(10, 4), dot(3, 5))

  y, (d34, d104, d35) = run(x, q, k)
  # LLaMA / GPT-NeoX: x * cos + rotate_half(x) * sin, frequencies repeated over the two halves.
  angle = pos[..., None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
  cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  np.testing.assert_allclose(y, x * cos + rotate_half * sin, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(d34, d104, atol=1e-4)  # same offset 4 at positions 3 and 10
  assert not np.allclose(d34, d35, atol=1e-3)
  with pytest.raises(UserError, match='head_dim=7'):
    A.apply_rotary(np.zeros((1, 2, 1, 7)), np.zeros((1, 2)))


def test_learned_positions():
  model = A.LearnedPositions(max_len=16, features=6)
  pos = np.array([[0, 3, 15], [1, 1, 2]])
  variables = jit(model.init)(jax.random.key(0), pos)
  assert variables['params']['embedding'].names == ('length', 'embed')
  table = nn.meta.unbox(variables['params'])['embedding']
  out = jit(model.apply)(variables, pos)
  assert out.shape == (2, 3, 6)
  np.testing.assert_array_equal(out, np.asarray(table)[pos])


def _mha_init(model, x, **kw):
  return jit(lambda x: model.init({'params': jax.random.key(0)}, x, **kw))(x)


def test_multi_head_attention_shapes_logical_names_and_gqa_params():
  model = A.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2)
  x, context = _normal((2, 5, 12)), _normal((2, 9, 12), 1)
  variables = _mha_init(model, x)
  p = variables['params']
  assert p['query']['kernel'].names == ('embed', 'heads', 'kv')
  assert p['query']['bias'].names == ('heads', 'kv')
  for name in ('key', 'value'):
    assert p[name]['kernel'].names == ('embed', 'kv_heads', 'kv')
    assert p[name]['bias'].names == ('kv_heads', 'kv')
  assert p['out']['kernel'].names == ('heads', 'kv', 'embed')
  assert p['out']['bias'].names == ('embed',)
  up = nn.meta.unbox(p)
  assert jax.tree.map(jnp.shape, up) == {
    'query': {'kernel': (12, 4, 8), 'bias': (4, 8)},
    'key': {'kernel': (12, 2, 8), 'bias': (2, 8)},
    'value': {'kernel': (12, 2, 8), 'bias': (2, 8)},
    'out': {'kernel': (4, 8, 12), 'bias': (12,)},
  }

  @jit
  def run(variables, x, context):
    # The layer computes what its pieces say: projections, then reference attention.
    proj = lambda name, y: jnp.einsum('bsd,dnh->bsnh', y, up[name]['kernel']) + up[name]['bias']
    att = A.reference_attention(
      proj('query', x), proj('key', x), proj('value', x), mask=A.causal_mask(5)
    )
    want = jnp.einsum('btnh,nhd->btd', att, up['out']['kernel']) + up['out']['bias']
    cross = model.apply(
      variables, x, context, mask=A.padding_mask(np.ones((2, 5), bool), _valid([9, 4], 9))
    )
    return model.apply(variables, x), model.clone(causal=True).apply(variables, x), want, cross

  out, causal_out, want, cross = run(variables, x, context)
  assert out.shape == cross.shape == (2, 5, 12)
  np.testing.assert_allclose(causal_out, want, atol=1e-5)
  assert not np.allclose(out, causal_out)
  with pytest.raises(UserError, match='num_kv_heads=3'):
    _mha_init(A.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=3), x)


def test_multi_head_attention_dropout_only_when_training():
  model = A.MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
  x = _normal((2, 5, 8))
  variables = _mha_init(model, x)
  apply = jit(
    lambda x, seed, train: model.apply(
      variables, x, train=train, rngs={'dropout': jax.random.key(seed)}
    ),
    static_argnums=2,
  )
  assert not np.allclose(apply(x, 1, True), apply(x, 2, True))
  np.testing.assert_array_equal(apply(x, 1, False), apply(x, 2, False))


@pytest.mark.parametrize('rotary,attention', [(False, 'xla'), (True, 'chunked')])
def test_incremental_decoding_with_kv_cache_equals_full_causal_pass(rotary, attention):
  L, D = 7, 12
  model = A.MultiHeadAttention(
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    rotary=rotary,
    attention=attention,
    chunk_size=3,
    causal=True,
    max_decode_length=L,
  )
  x = _normal((2, L, D))
  variables = _mha_init(model, x, decode=True)
  params, cache = variables['params'], variables['cache']
  assert cache['cached_key'].shape == (2, L, 2, 8) and int(cache['cache_index']) == 0
  np.testing.assert_array_equal(cache['cached_value'], 0.0)

  @jit
  def decode(x):
    def step(cache, x_new):
      out, updates = model.apply(
        {'params': params, 'cache': cache}, x_new, decode=True, mutable=['cache']
      )
      return updates['cache'], out

    # One token at a time (a scan over positions), and a prefill of 3 tokens then single tokens.
    cache_1, outs = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1)[:, :, None])
    cache_3, first = step(cache, x[:, :3])
    cache_3, rest = jax.lax.scan(step, cache_3, jnp.swapaxes(x[:, 3:], 0, 1)[:, :, None])
    return (
      model.apply({'params': params}, x),
      (cache_1, jnp.swapaxes(outs[:, :, 0], 0, 1)),
      (cache_3, jnp.concatenate([first, jnp.swapaxes(rest[:, :, 0], 0, 1)], axis=1)),
    )

  full, *decoded = decode(x)
  for c, out in decoded:
    assert int(c['cache_index']) == L
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)


def test_decoding_without_a_cache_raises_a_user_error():
  model = A.MultiHeadAttention(num_heads=2, head_dim=4, max_decode_length=4)
  x = np.zeros((1, 4, 8), np.float32)
  params = _mha_init(model, x)['params']
  with pytest.raises(UserError, match="no 'cache' collection"):
    model.apply({'params': params}, x[:, :1], decode=True, mutable=['cache'])
  with pytest.raises(UserError, match='max_decode_length'):
    _mha_init(model.clone(max_decode_length=0), x, decode=True)
