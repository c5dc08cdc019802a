"""ResNet-18/34/50 (He et al. 2016) with CIFAR (3x3 stem) or ImageNet (7x7/2 + max-pool) stems."""

from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers

STAGES = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
}


class Block(nn.Module):
  """Residual block: (B, H, W, Cin) -> (B, H/strides, W/strides, features * expansion)."""

  kind: str
  features: int
  strides: int
  train: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name, **k: layers.batch_norm(self.train, name=name, **kw, **k)
    if self.kind == 'basic':
      plan = [(self.features, 3, self.strides), (self.features, 3, 1)]
      out_features = self.features
    else:
      plan = [(self.features, 1, 1), (self.features, 3, self.strides), (4 * self.features, 1, 1)]
      out_features = 4 * self.features
    y = x
    for i, (features, k, s) in enumerate(plan):
      y = layers.conv(features, k, strides=s, use_bias=False, name=f'conv_{i}', **kw)(y)
      last = i == len(plan) - 1  # zero-init the last norm: each block starts as the identity
      y = norm(f'bn_{i}', **({'scale_init': nn.initializers.zeros_init()} if last else {}))(y)
      if not last:
        y = nn.relu(y)
    if x.shape[-1] != out_features or self.strides != 1:
      x = layers.conv(out_features, 1, strides=self.strides, use_bias=False, name='proj', **kw)(x)
      x = norm('proj_bn')(x)
    return nn.relu(x + y)


class Model(nn.Module):
  """ResNet: (B, H, W, C) float images -> (B, num_classes) logits.

  depth: 18, 34 or 50. stem: 'cifar' (3x3 conv, stride 1, no pool; for 32x32 inputs) or 'imagenet'
  (7x7 conv stride 2 + 3x3 max-pool stride 2). width: channels of the first stage.
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'num_classes': 'output_size'}
  depth: int = 18
  num_classes: int = 10
  stem: str = 'cifar'
  width: int = 64
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, *, train=False):
    chex.assert_rank(x, 4)
    if self.depth not in STAGES:
      raise ValueError(f'depth={self.depth} is unsupported; use one of {sorted(STAGES)}')
    if self.stem not in ('cifar', 'imagenet'):
      raise ValueError(f"stem={self.stem!r} is unknown; use 'cifar' or 'imagenet'")
    kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    kind, blocks = STAGES[self.depth]
    x = x.astype(kw['dtype'])
    if self.stem == 'cifar':
      x = layers.conv(self.width, 3, use_bias=False, name='stem', **kw)(x)
    else:
      x = layers.conv(self.width, 7, strides=2, use_bias=False, name='stem', **kw)(x)
    x = nn.relu(layers.batch_norm(train, name='stem_bn', **kw)(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, n in enumerate(blocks):
      for b in range(n):
        strides = 2 if stage > 0 and b == 0 else 1
        x = Block(kind, self.width * 2**stage, strides, train, name=f'stage{stage}_block{b}', **kw)(
          x
        )
    x = x.mean(axis=(1, 2))
    x = layers.dense(self.num_classes, ('embed', 'classes'), name='output', **kw)(x)
    return x.astype(jnp.float32)
