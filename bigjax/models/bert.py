"""BERT-style encoder: token + position + segment embeddings, post-LN encoder stack, tied MLM head,
next-sentence head, pooled classification head (HuggingFace BERT import:
bigjax/models/hf/bert.py).
"""

from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import attention, layers, transformer, virtual_tokens


class Model(nn.Module):
  """BERT: tokens (B, T) int [, segment_ids (B, T)] -> outputs of `head`.

  head='pretrain': {'mlm_logits': (B, T, vocab_size), 'nsp_logits': (B, 2)} (float32).
  head='classify': (B, num_classes) logits from the pooled [CLS] representation.
  Tokens equal to pad_id are masked out of attention. mlp_dim 0 means 4 * embed_dim.
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {
    'vocab_size': 'vocab_size',
    'pad_id': 'pad_id',
    'num_classes': 'output_size',
  }
  vocab_size: int = 260
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 256
  mlp_dim: int = 0
  max_len: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1
  head: str = 'pretrain'
  num_classes: int = 2
  pad_id: int = 256
  activation: str = 'gelu_exact'
  norm_eps: float = 1e-12
  pre_ln: bool = False
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'
  num_kv_heads: int | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, inputs, segment_ids=None, *, train=False):
    chex.assert_rank(inputs, 2)
    b, t = inputs.shape
    if t > self.max_len:
      raise ValueError(
        f'sequence length {t} exceeds max_len={self.max_len}; shorten the '
        'sequences or raise max_len'
      )
    if self.head not in ('pretrain', 'classify'):
      raise ValueError(f"head={self.head!r} is unknown; use 'pretrain' or 'classify'")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    init = nn.initializers.normal(0.02)
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init)
    embed = nn.Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=layers.partitioned(init, ('vocab', 'embed')),
      name='embed',
    )
    segment_ids = jnp.zeros_like(inputs) if segment_ids is None else segment_ids
    # Virtual positions in front (prompt / prefix tuning, bigjax/models/virtual_tokens.py): R
    # prepended rows (segment 0, always attended), the tokens from position offset + R on.
    x, offset = virtual_tokens.VirtualTokens(self.param_dtype, name='virtual_tokens')(embed(inputs))
    prepended = x.shape[1] - t
    if offset + x.shape[1] > self.max_len:
      raise ValueError(
        f'max_len={self.max_len} is less than the sequence length {t} plus '
        f'{offset + prepended} virtual tokens (prompt / prefix tuning); shorten the sequences '
        'or raise max_len'
      )
    positions = virtual_tokens.row_positions(
      jnp.broadcast_to(jnp.arange(t), (b, t)), prepended, offset
    )
    segment_ids = jnp.pad(segment_ids, ((0, 0), (prepended, 0)))
    valid = jnp.pad(inputs != self.pad_id, ((0, 0), (prepended, 0)), constant_values=True)
    x = (
      x
      + attention.LearnedPositions(
        self.max_len, self.embed_dim, self.dtype, self.param_dtype, name='position_embed'
      )(positions)
      + nn.Embed(
        self.type_vocab_size,
        self.embed_dim,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=layers.partitioned(init, ('segments', 'embed')),
        name='segment_embed',
      )(segment_ids)
    )
    x = transformer.norm('layernorm', self.norm_eps, dtype, param_dtype, 'embed_norm')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = attention.padding_mask(valid)
    x = transformer.encoder_stack(
      self,
      dtype,
      param_dtype,
      num_kv_heads=self.num_kv_heads,
      activation=self.activation,
      attention_dropout_rate=self.dropout,
      norm='layernorm',
      norm_eps=self.norm_eps,
      pre_ln=self.pre_ln,
    )(x, mask, train=train)
    # The first row's representation (under prompt tuning, as in HF PEFT, the first virtual one's)
    pooled = nn.tanh(layers.dense(self.embed_dim, ('embed', 'mlp'), name='pooler', **kw)(x[:, 0]))
    x = x[:, prepended:]  # the per-token outputs leave the virtual rows out
    if self.head == 'classify':
      pooled = nn.Dropout(self.dropout)(pooled, deterministic=not train)
      return layers.dense(self.num_classes, ('mlp', 'classes'), name='classifier', **kw)(
        pooled
      ).astype(jnp.float32)
    h = layers.dense(self.embed_dim, ('embed', 'mlp'), name='mlm_dense', **kw)(x)
    h = transformer.norm('layernorm', self.norm_eps, dtype, param_dtype, 'mlm_norm')(
      nn.gelu(h, approximate=False)
    )
    mlm_bias = self.param(
      'mlm_bias',
      layers.partitioned(nn.initializers.zeros_init(), ('vocab',)),
      (self.vocab_size,),
      param_dtype,
    )
    mlm_logits = embed.attend(h) + mlm_bias
    nsp_logits = layers.dense(2, ('mlp', 'classes'), name='nsp', **kw)(pooled)
    return {
      'mlm_logits': mlm_logits.astype(jnp.float32),
      'nsp_logits': nsp_logits.astype(jnp.float32),
    }

  @nn.nowrap
  def transformer_shape(self, input_shape: tuple[int, ...]) -> tuple[str, int, int, int, int]:
    """('bert', L, T, d, 0) for one example's tokens of shape (T,) (see bigjax.flops)."""
    return 'bert', self.num_layers, int(input_shape[0]), self.embed_dim, 0

  @nn.nowrap
  def train_flops_per_example(self, params, input_shape: tuple[int, ...]) -> int:
    """Analytic training FLOPs of one example of tokens (T,) (bigjax.flops conventions): 6 * N * T
    + 12 * L * T^2 * d, N leaving out lookup tables (and the token embedding when head='classify'
    does not reuse it); pooler, classifier and NSP head count 6 * params once per example."""
    from bigjax.flops import counting  # pylint: disable=import-outside-toplevel

    _, num_layers, t, d, _ = self.transformer_shape(input_shape)
    lookup = counting.LOOKUP_TABLES + (('embed',) if self.head == 'classify' else ())
    return counting.transformer_train_flops(
      params,
      num_layers=num_layers,
      seq_len=t,
      embed_dim=d,
      lookup=lookup,
      per_example=counting.PER_EXAMPLE_HEADS,
    )
