"""`MultiHeadAttention`: the Linen multi-head (grouped-query, multi-query) attention layer, with a
KV cache for incremental decoding.

Shapes: B batch, T query length, S key/value length, N query heads, K key/value heads, H head size,
D model width, L = max_decode_length (the cache length).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.models import layers, virtual_tokens
from bigjax.models.attention.kernels import (
  IMPLEMENTATIONS,
  attention_weights,
  combine_masks,
  dot_product_attention,
)
from bigjax.models.attention.positions import apply_rotary


def decode_start(module: nn.Module, rows: int) -> jax.Array | int:
  """Position of the first of `rows` new rows under KV-cache decoding: the number of rows already
  in the cache (the model's 'cache' variable `position_index`, advanced here by `rows`). Called
  inside a decoder's compact __call__ (gpt, llama); 0 while the cache is being created."""
  index = module.variable('cache', 'position_index', lambda: jnp.zeros((), jnp.int32))
  start = index.value
  if not module.is_initializing():
    index.value = start + rows
  return start


def decode_with_cache(module, q, k, v, mask, positions_BT, *, length: int, rotary_base=None):
  """The KV-cache step of a self-attention layer (called inside its compact __call__; used by
  `MultiHeadAttention` and the Llama attention).

  q (B, T, N, H), k, v (B, T, K, H) of T new tokens; length: the cache length L
  (max_decode_length); rotary_base: RoPE's base, or None without rotary positions. At model.init it
  creates the zero 'cache' collection in `module` and returns the inputs with causal=True.
  Otherwise it rotates q and k (rotary), writes k, v at cache_index, advances it by T and returns
  q, the cached k, v (B, L, K, H), the mask with the filled prefix (<= index + t for token t) and
  causal=False. Returns (q, k, v, mask, causal, rotated).
  """
  B, T = q.shape[:2]
  num_kv, head_dim = k.shape[2:]
  if length < 1:
    raise UserError(
      'decode=True needs config.model.kwargs.max_decode_length > 0 (the KV cache length)'
    )
  initialized = module.has_variable('cache', 'cached_key')
  if not initialized and not module.is_initializing():
    raise UserError(
      "decode=True found no 'cache' collection: create it with "
      "model.init(rngs, x_of_shape_(B, max_decode_length, D), decode=True) and "
      "pass it with mutable=['cache']"
    )
  shape = (B, length, num_kv, head_dim)
  cached_key = module.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
  cached_value = module.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
  cache_index = module.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
  if not initialized:  # model.init: the cache is created (zeros) above; attend causally within x.
    return q, k, v, mask, True, False
  chex.assert_shape(k, (cached_key.value.shape[0], None, num_kv, head_dim))
  index = cache_index.value
  if positions_BT is None:
    positions_BT = (index + jnp.arange(T))[None]
  rotated = False
  if rotary_base is not None:  # keys are cached rotated
    q = apply_rotary(q, positions_BT, rotary_base)
    k = apply_rotary(k, positions_BT, rotary_base)
    rotated = True
  cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
  cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
  cache_index.value = index + T
  # New token t sits at index + t and sees cache slots <= index + t (empty slots excluded).
  seen = jnp.arange(length)[None, :] <= (index + jnp.arange(T))[:, None]
  mask = combine_masks(mask, seen[None, None])
  return q, cached_key.value, cached_value.value, mask, False, rotated


class MultiHeadAttention(nn.Module):
  """Multi-head (grouped-query, multi-query) attention: x (B, T, D) -> (B, T, D).

  num_heads N query heads of head_dim H; num_kv_heads K key/value heads (None = N; must divide N).
  use_bias: biases on the q/k/v/output projections. rotary: RoPE on q and k (self-attention only;
  cross-attention ignores it). attention: a name in IMPLEMENTATIONS ('xla' | 'cudnn' | 'chunked';
  see dot_product_attention), chunk_size its block size. causal: self-attention masks future tokens
  (decoding always does). dtype: compute dtype; param_dtype: parameter dtype. Params: query kernel
  ('embed', 'heads', 'kv'), key/value kernels ('embed', 'kv_heads', 'kv'), output kernel
  ('heads', 'kv', 'embed'). An unknown `attention` raises ValueError naming the attribute.

  Incremental decoding: the 'cache' collection holds cached_key, cached_value
  (B, max_decode_length, K, H) and cache_index (int32 scalar). Create it, zeros, with
  `model.init(rngs, x, decode=True)` where x is (B, max_decode_length, D) (any length gives the same
  cache; the batch size B is fixed by it), then
  `model.apply({'params': ..., 'cache': cache}, x_new, decode=True, mutable=['cache'])` with T new
  tokens (T = 1, or T > 1 for a prefill): they are written at cache_index, attend causally to the
  filled prefix, and cache_index advances by T. Writing past max_decode_length is not checked (jit)
  and gives wrong results. Rotary positions default to cache_index + arange(T) when decoding.

  Prefix tuning (bigjax/peft/prefix.py) makes the key and value projections return P rows more
  than x has: those P learned keys/values go in front of the tokens' (after rotary positions and
  the cache, so neither touches them) and every query may attend them.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
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
  def __call__(
    self,
    x_BTD: jax.Array,
    context_BSD: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    positions_BT: jax.Array | None = None,
    train: bool = False,
    decode: bool = False,
  ) -> jax.Array:
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
      raise UserError(
        f'config.model.kwargs.num_kv_heads={num_kv} must divide num_heads={self.num_heads}'
      )
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(
        f'attention={self.attention!r} is unknown; known: {", ".join(IMPLEMENTATIONS.names())}'
      )
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    init = layers.initializer(self.kernel_init)
    self_attention = context_BSD is None
    context = x_BTD if self_attention else context_BSD
    chex.assert_rank(context, 3)

    def proj(features, names, name):
      return nn.DenseGeneral(
        features,
        axis=-1,
        use_bias=self.use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=layers.partitioned(init, names),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), names[1:]),
      )

    B, T, D = x_BTD.shape
    q = proj((self.num_heads, self.head_dim), ('embed', 'heads', 'kv'), 'query')(x_BTD)
    k = proj((num_kv, self.head_dim), ('embed', 'kv_heads', 'kv'), 'key')(context)
    v = proj((num_kv, self.head_dim), ('embed', 'kv_heads', 'kv'), 'value')(context)

    causal = self.causal and self_attention
    prefix = None  # prefix tuning's learned keys/values in front (bigjax/models/virtual_tokens.py)
    if self_attention:
      prefix, k, v = virtual_tokens.split_prefix(k, v, T)
    rotated = False
    if decode and self_attention:
      q, k, v, mask, causal, rotated = decode_with_cache(
        self,
        q,
        k,
        v,
        mask,
        positions_BT,
        length=self.max_decode_length,
        rotary_base=self.rotary_base if self.rotary else None,
      )

    if self.rotary and self_attention and not rotated:
      if positions_BT is None:
        positions_BT = jnp.arange(T)[None]
      q = apply_rotary(q, positions_BT, self.rotary_base)
      k = apply_rotary(k, positions_BT, self.rotary_base)
    k, v, mask = virtual_tokens.join_prefix(prefix, k, v, mask)

    # bigjax.explain's attention maps: only it makes 'attention' mutable (never init or training)
    if self.is_mutable_collection('attention') and not self.is_initializing():
      self.sow('attention', 'weights', attention_weights(q, k, mask=mask, bias=bias, causal=causal))
    dropout_rate = self.dropout_rate if train else 0.0
    out = dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      bias=bias,
      causal=causal,
      dropout_rate=dropout_rate,
      dropout_rng=self.make_rng('dropout') if dropout_rate > 0 else None,
      implementation=self.attention,
      chunk_size=self.chunk_size,
    )
    return nn.DenseGeneral(
      D,
      axis=(-2, -1),
      use_bias=self.use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      name='out',
      kernel_init=layers.partitioned(init, ('heads', 'kv', 'embed')),
      bias_init=layers.partitioned(nn.initializers.zeros_init(), ('embed',)),
    )(out)
