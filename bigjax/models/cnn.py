"""Configurable conv net; the defaults are the classic Keras MNIST CNN.

Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, 3x3 VALID convs, ReLU, 2x2 max-pools.
"""

from collections.abc import Sequence
from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers


class Model(nn.Module):
  """CNN: (B, H, W, C) float images -> (B, num_classes) logits.

  conv_features[i] channels per conv layer, followed by a 2x2 max-pool where pool_after[i];
  dense_features hidden widths before the classifier. batch_norm after each conv, dropout after each
  hidden dense layer. kernel_init: kernel initializer (see layers.INITIALIZERS).
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'num_classes': 'output_size'}
  conv_features: Sequence[int] = (32, 64, 64)
  pool_after: Sequence[bool] = (True, True, False)
  dense_features: Sequence[int] = (64,)
  num_classes: int = 10
  kernel_size: int = 3
  padding: str = 'VALID'
  batch_norm: bool = False
  dropout: float = 0.0
  kernel_init: str = 'lecun'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, *, train=False):
    chex.assert_rank(x, 4)
    if len(self.pool_after) != len(self.conv_features):
      raise ValueError(
        f'pool_after has {len(self.pool_after)} entries but '
        f'conv_features has {len(self.conv_features)}; give one per conv layer'
      )
    kw = dict(
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      kernel_init=layers.initializer(self.kernel_init),
    )
    x = x.astype(kw['dtype'])
    for i, (features, pool) in enumerate(zip(self.conv_features, self.pool_after)):
      x = layers.conv(
        features,
        self.kernel_size,
        padding=self.padding,
        use_bias=not self.batch_norm,
        name=f'conv_{i}',
        **kw,
      )(x)
      if self.batch_norm:
        x = layers.batch_norm(
          train, name=f'bn_{i}', dtype=kw['dtype'], param_dtype=kw['param_dtype']
        )(x)
      x = nn.relu(x)
      if pool:
        x = layers.max_pool_2x2(x)
    x = layers.flatten(x)
    names = ('embed', 'mlp')
    for i, features in enumerate(self.dense_features):
      x = nn.relu(layers.dense(features, names, name=f'dense_{i}', **kw)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      names = names[::-1]
    x = layers.dense(self.num_classes, (names[0], 'classes'), name='output', **kw)(x)
    return x.astype(jnp.float32)
