"""Attention: dot-product attention kernels, masks, positions and a multi-head attention layer.

Shapes use B batch, T query length, S key/value length, N query heads, K key/value heads (K divides
N; each group of G = N/K query heads shares one key/value head: K = N is multi-head, 1 < K < N
grouped-query, K = 1 multi-query attention), H head size, D model width.

Masks are boolean, broadcastable to (B, N, T, S), True = may attend. Biases are added to the logits
and are broadcastable to (B, N, T, S). A query row with no key to attend gives zeros (never NaN).
Causal masking aligns the *last* query with the *last* key, so that with T < S (decoding against a
cache of S keys) query i attends keys j <= i + S - T.

`dot_product_attention(..., implementation=)` picks the kernel ('xla', 'cudnn', 'chunked'; see
IMPLEMENTATIONS); `MultiHeadAttention` is the Linen layer, with an optional KV cache for
incremental decoding. New logical axis names: 'heads' (query heads), 'kv_heads' (key/value heads),
'kv' (head size) and 'length' (position tables), next to 'embed' from `layers`.
"""
import functools
import math
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError
from bigjax.models import layers

IMPLEMENTATIONS = ('xla', 'cudnn', 'chunked')
_FIELD = 'config.model.kwargs.attention'


# ----------------------------------------------------------------------------------------------
# Masks.

def causal_mask(T, S=None):
  """(1, 1, T, S) bool: query i attends key j iff j <= i + S - T (S defaults to T)."""
  S = T if S is None else S
  return (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None, None]


def padding_mask(valid_q_BT, valid_k_BS=None):
  """(B, 1, T, S) bool from per-token validity: True where both query and key are real tokens.

  valid_q_BT: (B, T) bool; valid_k_BS: (B, S) bool, defaults to valid_q_BT (self-attention).
  Rows of padded queries are fully masked, so their attention output is zeros.
  """
  valid_k_BS = valid_q_BT if valid_k_BS is None else valid_k_BS
  chex.assert_rank([valid_q_BT, valid_k_BS], 2)
  return (valid_q_BT.astype(bool)[:, None, :, None] & valid_k_BS.astype(bool)[:, None, None, :])


def combine_masks(*masks):
  """Logical and of boolean masks (shapes broadcast); Nones are ignored, all None -> None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, [jnp.asarray(m, bool) for m in masks])


# ----------------------------------------------------------------------------------------------
# Reference and kernels.

def reference_attention(q, k, v, *, mask=None, bias=None):
  """softmax(q k^T / sqrt(H) + bias, masked) v in float32, written for clarity (tests use it).

  q: (B, T, N, H); k, v: (B, S, K, H) with K dividing N; mask: bool broadcastable to (B, N, T, S),
  True = attend; bias: broadcastable to (B, N, T, S). Returns (B, T, N, H) float32; fully masked
  query rows give zeros.
  """
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)  # kv head k serves query heads k*G ... k*G + G-1
  v = jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  if mask is None:
    weights = jax.nn.softmax(logits, axis=-1)
  else:
    mask = jnp.broadcast_to(mask, logits.shape)
    weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    weights = jnp.where(mask, weights, 0.0)  # a fully masked row came out uniform: zero it
  return jnp.einsum('bnts,bsnh->btnh', weights, v)


def _check_inputs(q, k, v, mask, bias):
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  if k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f'q {q.shape} and k {k.shape} must share batch and head size: (B, T, N, H), '
                     '(B, S, K, H)')
  if N % K:
    raise UserError(f'{K} key/value heads do not divide {N} query heads; set '
                    'config.model.kwargs.num_kv_heads to a divisor of num_heads')
  for name, x in (('mask', mask), ('bias', bias)):
    if x is not None and (x.ndim > 4 or
                          jnp.broadcast_shapes(x.shape, (B, N, T, S)) != (B, N, T, S)):
      raise ValueError(f'{name} of shape {x.shape} does not broadcast to (B, N, T, S) = '
                       f'{(B, N, T, S)}')


def _grouped(x, num_kv_heads):
  """A mask/bias broadcastable to (B, N, T, S) -> rank 5 broadcastable to (B, K, G, T, S)."""
  if x is None:
    return None
  x = jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
  b, n, t, s = x.shape
  if n == 1:
    return x.reshape(b, 1, 1, t, s)
  return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def _masked_softmax(logits, mask):
  """float32 softmax over the last axis; masked entries and fully masked rows get weight 0."""
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  denom = e.sum(axis=-1, keepdims=True)
  return e / jnp.where(denom == 0, 1.0, denom)


def _dropout(weights, rate, rng):
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  return jnp.where(keep, weights / (1.0 - rate), 0.0)


def _xla_attention(q, k, v, mask, bias, causal, dropout_rate, dropout_rng):
  """Einsum attention. With as many kv heads as query heads it uses 4-D einsums: the grouped 5-D
  form compiled to extra full-size transposes on XLA:CPU (a GPT step ran ~10% slower)."""
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  grouped = K != N
  mask = combine_masks(mask, causal_mask(T, S) if causal else None)
  if grouped:
    logits = jnp.einsum('btkgh,bskh->bkgts', q.reshape(B, T, K, N // K, H), k,
                        preferred_element_type=jnp.float32)
    bias, mask = _grouped(bias, K), _grouped(mask, K)
  else:
    logits = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(H))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = _masked_softmax(logits, mask)
  if dropout_rate > 0:
    weights = _dropout(weights, dropout_rate, dropout_rng)
  if grouped:
    out = jnp.einsum('bkgts,bskh->btkgh', weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum('bnts,bsnh->btnh', weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q.dtype)


def _backend():
  return jax.default_backend()


def _cudnn_attention(q, k, v, mask, bias, causal):
  if _backend() != 'gpu':
    raise UserError(f"{_FIELD}='cudnn' needs a GPU but the backend is {_backend()!r}; use "
                    f"'xla' or 'chunked'")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise UserError(f"{_FIELD}='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; set "
                    "config.model.kwargs.dtype='bfloat16' or use attention='xla'")
  T, S = q.shape[1], k.shape[1]
  # jax's is_causal aligns the first query with the first key; ours aligns the last ones.
  mask = combine_masks(mask, causal_mask(T, S) if causal and T != S else None)
  four = lambda x: None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
  mask, bias = four(mask), four(bias)
  out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                     mask=mask, is_causal=causal and T == S,
                                     implementation='cudnn')
  if mask is not None:  # cuDNN turns the mask into a large negative bias: zero empty rows
    any_BNT = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], T, S)).any(axis=-1)
    out = jnp.where(any_BNT.transpose(0, 2, 1)[..., None], out, 0)
  return out


# Chunked (flash-style) attention: a scan over key blocks with an online softmax, and a custom VJP
# that recomputes each block's weights from the saved log-sum-exp, so neither pass holds a (T, S)
# array (beyond a mask or bias the caller passes in).

def _slice_keys(x, j, c):
  """Block j (size c) of the last axis of a mask/bias, unless that axis is broadcast (size 1)."""
  if x is None or x.shape[-1] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, j * c, c, axis=x.ndim - 1)


def _pad_keys(x, s_padded, fill):
  if x is None or x.shape[-1] == 1 or x.shape[-1] == s_padded:
    return x
  pad = [(0, 0)] * (x.ndim - 1) + [(0, s_padded - x.shape[-1])]
  return jnp.pad(x, pad, constant_values=fill)


def _sum_to(x, shape):
  """Sums the broadcast axes of x away so that it has `shape` (same rank)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


class _Blocks:
  """Shared block arithmetic of the forward and backward passes."""

  def __init__(self, q, k, v, mask, bias, causal, chunk_size):
    B, T, N, H = q.shape
    S, K = k.shape[1:3]
    c = chunk_size
    self.B, self.T, self.N, self.H, self.S, self.K, self.G, self.c = B, T, N, H, S, K, N // K, c
    self.num_blocks = -(-S // c)
    sp = self.num_blocks * c
    self.causal, self.scale = causal, 1.0 / math.sqrt(H)
    self.qg = q.reshape(B, T, K, self.G, H)
    pad = [(0, 0), (0, sp - S), (0, 0), (0, 0)]
    self.k, self.v = jnp.pad(k, pad), jnp.pad(v, pad)
    self.mask = _pad_keys(_grouped(mask, K), sp, False)
    self.bias = _pad_keys(_grouped(bias, K), sp, 0)

  def kv(self, j):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, j * self.c, self.c, axis=1)
    return sl(self.k), sl(self.v)

  def logits(self, j, k_j):
    """float32 logits (B, K, G, T, c) of key block j, -inf where masked."""
    s = jnp.einsum('btkgh,bskh->bkgts', self.qg, k_j, preferred_element_type=jnp.float32)
    s = s * self.scale
    if self.bias is not None:
      s = s + _slice_keys(self.bias, j, self.c).astype(jnp.float32)
    k_pos = j * self.c + jnp.arange(self.c)
    valid = k_pos < self.S  # keys padded up to a whole block
    if self.causal:
      valid = valid & (k_pos[None, :] <= jnp.arange(self.T)[:, None] + (self.S - self.T))
    if self.mask is not None:
      valid = valid & _slice_keys(self.mask, j, self.c)
    return jnp.where(valid, s, -jnp.inf)

  def keep(self, rng, j, rate):
    """Dropout keep-mask of block j: its own key, folded from the block index."""
    return jax.random.bernoulli(jax.random.fold_in(rng, j), 1.0 - rate,
                                (self.B, self.K, self.G, self.T, self.c))


def _chunked_forward(q, k, v, mask, bias, rng, causal, rate, chunk_size):
  blk = _Blocks(q, k, v, mask, bias, causal, chunk_size)
  B, T, K, G, H = blk.qg.shape

  def step(carry, j):
    o, m, l = carry
    k_j, v_j = blk.kv(j)
    s = blk.logits(j, k_j)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)  # 0 while m is still -inf
    l = alpha * l + p.sum(axis=-1)
    if rate > 0:
      p = jnp.where(blk.keep(rng, j, rate), p / (1.0 - rate), 0.0)
    pv = jnp.einsum('bkgts,bskh->btkgh', p.astype(v.dtype), v_j,
                    preferred_element_type=jnp.float32)
    o = jnp.moveaxis(alpha, 3, 1)[..., None] * o + pv
    return (o, m_new, l), None

  init = (jnp.zeros((B, T, K, G, H), jnp.float32), jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
          jnp.zeros((B, K, G, T), jnp.float32))
  (o, m, l), _ = jax.lax.scan(step, init, jnp.arange(blk.num_blocks))
  empty = l == 0
  out = o / jnp.moveaxis(jnp.where(empty, 1.0, l), 3, 1)[..., None]
  lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))  # exp(s - inf) = 0
  return out.reshape(q.shape).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked_attention(q, k, v, mask, bias, rng, causal, rate, chunk_size):
  return _chunked_forward(q, k, v, mask, bias, rng, causal, rate, chunk_size)[0]


def _chunked_fwd(q, k, v, mask, bias, rng, causal, rate, chunk_size):
  out, lse = _chunked_forward(q, k, v, mask, bias, rng, causal, rate, chunk_size)
  return out, (q, k, v, mask, bias, rng, out, lse)


def _chunked_bwd(causal, rate, chunk_size, res, d_out):
  q, k, v, mask, bias, rng, out, lse = res
  blk = _Blocks(q, k, v, mask, bias, causal, chunk_size)
  B, T, K, G, H = blk.qg.shape
  do = d_out.reshape(B, T, K, G, H).astype(jnp.float32)
  # sum_s w'_ts dw'_ts = do_t . out_t, whether or not dropout was applied.
  delta = jnp.einsum('btkgh,btkgh->bkgt', do, out.reshape(B, T, K, G, H).astype(jnp.float32))
  bias_per_block = blk.bias is not None and blk.bias.shape[-1] != 1

  def step(carry, j):
    dq, dbias = carry
    k_j, v_j = blk.kv(j)
    p = jnp.exp(blk.logits(j, k_j) - lse[..., None])  # the softmax weights, 0 where masked
    dp = jnp.einsum('btkgh,bskh->bkgts', do, v_j, preferred_element_type=jnp.float32)
    if rate > 0:
      keep = blk.keep(rng, j, rate)
      pd = jnp.where(keep, p / (1.0 - rate), 0.0)
      dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
    else:
      pd = p
    dv_j = jnp.einsum('bkgts,btkgh->bskh', pd, do)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum('bkgts,bskh->btkgh', ds, k_j.astype(jnp.float32)) * blk.scale
    dk_j = jnp.einsum('bkgts,btkgh->bskh', ds, blk.qg.astype(jnp.float32)) * blk.scale
    db_j = None
    if blk.bias is not None:
      db_j = _sum_to(ds, blk.bias.shape[:-1] + (ds.shape[-1] if bias_per_block else 1,))
      if not bias_per_block:
        dbias, db_j = dbias + db_j, None
    return (dq, dbias), (dk_j, dv_j, db_j)

  dbias0 = (jnp.zeros(blk.bias.shape, jnp.float32)
            if blk.bias is not None and not bias_per_block else None)
  (dq, dbias), (dk, dv, db) = jax.lax.scan(step, (jnp.zeros(blk.qg.shape, jnp.float32), dbias0),
                                           jnp.arange(blk.num_blocks))
  S = k.shape[1]
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((B, -1) + x.shape[3:])[:, :S]
  dk, dv = unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)
  if bias is not None:
    if bias_per_block:  # (num_blocks, b, k, g, t, c) -> (b, k, g, t, S)
      dbias = jnp.moveaxis(db, 0, -2).reshape(db.shape[1:-1] + (-1,))[..., :S]
    dbias = dbias.reshape(bias.shape).astype(bias.dtype)
  return dq.reshape(q.shape).astype(q.dtype), dk, dv, None, dbias, None


_chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False, dropout_rate=0.0,
                          dropout_rng=None, implementation='xla', chunk_size=128):
  """Scaled dot-product attention: q (B, T, N, H) over k, v (B, S, K, H) -> (B, T, N, H).

  mask: bool broadcastable to (B, N, T, S), True = attend. bias: added to the logits, broadcastable
  to (B, N, T, S). causal: also mask keys j > i + S - T. K must divide N (grouped-query attention;
  query head n uses key/value head n // (N/K)). The softmax runs in float32 whatever the input
  dtype; the output has q's dtype. Fully masked query rows give zeros. dropout_rate > 0 drops
  attention weights using dropout_rng.

  implementation:
    'xla': einsums over the whole (T, S) logits; GQA by grouping query heads, no k/v repeat.
    'cudnn': jax.nn.dot_product_attention's cuDNN flash kernel; GPU only, bfloat16/float16, no
      dropout.
    'chunked': flash-style, a scan over key blocks of chunk_size with an online softmax and a
      recomputing backward pass, so memory is linear in S (and T). S need not divide by chunk_size
      (the last block is padded and masked). Same values and gradients as 'xla' (first-order
      reverse mode only); with dropout the random pattern differs from 'xla' (same distribution).
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f'{_FIELD}={implementation!r} is unknown; known: {", ".join(IMPLEMENTATIONS)}')
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  mask = None if mask is None else jnp.asarray(mask, bool)
  bias = None if bias is None else jnp.asarray(bias)
  _check_inputs(q, k, v, mask, bias)
  if dropout_rate and not 0.0 < dropout_rate < 1.0:
    raise UserError(f'config.model.kwargs.dropout_rate={dropout_rate} must be in [0, 1)')
  if dropout_rate > 0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs a dropout_rng')
  if implementation == 'xla':
    return _xla_attention(q, k, v, mask, bias, causal, dropout_rate, dropout_rng)
  if implementation == 'cudnn':
    if dropout_rate > 0:
      raise UserError(f"{_FIELD}='cudnn' does not support attention dropout "
                      f'(dropout_rate={dropout_rate}); set it to 0 or use attention=\'xla\'')
    return _cudnn_attention(q, k, v, mask, bias, causal)
  if int(chunk_size) < 1:
    raise UserError(f'config.model.kwargs.chunk_size={chunk_size} must be a positive block size')
  return _chunked_attention(q, k, v, mask, bias, dropout_rng if dropout_rate > 0 else None,
                            bool(causal), float(dropout_rate), int(chunk_size))


# ----------------------------------------------------------------------------------------------
# Positions.

def sinusoidal_positions(T, D, base=10000.0):
  """(T, D) float32 sinusoids (Vaswani et al.): [p, 2i] = sin(p / base^(2i/D)), [p, 2i+1] = cos."""
  pos = np.arange(T, dtype=np.float64)[:, None]
  dim = np.arange(D)
  angle = pos / np.power(base, (dim - dim % 2) / D)[None, :]
  return jnp.asarray(np.where(dim % 2 == 0, np.sin(angle), np.cos(angle)), jnp.float32)


class LearnedPositions(nn.Module):
  """Learned absolute position embeddings: positions (B, T) int -> (B, T, features).

  The 'embedding' param (max_len, features) has logical axes ('length', 'embed'). Positions must lie
  in [0, max_len); out-of-range positions give NaN (jnp.take's 'fill' mode).
  """
  max_len: int
  features: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, positions_BT):
    chex.assert_rank(positions_BT, 2)
    table = self.param('embedding',
                       layers.partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                       (self.max_len, self.features), jnp.dtype(self.param_dtype))
    return jnp.take(table, positions_BT, axis=0).astype(jnp.dtype(self.dtype))


def apply_rotary(x_BTNH, positions_BT, base=10000.0):
  """Rotary position embedding (RoPE) of (B, T, N, H) by positions (B, T) -> (B, T, N, H).

  Pairs (x[..., i], x[..., i + H/2]) (GPT-NeoX/LLaMA half split) rotate by positions * base^(-2i/H).
  Computed in float32, returned in x's dtype. H must be even.
  """
  chex.assert_rank(x_BTNH, 4)
  H = x_BTNH.shape[-1]
  if H % 2:
    raise UserError(f'rotary position embeddings need an even head size, got '
                    f'config.model.kwargs.head_dim={H}')
  inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # (H/2,)
  angle = jnp.asarray(positions_BT, jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------------------------
# The layer.

class MultiHeadAttention(nn.Module):
  """Multi-head (grouped-query, multi-query) attention: x (B, T, D) -> (B, T, D).

  num_heads N query heads of head_dim H; num_kv_heads K key/value heads (None = N; must divide N).
  use_bias: biases on the q/k/v/output projections. rotary: RoPE on q and k (self-attention only;
  cross-attention ignores it). attention: 'xla' | 'cudnn' | 'chunked' (see dot_product_attention),
  chunk_size its block size. causal: self-attention masks future tokens (decoding always does).
  dtype: compute dtype; param_dtype: parameter dtype. Params: query kernel ('embed', 'heads', 'kv'),
  key/value kernels ('embed', 'kv_heads', 'kv'), output kernel ('heads', 'kv', 'embed').

  Incremental decoding: the 'cache' collection holds cached_key, cached_value
  (B, max_decode_length, K, H) and cache_index (int32 scalar). Create it, zeros, with
  `model.init(rngs, x, decode=True)` where x is (B, max_decode_length, D) (any length gives the same
  cache; the batch size B is fixed by it), then
  `model.apply({'params': ..., 'cache': cache}, x_new, decode=True, mutable=['cache'])` with T new
  tokens (T = 1, or T > 1 for a prefill): they are written at cache_index, attend causally to the
  filled prefix, and cache_index advances by T. Writing past max_decode_length is not checked (jit)
  and gives wrong results. Rotary positions default to cache_index + arange(T) when decoding.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  rotary: bool = False
  rotary_base: float = 10000.0
  attention: str = 'xla'
  chunk_size: int = 128
  causal: bool = False
  kernel_init: str = 'lecun'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  max_decode_length: int = 0

  @nn.compact
  def __call__(self, x_BTD, context_BSD=None, *, mask=None, bias=None, positions_BT=None,
               train=False, decode=False):
    """x_BTD: (B, T, D) queries (and keys/values unless context_BSD (B, S, D) is given).

    mask: bool broadcastable to (B, N, T, S) (S = max_decode_length when decoding), True = attend;
    bias: added to the logits, same broadcast. positions_BT: (B, T) int positions for rotary
    (default arange(T), or cache_index + arange(T) when decoding). train: dropout on the attention
    weights from the 'dropout' rng stream. decode: use/update the KV cache (self-attention only;
    ignored with context_BSD). Returns (B, T, D) in dtype.
    """
    chex.assert_rank(x_BTD, 3)
    num_kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if num_kv < 1 or self.num_heads % num_kv:
      raise UserError(f'config.model.kwargs.num_kv_heads={num_kv} must divide '
                      f'num_heads={self.num_heads}')
    if self.attention not in IMPLEMENTATIONS:
      raise UserError(f'{_FIELD}={self.attention!r} is unknown; known: '
                      f'{", ".join(IMPLEMENTATIONS)}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    init = layers.initializer(self.kernel_init)
    self_attention = context_BSD is None
    context = x_BTD if self_attention else context_BSD
    chex.assert_rank(context, 3)

    def proj(features, names, name):
      return nn.DenseGeneral(features, axis=-1, use_bias=self.use_bias, dtype=dtype,
                             param_dtype=param_dtype, name=name,
                             kernel_init=layers.partitioned(init, names),
                             bias_init=layers.partitioned(nn.initializers.zeros_init(), names[1:]))

    B, T, D = x_BTD.shape
    q = proj((self.num_heads, self.head_dim), ('embed', 'heads', 'kv'), 'query')(x_BTD)
    k = proj((num_kv, self.head_dim), ('embed', 'kv_heads', 'kv'), 'key')(context)
    v = proj((num_kv, self.head_dim), ('embed', 'kv_heads', 'kv'), 'value')(context)

    decode = decode and self_attention
    causal = self.causal and self_attention
    rotated = False
    if decode:
      if self.max_decode_length < 1:
        raise UserError('decode=True needs config.model.kwargs.max_decode_length > 0 (the KV '
                        'cache length)')
      initialized = self.has_variable('cache', 'cached_key')
      if not initialized and not self.is_initializing():
        raise UserError("decode=True found no 'cache' collection: create it with "
                        "model.init(rngs, x_of_shape_(B, max_decode_length, D), decode=True) and "
                        "pass it with mutable=['cache']")
      shape = (B, self.max_decode_length, num_kv, self.head_dim)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      if initialized:
        chex.assert_shape(k, (cached_key.value.shape[0], None, num_kv, self.head_dim))
        index = cache_index.value
        if positions_BT is None:
          positions_BT = (index + jnp.arange(T))[None]
        if self.rotary:  # keys are cached rotated
          q = apply_rotary(q, positions_BT, self.rotary_base)
          k = apply_rotary(k, positions_BT, self.rotary_base)
          rotated = True
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
        cache_index.value = index + T
        k, v = cached_key.value, cached_value.value
        # New token t sits at index + t and sees cache slots <= index + t (empty slots excluded).
        seen = jnp.arange(self.max_decode_length)[None, :] <= (index + jnp.arange(T))[:, None]
        mask = combine_masks(mask, seen[None, None])
        causal = False
      else:  # model.init: the cache is created (zeros) above; attend causally within x.
        causal = True

    if self.rotary and self_attention and not rotated:
      if positions_BT is None:
        positions_BT = jnp.arange(T)[None]
      q = apply_rotary(q, positions_BT, self.rotary_base)
      k = apply_rotary(k, positions_BT, self.rotary_base)

    dropout_rate = self.dropout_rate if train else 0.0
    out = dot_product_attention(
        q, k, v, mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
        dropout_rng=self.make_rng('dropout') if dropout_rate > 0 else None,
        implementation=self.attention, chunk_size=self.chunk_size)
    return nn.DenseGeneral(D, axis=(-2, -1), use_bias=self.use_bias, dtype=dtype,
                           param_dtype=param_dtype, name='out',
                           kernel_init=layers.partitioned(init, ('heads', 'kv', 'embed')),
                           bias_init=layers.partitioned(nn.initializers.zeros_init(), ('embed',))
                           )(out)
