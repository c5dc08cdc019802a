"""Decoder-only language model (GPT-2 shape) with tied embeddings and KV-cache generation (the
HuggingFace GPT-2 import is bigjax/models/hf/gpt2.py).

  logits = Model(...).apply(variables, tokens_BT)            # (B, T, V) float32
  tokens = generate(model, params, prompt_BT, max_new_tokens=100, temperature=0.8, top_k=40, seed=0)
"""

import functools
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.models import attention, layers, transformer


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
    start = 0
    if decode:  # position of the first new token = number of tokens already in the cache
      index = self.variable('cache', 'position_index', lambda: jnp.zeros((), jnp.int32))
      start = index.value
      if not self.is_initializing():
        index.value = start + t
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    mask = None
    if segment_ids is not None:  # (B, 1, T, T): same segment (causal=True adds the order)
      chex.assert_equal_shape([inputs, segment_ids, positions])
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    embed = nn.Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=layers.partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')),
      name='embed',
    )
    x = embed(inputs)
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
    return embed.attend(x).astype(jnp.float32)

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


def _sample(logits_BV, rng, temperature, top_k, top_p):
  """Next token per row from (B, V) logits: greedy when temperature == 0, else top-k/top-p."""
  if temperature == 0.0:
    return logits_BV.argmax(-1)
  logits = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    # keep the smallest set whose probability reaches top_p (the top token always stays)
    cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(
  jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p')
)
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k, top_p):
  b, t = prompt.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, model.max_len), jnp.int32), decode=True)[
    'cache'
  ]
  logits, updates = model.apply(
    {'params': params, 'cache': cache}, prompt, decode=True, mutable=['cache']
  )
  out = jnp.zeros((b, max_new_tokens), jnp.int32)

  def step(i, carry):
    out, cache, last_logits, rng = carry
    rng, k = jax.random.split(rng)
    token = _sample(last_logits, k, temperature, top_k, top_p).astype(jnp.int32)
    out = out.at[:, i].set(token)
    logits, updates = model.apply(
      {'params': params, 'cache': cache}, token[:, None], decode=True, mutable=['cache']
    )
    return out, updates['cache'], logits[:, -1], rng

  out, _, _, _ = jax.lax.fori_loop(
    0, max_new_tokens, step, (out, updates['cache'], logits[:, -1], rng)
  )
  return out


def generate(
  model, params, prompt, *, max_new_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=0
):
  """Samples continuations with the KV cache, compiled once per (shapes, sampling settings).

  prompt: (B, T) int token ids, 1 <= T and T + max_new_tokens <= model.max_len. temperature 0 is
  greedy; top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of tokens
  whose probability reaches top_p. Deterministic given seed. Returns (B, max_new_tokens) int32.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'prompt must be (batch, length >= 1) token ids, got shape {prompt.shape}')
  if prompt.shape[1] + max_new_tokens > model.max_len:
    raise ValueError(
      f'prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds '
      f'max_len={model.max_len}'
    )
  if prompt.min() < 0 or prompt.max() >= model.vocab_size:
    raise ValueError(
      f'prompt token ids must lie in [0, {model.vocab_size}); got {prompt.min()}..{prompt.max()}'
    )
  return _generate(
    model,
    params,
    jnp.asarray(prompt, jnp.int32),
    jax.random.key(seed),
    max_new_tokens,
    float(temperature),
    int(top_k),
    float(top_p),
  )


# ----------------------------------------------------------------------------------------------
# HuggingFace GPT-2 weights (GPT2Model / GPT2LMHeadModel PyTorch state dicts).
