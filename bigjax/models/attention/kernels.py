"""Masks, the reference attention, the 'xla' and 'cudnn' kernels and `dot_product_attention`.

Shapes: B batch, T query length, S key/value length, N query heads, K key/value heads (K divides N,
G = N/K query heads per key/value head), H head size. Masks are boolean, broadcastable to
(B, N, T, S), True = may attend; biases are added to the logits with the same broadcast.

Kernels by name live in `IMPLEMENTATIONS` (the project's `registry.Registry`); each entry is called
as `kernel(q, k, v, mask, bias, causal=, dropout_rate=, dropout_rng=, chunk_size=)` with inputs
already checked by `dot_product_attention`. The 'chunked' kernel registers itself in `chunked.py`.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import registry
from bigjax.errors import UserError

IMPLEMENTATIONS = registry.Registry('attention implementations', 'config.model.kwargs.attention')
_FIELD = IMPLEMENTATIONS.field


# ----------------------------------------------------------------------------------------------
# Masks.


def causal_mask(T: int, S: int | None = None) -> jax.Array:
  """(1, 1, T, S) bool: query i attends key j iff j <= i + S - T (S defaults to T)."""
  S = T if S is None else S
  return (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None, None]


def padding_mask(valid_q_BT: jax.Array, valid_k_BS: jax.Array | None = None) -> jax.Array:
  """(B, 1, T, S) bool from per-token validity: True where both query and key are real tokens.

  valid_q_BT: (B, T) bool; valid_k_BS: (B, S) bool, defaults to valid_q_BT (self-attention).
  Rows of padded queries are fully masked, so their attention output is zeros.
  """
  valid_k_BS = valid_q_BT if valid_k_BS is None else valid_k_BS
  chex.assert_rank([valid_q_BT, valid_k_BS], 2)
  return valid_q_BT.astype(bool)[:, None, :, None] & valid_k_BS.astype(bool)[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical and of boolean masks (shapes broadcast); Nones are ignored, all None -> None."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  return functools.reduce(jnp.logical_and, [jnp.asarray(m, bool) for m in present])


# ----------------------------------------------------------------------------------------------
# Reference and shared pieces.


def reference_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  bias: jax.Array | None = None,
) -> jax.Array:
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


def attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  bias: jax.Array | None = None,
  causal: bool = False,
) -> jax.Array:
  """The attention probabilities every kernel computes: q (B, T, N, H), k (B, S, K, H) ->
  (B, N, T, S) float32 rows summing to 1 (fully masked rows 0). Not used in training; the layer
  sows it for bigjax.explain (attention maps and rollout)."""
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  k = jnp.repeat(jnp.asarray(k, jnp.float32), N // K, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', jnp.asarray(q, jnp.float32), k) / math.sqrt(H)
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  mask = combine_masks(mask, causal_mask(T, S) if causal else None)
  return _masked_softmax(logits, None if mask is None else jnp.broadcast_to(mask, logits.shape))


def _check_inputs(q, k, v, mask, bias):
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  if k.shape[0] != B or k.shape[3] != H:
    raise ValueError(
      f'q {q.shape} and k {k.shape} must share batch and head size: (B, T, N, H), (B, S, K, H)'
    )
  if N % K:
    raise UserError(
      f'{K} key/value heads do not divide {N} query heads; set '
      'config.model.kwargs.num_kv_heads to a divisor of num_heads'
    )
  for name, x in (('mask', mask), ('bias', bias)):
    if x is not None and (
      x.ndim > 4 or jnp.broadcast_shapes(x.shape, (B, N, T, S)) != (B, N, T, S)
    ):
      raise ValueError(
        f'{name} of shape {x.shape} does not broadcast to (B, N, T, S) = {(B, N, T, S)}'
      )


def _grouped(x: jax.Array | None, num_kv_heads: int) -> jax.Array | None:
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


# ----------------------------------------------------------------------------------------------
# Kernels.


@IMPLEMENTATIONS.register('xla')
def _xla_attention(q, k, v, mask, bias, *, causal, dropout_rate, dropout_rng, chunk_size):
  """Einsum attention. With as many kv heads as query heads it uses 4-D einsums: the grouped 5-D
  form compiled to extra full-size transposes on XLA:CPU (a GPT step ran ~10% slower). Moving the
  heads axis first before the einsums was 1.5-1.9x faster for this kernel alone but compiles to the
  same program inside a GPT train step (issue 19; experiments/bench/README.md), so it is not used."""
  del chunk_size
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  is_grouped = K != N
  mask = combine_masks(mask, causal_mask(T, S) if causal else None)
  if is_grouped:
    logits = jnp.einsum(
      'btkgh,bskh->bkgts', q.reshape(B, T, K, N // K, H), k, preferred_element_type=jnp.float32
    )
    bias, mask = _grouped(bias, K), _grouped(mask, K)
  else:
    logits = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(H))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = _masked_softmax(logits, mask)
  if dropout_rate > 0:
    weights = _dropout(weights, dropout_rate, dropout_rng)
  if is_grouped:
    out = jnp.einsum(
      'bkgts,bskh->btkgh', weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
  else:
    out = jnp.einsum(
      'bnts,bsnh->btnh', weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
  return out.reshape(B, T, N, H).astype(q.dtype)


def _backend():
  return jax.default_backend()


@IMPLEMENTATIONS.register('cudnn')
def _cudnn_attention(q, k, v, mask, bias, *, causal, dropout_rate, dropout_rng, chunk_size):
  """jax.nn.dot_product_attention's cuDNN kernel; GPU only, bfloat16/float16, no dropout."""
  del dropout_rng, chunk_size
  if dropout_rate > 0:
    raise UserError(
      f"{_FIELD}='cudnn' does not support attention dropout "
      f'(dropout_rate={dropout_rate}); set it to 0 or use attention=\'xla\''
    )
  if _backend() != 'gpu':
    raise UserError(
      f"{_FIELD}='cudnn' needs a GPU but the backend is {_backend()!r}; use 'xla' or 'chunked'"
    )
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise UserError(
      f"{_FIELD}='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; set "
      "config.model.kwargs.dtype='bfloat16' or use attention='xla'"
    )
  T, S = q.shape[1], k.shape[1]
  # jax's is_causal aligns the first query with the first key; ours aligns the last ones.
  mask = combine_masks(mask, causal_mask(T, S) if causal and T != S else None)
  four = lambda x: None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
  mask, bias = four(mask), four(bias)
  out = jax.nn.dot_product_attention(
    q,
    k,
    v,
    bias=None if bias is None else bias.astype(q.dtype),
    mask=mask,
    is_causal=causal and T == S,
    implementation='cudnn',
  )
  if mask is not None:  # cuDNN turns the mask into a large negative bias: zero empty rows
    any_BNT = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], T, S)).any(axis=-1)
    out = jnp.where(any_BNT.transpose(0, 2, 1)[..., None], out, 0)
  return out


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  bias: jax.Array | None = None,
  causal: bool = False,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  implementation: str = 'xla',
  chunk_size: int = 128,
) -> jax.Array:
  """Scaled dot-product attention: q (B, T, N, H) over k, v (B, S, K, H) -> (B, T, N, H).

  mask: bool broadcastable to (B, N, T, S), True = attend. bias: added to the logits, broadcastable
  to (B, N, T, S). causal: also mask keys j > i + S - T. K must divide N (grouped-query attention;
  query head n uses key/value head n // (N/K)). The softmax runs in float32 whatever the input
  dtype; the output has q's dtype. Fully masked query rows give zeros. dropout_rate > 0 drops
  attention weights using dropout_rng.

  implementation (a name in IMPLEMENTATIONS; an unknown one raises its UserError):
    'xla': einsums over the whole (T, S) logits; GQA by grouping query heads, no k/v repeat.
    'cudnn': jax.nn.dot_product_attention's cuDNN flash kernel; GPU only, bfloat16/float16, no
      dropout.
    'chunked': flash-style, a scan over key blocks of chunk_size with an online softmax and a
      recomputing backward pass, so memory is linear in S (and T). S need not divide by chunk_size
      (the last block is padded and masked). Same values and gradients as 'xla' (first-order
      reverse mode only); with dropout the random pattern differs from 'xla' (same distribution).
  """
  kernel = IMPLEMENTATIONS.get(implementation)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  mask = None if mask is None else jnp.asarray(mask, bool)
  bias = None if bias is None else jnp.asarray(bias)
  _check_inputs(q, k, v, mask, bias)
  if dropout_rate and not 0.0 < dropout_rate < 1.0:
    raise UserError(f'config.model.kwargs.dropout_rate={dropout_rate} must be in [0, 1)')
  if dropout_rate > 0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs a dropout_rng')
  return kernel(
    q,
    k,
    v,
    mask,
    bias,
    causal=causal,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    chunk_size=chunk_size,
  )
