"""Building blocks whose parameters carry logical axis names.

Logical names used by the MLP/CNN/ResNet families (a config's `sharding_rules` maps them to mesh
axes): 'embed' and 'mlp' (dense in/out features, alternating so consecutive layers shard
column-then-row), 'classes' (output units), 'conv_height'/'conv_width'/'conv_in'/'conv_out'
(convolution kernels), 'norm' (normalisation scales and biases).
"""

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {
  'relu': nn.relu,
  'sigmoid': nn.sigmoid,
  'tanh': nn.tanh,
  'gelu': nn.gelu,
  'silu': nn.silu,
  'identity': lambda x: x,
}


INITIALIZERS = {
  'lecun': nn.initializers.lecun_normal(),
  'he': nn.initializers.he_normal(),
  'glorot': nn.initializers.glorot_normal(),
  'glorot_uniform': nn.initializers.glorot_uniform(),
  'normal': nn.initializers.normal(1e-2),
}


def initializer(name, field='kernel_init'):
  """Kernel initializer by name: lecun (flax default), he, glorot, glorot_uniform (Keras default),
  normal (N(0, 0.01^2), a "plain" small random init)."""
  if name not in INITIALIZERS:
    raise ValueError(f'{field}={name!r} is unknown; known: {", ".join(INITIALIZERS)}')
  return INITIALIZERS[name]


def activation(name, field='activation'):
  """Returns the activation function called `name`; unknown names list the known ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f'{field}={name!r} is unknown; known: {", ".join(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def partitioned(init, names):
  """Wraps an initializer so the parameter carries logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def dense(
  features,
  names,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  kernel_init=nn.initializers.lecun_normal(),
  use_bias=True,
  name=None,
):
  """nn.Dense whose kernel has logical axes `names` (in, out) and bias (out,)."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    use_bias=use_bias,
    kernel_init=partitioned(kernel_init, names),
    bias_init=partitioned(nn.initializers.zeros_init(), names[-1:]),
  )


def conv(
  features,
  kernel_size,
  *,
  strides=1,
  padding='SAME',
  use_bias=True,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  kernel_init=nn.initializers.lecun_normal(),
  name=None,
):
  """nn.Conv (NHWC) with kernel axes ('conv_height', 'conv_width', 'conv_in', 'conv_out')."""
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=padding,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=partitioned(kernel_init, ('conv_height', 'conv_width', 'conv_in', 'conv_out')),
    bias_init=partitioned(nn.initializers.zeros_init(), ('conv_out',)),
  )


def batch_norm(
  train,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  name=None,
  scale_init=nn.initializers.ones_init(),
):
  """nn.BatchNorm (momentum 0.9) with scale/bias on the 'norm' axis; batch statistics when training."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    scale_init=partitioned(scale_init, ('norm',)),
    bias_init=partitioned(nn.initializers.zeros_init(), ('norm',)),
  )


def max_pool_2x2(x_BHWC):
  """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped): (B, H, W, C) -> (B, H/2, W/2, C).

  Same forward result as `nn.max_pool(x, (2, 2), strides=(2, 2))`, written as reshape + max because
  that gradient is far cheaper on XLA:CPU than the select-and-scatter `nn.max_pool` lowers to.
  (The maximum of four strided slices was 2x faster than this alone but made the whole mnist_cnn
  train step 1.16x slower in CPU time; experiments/bench/README.md, issue 19.)
  """
  b, h, w, c = x_BHWC.shape
  x = x_BHWC[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def flatten(x):
  """(B, ...) -> (B, prod(...))."""
  return x.reshape(x.shape[0], -1)
