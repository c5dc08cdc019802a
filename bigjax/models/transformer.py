"""Transformer blocks and stacks shared by GPT, BERT and ViT.

Block: self-attention [+ cross-attention] + MLP, each a residual sublayer, pre-LN or post-LN,
LayerNorm or RMSNorm, GELU / ReLU / SwiGLU MLP, dropout. Stack: num_layers blocks, optionally under
`nn.scan` (parameters stacked on a leading 'layers' axis; compile time flat in depth) and a remat
policy ('none' | 'dots' | 'full'). Logical axes: 'embed', 'mlp', 'heads', 'kv_heads', 'kv',
'layers', 'norm'.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.models import attention, layers

REMAT_POLICIES = {
  'none': None,
  'full': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def norm(kind, eps, dtype, param_dtype, name=None):
  """LayerNorm or RMSNorm over the last axis with scale (and bias) on the 'norm' axis."""
  ones = layers.partitioned(nn.initializers.ones_init(), ('norm',))
  if kind == 'layernorm':
    return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      scale_init=ones,
      bias_init=layers.partitioned(nn.initializers.zeros_init(), ('norm',)),
    )
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name, scale_init=ones)
  raise ValueError(f"norm={kind!r} is unknown; use 'layernorm' or 'rmsnorm'")


class Mlp(nn.Module):
  """(B, T, D) -> (B, T, D): Dense(mlp_dim) + activation [* gate] -> dropout -> Dense(D).

  activation: 'gelu' (tanh approximation, GPT-2), 'gelu_exact' (erf, BERT), 'relu' or 'swiglu'
  (silu(x W_gate) * x W_up, no biases).
  """

  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    d = x.shape[-1]
    kw = dict(
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(0.02),
      use_bias=self.use_bias,
    )
    acts = {'gelu': nn.gelu, 'gelu_exact': lambda h: nn.gelu(h, approximate=False), 'relu': nn.relu}
    if self.activation == 'swiglu':
      kw['use_bias'] = False
      gate = layers.dense(self.mlp_dim, ('embed', 'mlp'), name='wi_gate', **kw)
      up = layers.dense(self.mlp_dim, ('embed', 'mlp'), name='wi_up', **kw)
      h = nn.silu(gate(x)) * up(x)
    elif self.activation in acts:
      h = acts[self.activation](layers.dense(self.mlp_dim, ('embed', 'mlp'), name='wi', **kw)(x))
    else:
      raise ValueError(
        f'activation={self.activation!r} is unknown; use one of {", ".join([*acts, "swiglu"])}'
      )
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return layers.dense(d, ('mlp', 'embed'), name='wo', **kw)(h)


class Block(nn.Module):
  """One transformer layer: x (B, T, D) -> (B, T, D).

  causal: self-attention sees only earlier positions. cross_attention: adds an attention sublayer
  over `context` (B, S, D) (encoder-decoder). pre_ln: normalise each sublayer's input (GPT-2,
  ViT) rather than its residual sum (original Transformer, BERT). train/decode are fields so the
  block can be scanned. When `scanned`, returns (x, None) as nn.scan requires.
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  pre_ln: bool = True
  causal: bool = False
  cross_attention: bool = False
  rotary: bool = False
  attention: str = 'xla'
  use_bias: bool = True
  max_decode_length: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  train: bool = False
  decode: bool = False
  scanned: bool = False

  def _attention(self, name, causal):
    return attention.MultiHeadAttention(
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      num_kv_heads=self.num_kv_heads,
      dropout_rate=self.attention_dropout_rate,
      use_bias=self.use_bias,
      rotary=self.rotary,
      attention=self.attention,
      causal=causal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      max_decode_length=self.max_decode_length,
      name=name,
    )

  @nn.compact
  def __call__(self, x, mask=None, positions=None, context=None, context_mask=None):
    dropout = nn.Dropout(self.dropout_rate, deterministic=not self.train)
    make_norm = lambda name: norm(self.norm, self.norm_eps, self.dtype, self.param_dtype, name)

    def sublayer(x, fn, name):
      if self.pre_ln:
        return x + dropout(fn(make_norm(f'{name}_norm')(x)))
      return make_norm(f'{name}_norm')(x + dropout(fn(x)))

    x = sublayer(
      x,
      lambda h: self._attention('self_attention', self.causal)(
        h, mask=mask, positions_BT=positions, train=self.train, decode=self.decode
      ),
      'attention',
    )
    if self.cross_attention:
      x = sublayer(
        x,
        lambda h: self._attention('cross_attention', False)(
          h, context, mask=context_mask, train=self.train
        ),
        'cross',
      )
    x = sublayer(
      x,
      lambda h: Mlp(
        self.mlp_dim,
        self.activation,
        self.dropout_rate,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='mlp',
      )(h, train=self.train),
      'mlp',
    )
    return (x, None) if self.scanned else x


class Stack(nn.Module):
  """num_layers Blocks built from `block` (a dict of Block fields): x (B, T, D) -> (B, T, D).

  scan: one scanned Block whose params have a leading 'layers' axis (L, ...). remat: 'none' |
  'dots' (save matmul outputs, recompute the rest in the backward pass) | 'full' (save only the
  block inputs). A final norm follows when the blocks are pre-LN.
  """

  num_layers: int
  block: Any
  scan: bool = False
  remat: str = 'none'

  @nn.compact
  def __call__(
    self,
    x,
    mask=None,
    positions=None,
    context=None,
    context_mask=None,
    *,
    train=False,
    decode=False,
  ):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r} is unknown; use one of {", ".join(REMAT_POLICIES)}')
    cls = Block
    if self.remat != 'none':
      cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    kwargs = dict(self.block, train=train, decode=decode)
    if self.scan:
      scanned = nn.scan(
        cls,
        variable_axes={'params': 0, 'cache': 0, 'attention': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast,) * 4,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = scanned(**kwargs, scanned=True, name='layers')(
        x, mask, positions, context, context_mask
      )
    else:
      for i in range(self.num_layers):
        x = cls(**kwargs, name=f'layer_{i}')(x, mask, positions, context, context_mask)
    if self.block.get('pre_ln', True):
      x = norm(
        self.block.get('norm', 'layernorm'),
        self.block.get('norm_eps', 1e-5),
        self.block.get('dtype', jnp.float32),
        self.block.get('param_dtype', jnp.float32),
        'final_norm',
      )(x)
    return x


def encoder_stack(model: nn.Module, dtype, param_dtype, **block: Any) -> Stack:
  """The Stack of a GPT/BERT/ViT-style `model` from its own num_layers, scan, remat, num_heads,
  embed_dim, mlp_dim (0 = 4 * embed_dim), dropout and attention fields; `block` adds or overrides
  Block fields (norm, causal, rotary, ...)."""
  return Stack(
    model.num_layers,
    scan=model.scan,
    remat=model.remat,
    name='stack',
    block=dict(
      num_heads=model.num_heads,
      head_dim=model.embed_dim // model.num_heads,
      mlp_dim=model.mlp_dim or 4 * model.embed_dim,
      dropout_rate=model.dropout,
      attention=model.attention,
      dtype=dtype,
      param_dtype=param_dtype,
      **block,
    ),
  )
