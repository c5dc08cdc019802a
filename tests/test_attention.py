import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.errors import UserError
from bigjax.models import attention as A

B, T, S, N, H = 2, 5, 7, 4, 8
CHUNK = 3  # does not divide S = 7: the last key block is padded


def _qkv(T=T, S=S, K=N, dtype=jnp.float32, seed=0):
  r = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(r[0], (B, T, N, H)).astype(dtype),
          jax.random.normal(r[1], (B, S, K, H)).astype(dtype),
          jax.random.normal(r[2], (B, S, K, H)).astype(dtype))


def _valid(lengths, L):
  return jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]


def _out_and_grads(fn, *args):
  """fn's output and the gradients of <output, fixed random cotangent> w.r.t. each argument."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(jax.random.normal(jax.random.key(9), out.shape, out.dtype))


def _case(name):
  """(T, S, K, mask, bias, causal) of a named test case; causal=True is also given as a mask."""
  pad_q, pad_k = _valid([T, 3], T), _valid([S, 4], S)
  bias = jax.random.normal(jax.random.key(5), (1, N, T, S))
  return {
      'none': (T, S, N, None, None, False),
      'causal': (T, S, N, None, None, True),
      'padding': (T, S, N, A.padding_mask(pad_q, pad_k), None, False),
      'causal_padding': (T, S, N, A.padding_mask(pad_q, pad_k), None, True),
      'bias': (T, S, N, None, bias, False),
      'bias_mask_causal': (T, S, N, A.padding_mask(jnp.ones((B, T), bool), pad_k), bias, True),
      'gqa': (T, S, 2, A.padding_mask(pad_q, pad_k), None, True),
      'mqa': (T, S, 1, None, bias, True),
      'decode_T_lt_S': (2, 9, 2, None, None, True),
      'T_gt_S': (7, 4, N, None, None, False),
  }[name]


CASES = ['none', 'causal', 'padding', 'causal_padding', 'bias', 'bias_mask_causal', 'gqa', 'mqa',
         'decode_T_lt_S', 'T_gt_S']


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
@pytest.mark.parametrize('case', CASES)
def test_dot_product_attention_matches_reference_values_and_gradients(case, implementation):
  t, s, kv, mask, bias, causal = _case(case)
  q, k, v = _qkv(t, s, kv)
  if bias is not None:
    bias = bias[..., :t, :s]
  full_mask = A.combine_masks(mask, A.causal_mask(t, s) if causal else None)

  @jax.jit
  def run(q, k, v, bias):
    got = _out_and_grads(
        lambda q, k, v, b: A.dot_product_attention(q, k, v, mask=mask, bias=b, causal=causal,
                                                   implementation=implementation,
                                                   chunk_size=CHUNK), q, k, v, bias)
    want = _out_and_grads(lambda q, k, v, b: A.reference_attention(q, k, v, mask=full_mask,
                                                                     bias=b), q, k, v, bias)
    return got, want

  (out, grads), (ref, ref_grads) = run(q, k, v, bias)
  assert out.shape == (B, t, N, H) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert (bias is None) == (grads[3] is None)
  for g, g_ref in zip(grads, ref_grads):
    if g is not None:
      assert g.shape == g_ref.shape
      np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
def test_fully_masked_rows_give_zeros_and_finite_gradients(implementation):
  q, k, v = _qkv()
  mask = A.padding_mask(_valid([T, 2], T), _valid([S, 0], S))  # example 1: no valid key at all
  fn = lambda q, k, v: A.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                               chunk_size=CHUNK)
  out, grads = jax.jit(lambda q, k, v: _out_and_grads(fn, q, k, v))(q, k, v)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.abs(np.asarray(out[0])).sum() > 0
  for g in grads:
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[1], 0.0)
  # Causal with T > S: the first T - S queries precede every key.
  q, k, v = _qkv(6, 4)
  out = A.dot_product_attention(q, k, v, causal=True, implementation=implementation, chunk_size=3)
  np.testing.assert_array_equal(out[:, :2], 0.0)
  np.testing.assert_allclose(out[:, 2:], A.reference_attention(
      q, k, v, mask=A.causal_mask(6, 4))[:, 2:], atol=1e-5)


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
def test_bfloat16_inputs_give_bfloat16_close_to_float32(implementation):
  q, k, v = _qkv(K=2)
  mask = A.padding_mask(_valid([T, 3], T), _valid([S, 4], S))
  run = lambda dtype: A.dot_product_attention(
      *(x.astype(dtype) for x in (q, k, v)), mask=mask, causal=True, implementation=implementation,
      chunk_size=CHUNK)
  out = run(jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), run(jnp.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize('chunk_size', [1, 2, 7, 128])
def test_chunked_handles_any_chunk_size(chunk_size):
  q, k, v = _qkv(K=2)
  out = A.dot_product_attention(q, k, v, causal=True, implementation='chunked',
                                chunk_size=chunk_size)
  np.testing.assert_allclose(out, A.reference_attention(q, k, v, mask=A.causal_mask(T, S)),
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(UserError, match='chunk_size'):
    A.dot_product_attention(q, k, v, implementation='chunked', chunk_size=0)


def test_chunked_backward_with_dropout_matches_autodiff_of_its_forward():
  """The hand-written VJP (which regenerates the dropout pattern) equals plain autodiff."""
  q, k, v = _qkv(K=2)
  bias = jax.random.normal(jax.random.key(5), (1, N, T, 1))  # broadcast over keys: summed grads
  mask = A.padding_mask(_valid([T, 3], T), _valid([S, 4], S))
  rng = jax.random.key(3)
  custom = lambda q, k, v, b: A._chunked_attention(q, k, v, mask, b, rng, True, 0.3, CHUNK)
  plain = lambda q, k, v, b: A._chunked_forward(q, k, v, mask, b, rng, True, 0.3, CHUNK)[0]
  (out, grads), (ref, ref_grads) = jax.jit(
      lambda *a: (_out_and_grads(custom, *a), _out_and_grads(plain, *a)))(q, k, v, bias)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
def test_dropout_is_deterministic_per_rng_and_unbiased(implementation):
  q, k, v = _qkv(T=4, S=6)

  def run(rng, rate):
    return A.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=rng,
                                   implementation=implementation, chunk_size=4)

  rngs = jax.random.split(jax.random.key(0), 2000)
  outs = jax.jit(jax.vmap(lambda r: run(r, 0.5)))(rngs)
  clean = run(None, 0.0)
  np.testing.assert_array_equal(outs[0], run(rngs[0], 0.5))
  assert not np.allclose(outs[0], clean)
  np.testing.assert_allclose(outs.mean(0), clean, atol=0.1)
  with pytest.raises(ValueError, match='dropout_rng'):
    run(None, 0.5)


def test_unknown_and_cudnn_implementations_raise_user_errors():
  q, k, v = _qkv()
  with pytest.raises(UserError, match=r"config\.model\.kwargs\.attention='flash'.*xla, cudnn, "
                                      r"chunked"):
    A.dot_product_attention(q, k, v, implementation='flash')
  with pytest.raises(UserError, match=r"config\.model\.kwargs\.attention='cudnn' needs a GPU"):
    A.dot_product_attention(q, k, v, implementation='cudnn')
  with pytest.raises(UserError, match=r"config\.model\.kwargs\.attention='cudnn' does not support"):
    A.dot_product_attention(q, k, v, implementation='cudnn', dropout_rate=0.1,
                            dropout_rng=jax.random.key(0))


def test_cudnn_wrapper_masks_align_causally_and_zero_empty_rows(monkeypatch):
  """What the cudnn path hands jax.nn.dot_product_attention, checked with its XLA kernel on CPU."""
  monkeypatch.setattr(A, '_backend', lambda: 'gpu')
  xla_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, implementation, **kw: xla_attention(*a, implementation='xla', **kw))
  q, k, v = _qkv(T=3, S=S, K=2)
  with pytest.raises(UserError, match='bfloat16'):
    A.dot_product_attention(q, k, v, implementation='cudnn')
  mask = A.padding_mask(_valid([3, 3], 3), _valid([S, 0], S))
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = A.dot_product_attention(q, k, v, mask=mask, causal=True, implementation='cudnn')
  ref = A.reference_attention(q, k, v, mask=A.combine_masks(mask, A.causal_mask(3, S)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)
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
  np.testing.assert_array_equal(A.combine_masks(None, m, A.causal_mask(2, 3)),
                                np.asarray(m) & np.asarray(A.causal_mask(2, 3)))


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
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
  pos = jnp.array([[0, 1, 5], [2, 7, 11]])
  y = A.apply_rotary(x, pos)
  # LLaMA / GPT-NeoX: x * cos + rotate_half(x) * sin, frequencies repeated over the two halves.
  angle = np.asarray(pos, np.float64)[..., None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
  cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  xn = np.asarray(x, np.float64)
  rotate_half = np.concatenate([-xn[..., 4:], xn[..., :4]], -1)
  np.testing.assert_allclose(y, xn * cos + rotate_half * sin, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)

  q, k = x[:1, :1], x[1:, :1]  # (1, 1, 4, 8)
  def dot(p, d):
    rq = A.apply_rotary(q, jnp.array([[p]]))
    rk = A.apply_rotary(k, jnp.array([[p + d]]))
    return (rq * rk).sum(-1)
  np.testing.assert_allclose(dot(3, 4), dot(10, 4), atol=1e-4)
  assert not np.allclose(dot(3, 4), dot(3, 5), atol=1e-3)
  with pytest.raises(UserError, match='head_dim=7'):
    A.apply_rotary(jnp.zeros((1, 2, 1, 7)), jnp.zeros((1, 2)))


def test_learned_positions():
  model = A.LearnedPositions(max_len=16, features=6)
  pos = jnp.array([[0, 3, 15], [1, 1, 2]])
  variables = model.init(jax.random.key(0), pos)
  assert variables['params']['embedding'].names == ('length', 'embed')
  table = nn.meta.unbox(variables['params'])['embedding']
  out = model.apply(variables, pos)
  assert out.shape == (2, 3, 6)
  np.testing.assert_array_equal(out, table[pos])


def _mha_init(model, x, **kw):
  return model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, **kw)


def test_multi_head_attention_shapes_logical_names_and_gqa_params():
  model = A.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2)
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  variables = _mha_init(model, x)
  p = variables['params']
  assert p['query']['kernel'].names == ('embed', 'heads', 'kv')
  assert p['query']['bias'].names == ('heads', 'kv')
  for name in ('key', 'value'):
    assert p[name]['kernel'].names == ('embed', 'kv_heads', 'kv')
    assert p[name]['bias'].names == ('kv_heads', 'kv')
  assert p['out']['kernel'].names == ('heads', 'kv', 'embed')
  assert p['out']['bias'].names == ('embed',)
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(p))
  assert shapes == {'query': {'kernel': (12, 4, 8), 'bias': (4, 8)},
                    'key': {'kernel': (12, 2, 8), 'bias': (2, 8)},
                    'value': {'kernel': (12, 2, 8), 'bias': (2, 8)},
                    'out': {'kernel': (4, 8, 12), 'bias': (12,)}}
  assert model.apply(variables, x).shape == (2, 5, 12)
  context = jax.random.normal(jax.random.key(1), (2, 9, 12))  # cross-attention
  assert model.apply(variables, x, context, mask=A.padding_mask(
      jnp.ones((2, 5), bool), _valid([9, 4], 9))).shape == (2, 5, 12)
  # The layer computes what its pieces say: projections, then reference attention.
  up = nn.meta.unbox(p)
  proj = lambda name, y: jnp.einsum('bsd,dnh->bsnh', y, up[name]['kernel']) + up[name]['bias']
  att = A.reference_attention(proj('query', x), proj('key', x), proj('value', x),
                              mask=A.causal_mask(5))
  want = jnp.einsum('btnh,nhd->btd', att, up['out']['kernel']) + up['out']['bias']
  np.testing.assert_allclose(model.clone(causal=True).apply(variables, x), want, atol=1e-5)
  with pytest.raises(UserError, match='num_kv_heads=3'):
    _mha_init(A.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=3), x)


def test_multi_head_attention_dropout_only_when_training():
  model = A.MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  variables = _mha_init(model, x)
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


@pytest.mark.parametrize('rotary,attention', [(False, 'xla'), (True, 'xla'), (True, 'chunked')])
def test_incremental_decoding_with_kv_cache_equals_full_causal_pass(rotary, attention):
  L, D = 7, 12
  model = A.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, rotary=rotary,
                               attention=attention, chunk_size=3, causal=True,
                               max_decode_length=L)
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  variables = _mha_init(model, x, decode=True)
  params, cache = variables['params'], variables['cache']
  assert cache['cached_key'].shape == (2, L, 2, 8) and int(cache['cache_index']) == 0
  np.testing.assert_array_equal(cache['cached_value'], 0.0)
  full = model.apply({'params': params}, x)

  @jax.jit
  def step(cache, x_new):
    out, updates = model.apply({'params': params, 'cache': cache}, x_new, decode=True,
                               mutable=['cache'])
    return out, updates['cache']

  def decode(sizes):
    c, outs, start = cache, [], 0
    for n in sizes:
      out, c = step(c, x[:, start:start + n])
      outs.append(out)
      start += n
    assert int(c['cache_index']) == L
    return jnp.concatenate(outs, axis=1)

  np.testing.assert_allclose(decode([1] * L), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(decode([3] + [1] * (L - 3)), full, atol=1e-5, rtol=1e-5)


def test_decoding_without_a_cache_raises_a_user_error():
  model = A.MultiHeadAttention(num_heads=2, head_dim=4, max_decode_length=4)
  x = jnp.zeros((1, 4, 8))
  params = _mha_init(model, x)['params']
  with pytest.raises(UserError, match="no 'cache' collection"):
    model.apply({'params': params}, x[:, :1], decode=True, mutable=['cache'])
  with pytest.raises(UserError, match='max_decode_length'):
    _mha_init(model.clone(max_decode_length=0), x, decode=True)
