"""Multi-layer perceptron over flattened inputs."""

from collections.abc import Sequence
from typing import ClassVar

import chex
import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers


class Model(nn.Module):
  """MLP: (B, ...) inputs, flattened -> hidden Dense+activation layers -> (B, num_outputs).

  hidden: widths of the hidden layers. activation: relu | sigmoid | tanh | gelu | silu.
  output_activation: applied to the output (None = logits; leave None for classification, the task
  applies softmax/sigmoid inside its loss). kernel_init: kernel initializer (see
  layers.INITIALIZERS). norm: 'none' (or None) or 'layernorm' after each hidden Dense. dropout: rate
  after each hidden activation.
  """

  # Fields that build() fills from the data (DataInfo attribute or the task's output_size);
  # configs do not set them.
  data_fields: ClassVar[dict[str, str]] = {'num_outputs': 'output_size'}
  hidden: Sequence[int] = (128,)
  num_outputs: int = 10
  activation: str = 'relu'
  output_activation: str | None = None
  kernel_init: str = 'lecun'
  norm: str | None = None
  dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, *, train=False):
    chex.assert_rank(x, {2, 3, 4})
    if self.norm not in (None, '', 'none', 'layernorm'):
      raise ValueError(f"norm={self.norm!r} is unknown; use 'none' or 'layernorm'")
    act = layers.activation(self.activation)
    kw = dict(
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      kernel_init=layers.initializer(self.kernel_init),
    )
    x = layers.flatten(x).astype(kw['dtype'])
    names = ('embed', 'mlp')
    for i, width in enumerate(self.hidden):
      x = layers.dense(width, names, name=f'hidden_{i}', **kw)(x)
      if self.norm == 'layernorm':
        x = nn.LayerNorm(
          dtype=kw['dtype'],
          param_dtype=kw['param_dtype'],
          scale_init=layers.partitioned(nn.initializers.ones_init(), ('norm',)),
          bias_init=layers.partitioned(nn.initializers.zeros_init(), ('norm',)),
        )(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(act(x))
      names = names[::-1]
    x = layers.dense(self.num_outputs, (names[0], 'classes'), name='output', **kw)(x)
    if self.output_activation:
      x = layers.activation(self.output_activation, 'output_activation')(x)
    return x.astype(jnp.float32)
