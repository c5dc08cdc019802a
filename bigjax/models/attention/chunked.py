"""The 'chunked' (flash-style) attention kernel: a scan over key blocks with an online softmax,
and a custom VJP that recomputes each block's weights from the saved log-sum-exp, so neither pass
holds a (T, S) array (beyond a mask or bias the caller passes in).

Shapes as in `kernels`: q (B, T, N, H), k, v (B, S, K, H), G = N/K, c = chunk_size; masks and
biases broadcastable to (B, N, T, S). Registered as IMPLEMENTATIONS 'chunked'.
"""

import functools
import math

import jax
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.models.attention.kernels import IMPLEMENTATIONS, _grouped


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
    return jax.random.bernoulli(
      jax.random.fold_in(rng, j), 1.0 - rate, (self.B, self.K, self.G, self.T, self.c)
    )


def _chunked_forward(q, k, v, mask, bias, rng, causal, rate, chunk_size):
  """-> (out (B, T, N, H) in q's dtype, lse (B, K, G, T) float32 log-sum-exp, inf on empty rows)."""
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
    pv = jnp.einsum('bkgts,bskh->btkgh', p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
    o = jnp.moveaxis(alpha, 3, 1)[..., None] * o + pv
    return (o, m_new, l), None

  init = (
    jnp.zeros((B, T, K, G, H), jnp.float32),
    jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
    jnp.zeros((B, K, G, T), jnp.float32),
  )
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

  dbias0 = (
    jnp.zeros(blk.bias.shape, jnp.float32) if blk.bias is not None and not bias_per_block else None
  )
  (dq, dbias), (dk, dv, db) = jax.lax.scan(
    step, (jnp.zeros(blk.qg.shape, jnp.float32), dbias0), jnp.arange(blk.num_blocks)
  )
  S = k.shape[1]
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((B, -1) + x.shape[3:])[:, :S]
  dk, dv = unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)
  if bias is not None:
    if bias_per_block:  # (num_blocks, b, k, g, t, c) -> (b, k, g, t, S)
      dbias = jnp.moveaxis(db, 0, -2).reshape(db.shape[1:-1] + (-1,))[..., :S]
    dbias = dbias.reshape(bias.shape).astype(bias.dtype)
  return dq.reshape(q.shape).astype(q.dtype), dk, dv, None, dbias, None


_chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


@IMPLEMENTATIONS.register('chunked')
def chunked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  bias: jax.Array | None,
  *,
  causal: bool,
  dropout_rate: float,
  dropout_rng: jax.Array | None,
  chunk_size: int,
) -> jax.Array:
  """q (B, T, N, H) over k, v (B, S, K, H) in key blocks of chunk_size -> (B, T, N, H).

  Inputs as checked by `kernels.dot_product_attention` (use that); chunk_size must be >= 1 and
  need not divide S (the last block is padded and masked).
  """
  if int(chunk_size) < 1:
    raise UserError(f'config.model.kwargs.chunk_size={chunk_size} must be a positive block size')
  return _chunked_attention(
    q,
    k,
    v,
    mask,
    bias,
    dropout_rng if dropout_rate > 0 else None,
    bool(causal),
    float(dropout_rate),
    int(chunk_size),
  )
