"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token or mean pooling."""

from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import attention, layers, transformer


class Model(nn.Module):
  """ViT: images (B, H, W, C) float -> (B, num_classes) logits.

  patch_size P must divide H and W; the (H/P)(W/P) patches are embedded by a PxP stride-P conv.
  pool: 'cls' (a learned class token, its final state classifies) or 'mean' (mean over patches).
  Pre-LN blocks, learned position embeddings. mlp_dim 0 means 4 * embed_dim.
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'num_classes': 'output_size'}
  patch_size: int = 4
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 0
  num_classes: int = 10
  pool: str = 'cls'
  dropout: float = 0.0
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, *, train=False):
    chex.assert_rank(x, 4)
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'patch_size={p} does not divide the {h}x{w} images')
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"pool={self.pool!r} is unknown; use 'cls' or 'mean'")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    x = layers.conv(
      self.embed_dim,
      p,
      strides=p,
      padding='VALID',
      dtype=dtype,
      param_dtype=param_dtype,
      name='patch_embed',
    )(x.astype(dtype))
    x = x.reshape(b, -1, self.embed_dim)
    if self.pool == 'cls':
      cls = self.param(
        'cls',
        layers.partitioned(nn.initializers.zeros_init(), ('length', 'embed')),
        (1, self.embed_dim),
        param_dtype,
      )
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, self.embed_dim)), x], 1)
    n = x.shape[1]
    x = x + attention.LearnedPositions(
      n, self.embed_dim, self.dtype, self.param_dtype, name='position_embed'
    )(jnp.broadcast_to(jnp.arange(n), (b, n)))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = transformer.encoder_stack(self, dtype, param_dtype, pre_ln=True)(x, train=train)
    x = x[:, 0] if self.pool == 'cls' else x.mean(1)
    return layers.dense(
      self.num_classes, ('embed', 'classes'), name='head', dtype=dtype, param_dtype=param_dtype
    )(x).astype(jnp.float32)

  @nn.nowrap
  def transformer_shape(self, input_shape: tuple[int, ...]) -> tuple[str, int, int, int, int]:
    """('vit', L, T, d, patches) for one image (H, W, C): T = patches (+ 1 class token)."""
    patches = (input_shape[0] // self.patch_size) * (input_shape[1] // self.patch_size)
    return 'vit', self.num_layers, patches + int(self.pool == 'cls'), self.embed_dim, patches

  @nn.nowrap
  def train_flops_per_example(self, params, input_shape: tuple[int, ...]) -> int:
    """Analytic training FLOPs of one image (H, W, C) (bigjax.flops conventions): 6 * N * T
    + 12 * L * T^2 * d over the T tokens, plus the patch embedding 6 * params once per patch and
    the head 6 * params once per image."""
    from bigjax.flops import counting  # pylint: disable=import-outside-toplevel

    _, num_layers, t, d, patches = self.transformer_shape(input_shape)
    return counting.transformer_train_flops(
      params,
      num_layers=num_layers,
      seq_len=t,
      embed_dim=d,
      patches=patches,
      per_patch=('patch_embed',),
      per_example=counting.PER_EXAMPLE_HEADS,
    )
