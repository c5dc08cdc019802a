"""Virtual positions in front of the tokens: where prompt tuning and prefix tuning
(bigjax/peft/prompt.py, prefix.py) enter the text models (gpt, llama, bert).

The models call two things:

  x_BRD, offset = VirtualTokens(name='virtual_tokens')(token_embeddings_BTD, decode=decode)

A base model has no virtual positions and gets (x, 0) back. Adapted by a PEFT method (which
intercepts this __call__ and keeps its parameters in this module's scope):
  prompt tuning  returns R = P learned embeddings prepended (R + T rows) and offset 0: the virtual
                 rows take positions 0..P-1 and the tokens P.. (Lester et al. 2021);
  prefix tuning  returns (x, P): no rows; the tokens start at position P, behind the P learned
                 keys and values its interceptor puts in front of every self-attention layer's
                 key and value projections (Li & Liang 2021).
The model gives its rows the positions `row_positions(...)`, widens its masks with `pad_mask`,
and drops the R virtual rows from its per-token outputs (so no loss target falls on them).

In an attention layer, `split_prefix` finds prefix tuning's P leading key/value rows (the key
projection's output is P longer than the tokens) and `join_prefix` puts them in front of the keys
and values the kernel sees, after rotary positions (prefix keys are not rotated, as HF PEFT's
cached ones are not) and after the KV cache (which holds the tokens only).

Shapes: B batch, T tokens, R prepended rows, P virtual positions, K key/value heads, H head size.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class VirtualTokens(nn.Module):
  """The hook: token embeddings x (B, T, D) -> (rows (B, R + T, D), offset); a base model's
  (x, 0). decode: the call extends a KV cache (prompt tuning prepends only on the first call).
  param_dtype: the dtype of the parameters a PEFT method creates here."""

  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, decode: bool = False) -> tuple[jax.Array, int]:
    del decode  # a base model has no virtual positions
    return x_BTD, 0


def row_positions(tokens_BT: jax.Array, prepended: int, offset: int) -> jax.Array:
  """Positions of the model's rows: tokens_BT (B, T) are the tokens' own positions (from 0, or
  after a KV cache); `prepended` virtual rows in front take offset + 0..R-1, the tokens offset +
  R + theirs -> (B, R + T) int32."""
  b = tokens_BT.shape[0]
  virtual = jnp.broadcast_to(jnp.arange(prepended, dtype=jnp.int32), (b, prepended))
  return offset + jnp.concatenate([virtual, prepended + tokens_BT.astype(jnp.int32)], axis=1)


def pad_mask(mask: jax.Array | None, rows: int, keys: int) -> jax.Array | None:
  """A (..., T, S) bool attention mask widened for virtual positions in front: `rows` leading
  query rows and `keys` leading keys, all True (every token may attend the virtual ones; causal
  masking still keeps virtual rows from seeing tokens). Axes of size 1 (broadcast) stay."""
  if mask is None:
    return None
  pads = [(0, 0)] * (mask.ndim - 2)
  pads.append((rows, 0) if mask.shape[-2] > 1 else (0, 0))
  pads.append((keys, 0) if mask.shape[-1] > 1 else (0, 0))
  return jnp.pad(mask, pads, constant_values=True)


def split_prefix(
  k_BSKH: jax.Array, v_BSKH: jax.Array, num_tokens: int
) -> tuple[tuple[jax.Array, jax.Array] | None, jax.Array, jax.Array]:
  """((prefix keys, prefix values) (B, P, K, H) or None, token keys, token values (B, T, K, H))
  of key/value projections whose outputs are P = S - num_tokens rows longer than the tokens."""
  num_prefix = k_BSKH.shape[1] - num_tokens
  if num_prefix == 0:
    return None, k_BSKH, v_BSKH
  prefix = (k_BSKH[:, :num_prefix], v_BSKH[:, :num_prefix])
  return prefix, k_BSKH[:, num_prefix:], v_BSKH[:, num_prefix:]


def join_prefix(
  prefix: tuple[jax.Array, jax.Array] | None,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(keys, values (B, P + S, K, H), mask widened by P True keys) with `prefix` in front; as
  given when there is none. With causal masking the kernels align the last query with the last
  key, so token i sees the whole prefix and tokens <= i."""
  if prefix is None:
    return k_BSKH, v_BSKH, mask
  pk, pv = prefix
  k = jnp.concatenate([pk.astype(k_BSKH.dtype), k_BSKH], axis=1)
  v = jnp.concatenate([pv.astype(v_BSKH.dtype), v_BSKH], axis=1)
  return k, v, pad_mask(mask, 0, pk.shape[1])
