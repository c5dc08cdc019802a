"""Decoder-only language model (GPT-2 shape) with tied embeddings and a KV cache (the HuggingFace
GPT-2 import is bigjax/models/hf/gpt2.py).

  logits = Model(...).apply(variables, tokens_BT)            # (B, T, V) float32
  tokens = generate(model, params, prompt_BT, max_new_tokens=100, temperature=0.8, top_k=40, seed=0)

(`generate` lives in bigjax/models/generate.py, shared with llama, and is re-exported here.)
"""

from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import attention, layers, transformer, virtual_tokens
from bigjax.models.generate import generate  # noqa: F401  (gpt.generate, shared with llama)


class Model(nn.Module):
  """GPT: tokens (B, T) int -> next-token logits (B, T, vocab_size) float32.

  positions: 'learned' (GPT-2), 'sinusoidal' (token embeddings scaled by sqrt(embed_dim), as in
  the original Transformer) or 'rotary'. mlp_dim 0 means 4 * embed_dim. Dropout
  after the embeddings and in every block. scan/remat: see transformer.Stack. attention: 'xla' |
  'cudnn' | 'chunked'. max_len bounds T (and the KV cache when decoding). pre_ln: True (GPT-2)
  normalises each sublayer's input and the stack's output before the head; False is the original
  Transformer's post-LN, LayerNorm(x + sublayer(x)) after every residual add and no final norm.
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'vocab_size': 'vocab_size'}
  # Positions in front of the tokens a PEFT adapter's virtual tokens take (prompt / prefix tuning:
  # set on the adapted class by bigjax.peft.common.adapt); generate() counts them against max_len.
  virtual_tokens: ClassVar[int] = 0
  vocab_size: int = 260
  num_layers: int = 6
  num_heads: int = 6
  embed_dim: int = 384
  mlp_dim: int = 0
  num_kv_heads: int | None = None
  max_len: int = 256
  dropout: float = 0.0
  positions: str = 'learned'
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  activation: str = 'gelu'
  use_bias: bool = True
  pre_ln: bool = True
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, inputs, segment_ids=None, positions=None, *, train=False, decode=False):
    """inputs: (B, T) int token ids, T <= max_len. decode: T new tokens extend the KV cache.

    Packed windows (bigjax.data.packing): segment_ids (B, T) int, tokens attend only to earlier
    tokens of their own segment; positions (B, T) int, each token's position in its document
    (default 0..T-1, or after the cache when decoding)."""
    chex.assert_rank(inputs, 2)
    b, t = inputs.shape
    if t > self.max_len:
      raise ValueError(
        f'sequence length {t} exceeds max_len={self.max_len}; shorten the '
        'sequences or raise max_len'
      )
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}')
    if self.positions not in ('learned', 'sinusoidal', 'rotary'):
      raise ValueError(
        f"positions={self.positions!r} is unknown; use 'learned', 'sinusoidal' or 'rotary'"
      )
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    embed = nn.Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=layers.partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')),
      name='embed',
    )
    # Virtual positions in front (prompt / prefix tuning, bigjax/models/virtual_tokens.py): R
    # prepended rows, the tokens from position offset + R on.
    x, offset = virtual_tokens.VirtualTokens(self.param_dtype, name='virtual_tokens')(
      embed(inputs), decode=decode
    )
    prepended = x.shape[1] - t
    if not decode and self.positions != 'rotary' and offset + x.shape[1] > self.max_len:
      raise ValueError(  # a position table of max_len rows; rotary positions need none
        f'max_len={self.max_len} is less than the sequence length {t} plus '
        f'{offset + prepended} virtual tokens (prompt / prefix tuning); shorten the sequences '
        'or raise max_len'
      )
    start = attention.decode_start(self, x.shape[1]) if decode else 0
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    mask = None
    if segment_ids is not None:  # (B, 1, T, T): same segment (causal=True adds the order)
      chex.assert_equal_shape([inputs, segment_ids, positions])
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    positions = virtual_tokens.row_positions(positions, prepended, offset)
    mask = virtual_tokens.pad_mask(mask, prepended, prepended)
    if self.positions == 'learned':
      x = x + attention.LearnedPositions(
        self.max_len, self.embed_dim, self.dtype, self.param_dtype, name='position_embed'
      )(positions)
    elif self.positions == 'sinusoidal':
      # As in Vaswani et al. (2017, sec. 3.4): token embeddings times sqrt(d) before adding the
      # fixed sinusoids (entries of size ~1); unscaled N(0, 0.02) tokens are drowned by them and the
      # model sits at the unigram loss for hundreds of steps.
      table = attention.sinusoidal_positions(self.max_len, self.embed_dim)
      x = x * jnp.sqrt(self.embed_dim).astype(x.dtype)
      x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = transformer.encoder_stack(
      self,
      dtype,
      param_dtype,
      num_kv_heads=self.num_kv_heads,
      activation=self.activation,
      attention_dropout_rate=self.dropout,
      norm=self.norm,
      norm_eps=self.norm_eps,
      pre_ln=self.pre_ln,
      causal=True,
      rotary=self.positions == 'rotary',
      use_bias=self.use_bias,
      max_decode_length=self.max_len,
    )(x, mask, positions, train=train, decode=decode)
    return embed.attend(x[:, prepended:]).astype(jnp.float32)

  @nn.nowrap
  def transformer_shape(self, input_shape: tuple[int, ...]) -> tuple[str, int, int, int, int]:
    """('gpt', L, T, d, 0) for one example's tokens of shape (T,) (see bigjax.flops)."""
    return 'gpt', self.num_layers, int(input_shape[0]), self.embed_dim, 0

  @nn.nowrap
  def train_flops_per_example(self, params, input_shape: tuple[int, ...]) -> int:
    """Analytic training FLOPs of one example of tokens (T,): 6 * N * T + 12 * L * T^2 * d with
    N = all parameters but the position table (bigjax.flops conventions)."""
    from bigjax.flops import counting  # pylint: disable=import-outside-toplevel

    _, num_layers, t, d, _ = self.transformer_shape(input_shape)
    return counting.transformer_train_flops(params, num_layers=num_layers, seq_len=t, embed_dim=d)
