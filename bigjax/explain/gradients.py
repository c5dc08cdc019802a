"""Gradient attributions: saliency, gradient x input, SmoothGrad, guided backprop.

Each is one jitted function of (scorer, variables, x (B, ...), target (B,), context) -> (B, ...)
with the scorer static: a batch of any size compiles once per shape. SmoothGrad's noise samples
are a `jax.lax.map` (vmapped in chunks of `batch_samples`) over the samples, inside the same jit.
PAIR's `saliency` library computes the same quantities one framework-agnostic callback at a time
(a Python loop over samples and examples); a few lines of jax give the batched, jitted, sharded
version, so it is not a dependency.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.explain.scores import Context, Scorer, input_gradients


@functools.partial(jax.jit, static_argnames=('scorer',))
def saliency(
  scorer: Scorer, variables: Any, x: jax.Array, target: jax.Array, context: Context
) -> jax.Array:
  """Vanilla gradient (Simonyan et al. 2014): d score / d x, x (B, ...) -> (B, ...) float32."""
  return input_gradients(scorer, variables, x, target, context)


@functools.partial(jax.jit, static_argnames=('scorer',))
def gradient_x_input(
  scorer: Scorer, variables: Any, x: jax.Array, target: jax.Array, context: Context
) -> jax.Array:
  """Gradient times input (Shrikumar et al. 2016): x * d score / d x, (B, ...) -> (B, ...)."""
  return x * input_gradients(scorer, variables, x, target, context)


@functools.partial(jax.jit, static_argnames=('scorer', 'num_samples', 'batch_samples'))
def smoothgrad(
  scorer: Scorer,
  variables: Any,
  x: jax.Array,
  target: jax.Array,
  context: Context,
  rng: jax.Array,
  noise_level: float | jax.Array = 0.15,
  num_samples: int = 32,
  batch_samples: int | None = None,
) -> jax.Array:
  """SmoothGrad (Smilkov et al. 2017): the mean gradient over x + N(0, sigma^2) noise.

  x (B, ...); sigma = noise_level * (max(x_b) - min(x_b)) per example (the paper's 10-20%);
  num_samples noisy copies per example, evaluated batch_samples at a time (None = all at once).
  noise_level 0 gives exactly the vanilla gradient. Returns (B, ...) float32.
  """
  axes = tuple(range(1, x.ndim))
  span = (x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)).astype(jnp.float32)
  sigma = noise_level * span
  keys = jax.random.split(rng, num_samples)

  def one(key):
    noisy = x + sigma * jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
    return input_gradients(scorer, variables, noisy, target, context)

  grads = jax.lax.map(one, keys, batch_size=batch_samples)
  return grads.mean(axis=0)


@jax.custom_vjp
def _positive_gradient(x):
  return x


def _positive_gradient_fwd(x):
  return x, None


def _positive_gradient_bwd(_, g):
  return (jnp.maximum(g, 0),)


_positive_gradient.defvjp(_positive_gradient_fwd, _positive_gradient_bwd)


def _guided_interceptor(next_fun, args, kwargs, context):
  """Clamps the gradient flowing back into every hidden Conv/Dense output at 0. In a network
  where each of these feeds a ReLU, ReLU's backward (pass where the input > 0) followed by the
  clamp (pass where the gradient > 0) is guided backprop's rule (Springenberg et al. 2015)."""
  out = next_fun(*args, **kwargs)
  module = context.module
  if (
    context.method_name == '__call__'
    and isinstance(module, nn.Conv | nn.Dense)
    and tuple(module.scope.path) != ('output',)
  ):
    return _positive_gradient(out)
  return out


@functools.partial(jax.jit, static_argnames=('scorer',))
def guided_backprop(
  scorer: Scorer, variables: Any, x: jax.Array, target: jax.Array, context: Context
) -> jax.Array:
  """Guided backpropagation: the gradient with negative gradients zeroed at every ReLU on the way
  back; x (B, ...) -> (B, ...). For the bigjax CNN (batch_norm=False, every hidden Conv/Dense
  followed by a ReLU); Adebayo et al. (2018) show it barely depends on the weights."""
  with nn.intercept_methods(_guided_interceptor):
    return input_gradients(scorer, variables, x, target, context)
