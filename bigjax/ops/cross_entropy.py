"""Next-token cross-entropy of a tied (or any linear) output head, computed chunk by chunk so that
the (tokens, vocabulary) logits never exist whole, in the forward or the backward pass.

For a 50,304-token vocabulary the full float32 logits of a gpt125m step (32 x 1024 tokens) take 6.6
GB and are read and written several times by the loss and its gradient. Here each chunk of
`chunk_size` tokens computes its logits with a float32-accumulated matmul and keeps only its log-
sum-exp; the backward pass (a custom VJP) recomputes each chunk's logits (one extra head matmul, a
third of the head's FLOPs), forms softmax - onehot, and accumulates the head's gradient over chunks
in a float32 carry whatever the head's dtype. Candidate for the GPU step (issue 19;
experiments/bench/gpu_checks.py times it against the plain loss); the CPU benchmarks' vocabulary is
260, where the plain loss is what runs.

Shapes: N tokens, D model width, V vocabulary.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp


def cross_entropy_plain(
  hidden_ND: jax.Array, head_VD: jax.Array, targets_N: jax.Array
) -> jax.Array:
  """Reference: per-token -log softmax(hidden @ head^T)[target] with the full (N, V) float32
  logits. hidden (N, D), head (V, D) (a tied embedding table), targets (N,) int -> (N,) float32."""
  logits = jnp.dot(hidden_ND, head_VD.T, preferred_element_type=jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_N[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _chunks(x, chunk_size):
  """(N, ...) -> (N / chunk_size, chunk_size, ...), N padded up to a multiple with zeros."""
  pad = -x.shape[0] % chunk_size
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, chunk_size, *x.shape[1:])


def _logits(hidden_CD, head_VD):
  return jnp.dot(hidden_CD, head_VD.T, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden_ND, head_VD, targets_N, chunk_size):
  return _chunked_forward(hidden_ND, head_VD, targets_N, chunk_size)[0]


def _chunked_forward(hidden_ND, head_VD, targets_N, chunk_size):
  def chunk(xs):
    hidden_CD, targets_C = xs
    logits = _logits(hidden_CD, head_VD)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets_C[:, None], axis=-1)[:, 0], lse

  n = hidden_ND.shape[0]
  losses, lse = lax.map(chunk, (_chunks(hidden_ND, chunk_size), _chunks(targets_N, chunk_size)))
  return losses.reshape(-1)[:n], (hidden_ND, head_VD, targets_N, lse)


def _chunked_backward(chunk_size, residuals, g_N):
  hidden_ND, head_VD, targets_N, lse = residuals
  n, v = hidden_ND.shape[0], head_VD.shape[0]

  def chunk(d_head_VD, xs):
    hidden_CD, targets_C, lse_C, g_C = xs
    probs = jnp.exp(_logits(hidden_CD, head_VD) - lse_C[:, None])
    d_logits = (probs - jax.nn.one_hot(targets_C, v, dtype=probs.dtype)) * g_C[:, None]
    d_hidden = jnp.dot(d_logits.astype(head_VD.dtype), head_VD, preferred_element_type=jnp.float32)
    d_head_VD += jnp.dot(
      d_logits.T.astype(hidden_CD.dtype), hidden_CD, preferred_element_type=jnp.float32
    )
    return d_head_VD, d_hidden.astype(hidden_CD.dtype)

  xs = (
    _chunks(hidden_ND, chunk_size),
    _chunks(targets_N, chunk_size),
    lse,
    _chunks(g_N.astype(jnp.float32), chunk_size),  # padded rows get 0: no gradient
  )
  d_head, d_hidden = lax.scan(chunk, jnp.zeros(head_VD.shape, jnp.float32), xs)
  return d_hidden.reshape(-1, hidden_ND.shape[1])[:n], d_head.astype(head_VD.dtype), None


_chunked.defvjp(_chunked_forward, _chunked_backward)


def cross_entropy_chunked(
  hidden_ND: jax.Array, head_VD: jax.Array, targets_N: jax.Array, chunk_size: int = 4096
) -> jax.Array:
  """cross_entropy_plain's values and gradients without materialising the (N, V) logits: at most
  (chunk_size, V) float32 logits exist at a time, forward and backward. N need not divide by
  chunk_size (the last chunk is padded; padded rows are dropped). Gradients flow to hidden and
  head (targets are integers). Returns (N,) float32."""
  if chunk_size < 1:
    raise ValueError(f'chunk_size={chunk_size} must be >= 1')
  return _chunked(hidden_ND, head_VD, targets_N, chunk_size)
