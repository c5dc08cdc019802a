"""Llama-family decoder-only language model: RMSNorm, rotary positions, SwiGLU MLP, grouped-query
attention and an untied output head (the Llama / Mistral / Qwen2 / SmolLM layout; HuggingFace
import and export: bigjax/models/hf/llama.py).

  logits = Model(...).apply(variables, tokens_BT)            # (B, T, V) float32
  tokens = generate(model, params, prompt_BT, max_new_tokens=100)   # KV cache, grouped-query

Parameters (logical axes in brackets; 'stack/layers/...' with a leading 'layers' axis when scan):
  embed/embedding (V, D) ['vocab', 'embed']
  stack/layer_i/attention_norm/scale, mlp_norm/scale (D,) ['norm']
  stack/layer_i/self_attention/query/kernel (D, N, H) ['embed', 'heads', 'kv'], key/value kernels
    (D, K, H) ['embed', 'kv_heads', 'kv'], out/kernel (N, H, D) ['heads', 'kv', 'embed'] (+ biases
    with qkv_bias / out_bias)
  stack/layer_i/mlp/wi_gate/kernel, wi_up/kernel (D, M) ['embed', 'mlp'], wo/kernel (M, D)
  stack/final_norm/scale (D,); lm_head/kernel (D, V) ['embed', 'vocab'] unless tie_embeddings
Every projection is a Dense kernel named as in the other families, so one regex over parameter
paths (e.g. 'self_attention/(query|value)/kernel') selects the same layers in gpt, bert and llama.
"""

from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.models import attention, layers, transformer, virtual_tokens
from bigjax.models.generate import generate  # noqa: F401  (llama.generate, shared with gpt)

_INIT = nn.initializers.normal(0.02)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary positions: x (B, T, D) -> (B, T, D).

  N = num_heads query heads and K = num_kv_heads key/value heads of head_dim H (K divides N; query
  head n uses key/value head n // (N/K)). qkv_bias: biases on the query/key/value projections
  (Qwen2); out_bias: on the output projection (Llama's attention_bias sets both). The kernels are
  bigjax's (`attention.dot_product_attention`, `attention.apply_rotary`: the half-split RoPE that
  HuggingFace Llama checkpoints use). A layer of its own rather than `MultiHeadAttention`, whose
  one use_bias cannot express Qwen2's biased q/k/v with an unbiased output.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  qkv_bias: bool = False
  out_bias: bool = False
  dropout_rate: float = 0.0
  attention: str = 'xla'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  max_decode_length: int = 0

  @nn.compact
  def __call__(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    train: bool = False,
    mask: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    """mask: bool broadcastable to (B, N, T, T), True = may attend (on top of causal). decode:
    extend the KV cache of max_decode_length key/value heads' rows (attention.decode_with_cache,
    keys cached rotated); prefix tuning's keys/values go in front as in MultiHeadAttention."""
    chex.assert_rank(x_BTD, 3)
    d = x_BTD.shape[-1]

    def proj(features, names, name):
      return nn.DenseGeneral(
        features,
        axis=-1,
        use_bias=self.qkv_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=layers.partitioned(_INIT, names),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), names[1:]),
        name=name,
      )

    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q_BTNH = proj((n, h), ('embed', 'heads', 'kv'), 'query')(x_BTD)
    k_BTKH = proj((k, h), ('embed', 'kv_heads', 'kv'), 'key')(x_BTD)
    v_BTKH = proj((k, h), ('embed', 'kv_heads', 'kv'), 'value')(x_BTD)
    # prefix tuning's learned keys/values in front (bigjax/models/virtual_tokens.py)
    prefix, k_BTKH, v_BTKH = virtual_tokens.split_prefix(k_BTKH, v_BTKH, x_BTD.shape[1])
    causal = True
    if decode:  # k, v become the cache's (B, max_decode_length, K, H), rotated
      q_BTNH, k_BTKH, v_BTKH, mask, causal, _ = attention.decode_with_cache(
        self,
        q_BTNH,
        k_BTKH,
        v_BTKH,
        mask,
        positions_BT,
        length=self.max_decode_length,
        rotary_base=self.rope_theta,
      )
    if causal:  # not decoding (or creating the cache at init): rotate here
      q_BTNH = attention.apply_rotary(q_BTNH, positions_BT, self.rope_theta)
      k_BTKH = attention.apply_rotary(k_BTKH, positions_BT, self.rope_theta)
    k_BTKH, v_BTKH, mask = virtual_tokens.join_prefix(prefix, k_BTKH, v_BTKH, mask)
    rate = self.dropout_rate if train else 0.0
    out_BTNH = attention.dot_product_attention(
      q_BTNH,
      k_BTKH,
      v_BTKH,
      mask=mask,
      causal=causal,
      dropout_rate=rate,
      dropout_rng=self.make_rng('dropout') if rate > 0 else None,
      implementation=self.attention,
    )
    return nn.DenseGeneral(
      d,
      axis=(-2, -1),
      use_bias=self.out_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=layers.partitioned(_INIT, ('heads', 'kv', 'embed')),
      bias_init=layers.partitioned(nn.initializers.zeros_init(), ('embed',)),
      name='out',
    )(out_BTNH)


class Block(nn.Module):
  """One pre-RMSNorm layer: x + attention(norm(x)), then + SwiGLU(norm(x)); (B, T, D) -> (B, T, D).
  train is a field so the block can be scanned; when `scanned`, returns (x, None)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  out_bias: bool = False
  dropout_rate: float = 0.0
  attention: str = 'xla'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  max_decode_length: int = 0
  train: bool = False
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask=None):
    dropout = nn.Dropout(self.dropout_rate, deterministic=not self.train)
    norm = lambda name: transformer.norm(
      'rmsnorm', self.norm_eps, self.dtype, self.param_dtype, name
    )
    x_BTD = x_BTD + dropout(
      Attention(
        self.num_heads,
        self.num_kv_heads,
        self.head_dim,
        self.rope_theta,
        self.qkv_bias,
        self.out_bias,
        self.dropout_rate,
        self.attention,
        self.dtype,
        self.param_dtype,
        self.max_decode_length,
        name='self_attention',
      )(norm('attention_norm')(x_BTD), positions_BT, self.train, mask, self.decode)
    )
    mlp = transformer.Mlp(
      self.mlp_dim,
      'swiglu',
      self.dropout_rate,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='mlp',
    )
    x_BTD = x_BTD + dropout(mlp(norm('mlp_norm')(x_BTD), train=self.train))
    return (x_BTD, None) if self.scanned else x_BTD


class Stack(nn.Module):
  """num_layers Blocks (a dict `block` of Block fields) and the final RMSNorm: (B, T, D) ->
  (B, T, D). scan / remat as in transformer.Stack; decode: extend the layers' KV caches."""

  num_layers: int
  block: Any
  scan: bool = False
  remat: str = 'none'

  @nn.compact
  def __call__(self, x_BTD, positions_BT, train=False, mask=None, decode=False):
    if self.remat not in transformer.REMAT_POLICIES:
      raise ValueError(
        f'remat={self.remat!r} is unknown; use one of {", ".join(transformer.REMAT_POLICIES)}'
      )
    cls: Any = Block
    if self.remat != 'none':
      policy = transformer.REMAT_POLICIES[self.remat]
      cls = nn.remat(Block, policy=policy, prevent_cse=not self.scan)
    kwargs = dict(self.block, train=train, decode=decode)
    if self.scan:
      scanned = nn.scan(
        cls,
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x_BTD, _ = scanned(**kwargs, scanned=True, name='layers')(x_BTD, positions_BT, mask)
    else:
      for i in range(self.num_layers):
        x_BTD = cls(**kwargs, name=f'layer_{i}')(x_BTD, positions_BT, mask)
    b = self.block
    return transformer.norm('rmsnorm', b['norm_eps'], b['dtype'], b['param_dtype'], 'final_norm')(
      x_BTD
    )


class Model(nn.Module):
  """Llama: tokens (B, T) int -> next-token logits (B, T, vocab_size) float32.

  num_kv_heads: key/value heads (None = num_heads; must divide it). head_dim: 0 means
  embed_dim // num_heads. mlp_dim: the SwiGLU hidden width (0 means 4 * embed_dim). max_len bounds
  T and the KV cache when decoding (rotary positions need no table). rope_theta: RoPE base.
  qkv_bias / out_bias: see Attention.
  tie_embeddings: the head is the token embedding's transpose (SmolLM) instead of 'lm_head'.
  dropout: on attention weights and sublayer outputs (HF checkpoints use 0). scan/remat: see
  transformer.Stack. attention: 'xla' | 'cudnn' | 'chunked'.
  """

  # Fields that build() fills from the data; configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'vocab_size': 'vocab_size'}
  # Positions in front of the tokens a PEFT adapter's virtual tokens take (as gpt.Model's).
  virtual_tokens: ClassVar[int] = 0
  vocab_size: int = 260
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  embed_dim: int = 256
  head_dim: int = 0
  mlp_dim: int = 0
  max_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  out_bias: bool = False
  tie_embeddings: bool = False
  dropout: float = 0.0
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.nowrap
  def heads(self) -> tuple[int, int, int]:
    """(N, K, H): query heads, key/value heads, head size; ValueError naming a bad field."""
    n, k = self.num_heads, self.num_kv_heads or self.num_heads
    if n < 1 or k < 1 or n % k:
      raise ValueError(f'num_kv_heads={k} must be a positive divisor of num_heads={n}')
    if not self.head_dim and self.embed_dim % n:
      raise ValueError(
        f'embed_dim={self.embed_dim} is not divisible by num_heads={n}; set head_dim'
      )
    return n, k, self.head_dim or self.embed_dim // n

  @nn.compact
  def __call__(self, inputs, segment_ids=None, positions=None, *, train=False, decode=False):
    """inputs: (B, T) int token ids, T <= max_len -> (B, T, vocab_size) float32 logits.

    Packed windows (bigjax.data.packing): segment_ids (B, T), tokens attend only within their
    segment; positions (B, T), each token's position in its document (default 0..T-1, or after
    the cache when decoding). decode: T new tokens extend the KV cache (max_len rows per layer,
    num_kv_heads heads; create it with model.init(rngs, tokens_of_shape_(B, max_len),
    decode=True) as for gpt, bigjax.models.generate)."""
    chex.assert_rank(inputs, 2)
    b, t = inputs.shape
    if t > self.max_len:
      raise ValueError(
        f'sequence length {t} exceeds max_len={self.max_len}; shorten the sequences or raise max_len'
      )
    n, k, h = self.heads()
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    embed = nn.Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=layers.partitioned(_INIT, ('vocab', 'embed')),
      name='embed',
    )
    # Virtual positions in front (prompt / prefix tuning, bigjax/models/virtual_tokens.py): R
    # prepended rows, the tokens from position offset + R on.
    x_BRD, offset = virtual_tokens.VirtualTokens(self.param_dtype, name='virtual_tokens')(
      embed(inputs), decode=decode
    )
    prepended = x_BRD.shape[1] - t  # rotary positions need no table: they may pass max_len
    start = attention.decode_start(self, x_BRD.shape[1]) if decode else 0
    x_BTD = nn.Dropout(self.dropout)(x_BRD, deterministic=not train)
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    mask = None
    if segment_ids is not None:  # (B, 1, T, T): same segment (the attention adds causal order)
      chex.assert_equal_shape([inputs, segment_ids, positions])
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    positions_BT = virtual_tokens.row_positions(positions, prepended, offset)
    mask = virtual_tokens.pad_mask(mask, prepended, prepended)
    x_BTD = Stack(
      self.num_layers,
      scan=self.scan,
      remat=self.remat,
      name='stack',
      block=dict(
        num_heads=n,
        num_kv_heads=k,
        head_dim=h,
        mlp_dim=self.mlp_dim or 4 * self.embed_dim,
        rope_theta=self.rope_theta,
        norm_eps=self.norm_eps,
        qkv_bias=self.qkv_bias,
        out_bias=self.out_bias,
        dropout_rate=self.dropout,
        attention=self.attention,
        dtype=dtype,
        param_dtype=param_dtype,
        max_decode_length=self.max_len,
      ),
    )(x_BTD, positions_BT, train=train, mask=mask, decode=decode)
    x_BTD = x_BTD[:, prepended:]  # the virtual rows carry no output
    if self.tie_embeddings:
      return embed.attend(x_BTD).astype(jnp.float32)
    head = layers.dense(
      self.vocab_size,
      ('embed', 'vocab'),
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_INIT,
      use_bias=False,
      name='lm_head',
    )
    return head(x_BTD).astype(jnp.float32)

  @nn.nowrap
  def transformer_shape(self, input_shape: tuple[int, ...]) -> tuple[str, int, int, int, int]:
    """('llama', L, T, d, 0) for one example's tokens of shape (T,) (see bigjax.flops)."""
    return 'llama', self.num_layers, int(input_shape[0]), self.embed_dim, 0

  @nn.nowrap
  def train_flops_per_example(self, params, input_shape: tuple[int, ...]) -> int:
    """Analytic training FLOPs of one example of tokens (T,): 6 * N * T + 12 * L * T^2 * (N_h H)
    with N = all parameters but the token embedding when the head is untied (then it is only
    looked up); the attention term uses the query heads' width N_h * H (bigjax.flops conventions)."""
    from bigjax.flops import counting  # pylint: disable=import-outside-toplevel

    n, _, h = self.heads()
    lookup = counting.LOOKUP_TABLES + (() if self.tie_embeddings else ('embed',))
    return counting.transformer_train_flops(
      params,
      num_layers=self.num_layers,
      seq_len=int(input_shape[0]),
      embed_dim=n * h,
      lookup=lookup,
    )
