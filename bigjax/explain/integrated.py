"""Integrated gradients (Sundararajan et al. 2017) and its baselines.

  attributions = (x - x') * mean_k grad f(x' + a_k (x - x')),   a_k = (k + 1/2) / steps

(the midpoint Riemann sum of the path integral). Completeness: attributions sum to
f(x) - f(x') up to the sum's error, which `completeness_gap` reports; tests hold it within 1% at
the default steps for the MLP, the CNN and the GPT. The steps are a `jax.lax.map` vmapped in
chunks of `batch_steps` inside one jit, so a batch of any size compiles once per shape.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.explain.scores import Context, Scorer, input_gradients

BASELINES = ('black', 'blurred', 'noise')
DEFAULT_STEPS = 128  # max error 0.4% on the breast-cancer MLP's test split (64 steps: 1.1%)


def gaussian_blur(images_BHWC: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of (B, H, W, C) images, kernel radius 3 sigma, edges reflected."""
  radius = max(1, int(3 * sigma + 0.5))
  taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
  taps = taps / taps.sum()
  x = images_BHWC.astype(jnp.float32)
  for axis in (1, 2):
    r = min(radius, x.shape[axis] - 1)
    pad = [(0, 0)] * 4
    pad[axis] = (r, r)
    padded = jnp.pad(x, pad, mode='reflect')
    kernel = taps[radius - r : radius + r + 1]
    out = jnp.zeros_like(x)
    for i in range(2 * r + 1):
      out = out + kernel[i] * jax.lax.slice_in_dim(padded, i, i + x.shape[axis], axis=axis)
    x = out
  return x.astype(images_BHWC.dtype)


def make_baseline(
  x: jax.Array, kind: str = 'black', *, rng: jax.Array | None = None, blur_sigma: float = 5.0
) -> jax.Array:
  """The reference input x' of integrated gradients, shape and dtype of x (B, ...).

  'black': zeros (a black image; the training mean for standardised features; a zero embedding).
  'blurred': x under a Gaussian blur of blur_sigma pixels (images (B, H, W, C) only).
  'noise': uniform noise over each example's value range (seeded by rng).
  """
  if kind == 'black':
    return jnp.zeros_like(x)
  if kind == 'blurred':
    if x.ndim != 4:
      raise UserError(
        f'--baseline=blurred needs images (B, H, W, C), not inputs of shape {tuple(x.shape)}; '
        'use --baseline=black or noise'
      )
    return gaussian_blur(x, blur_sigma)
  if kind == 'noise':
    axes = tuple(range(1, x.ndim))
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    rng = jax.random.key(0) if rng is None else rng
    return (lo + (hi - lo) * jax.random.uniform(rng, x.shape)).astype(x.dtype)
  raise UserError(f'--baseline={kind!r} is unknown; use one of {", ".join(BASELINES)}')


@functools.partial(jax.jit, static_argnames=('scorer', 'steps', 'batch_steps'))
def integrated_gradients(
  scorer: Scorer,
  variables: Any,
  x: jax.Array,
  target: jax.Array,
  context: Context,
  baseline: jax.Array,
  steps: int = DEFAULT_STEPS,
  batch_steps: int | None = None,
) -> jax.Array:
  """Integrated gradients of score(target) from `baseline` to x, both (B, ...) -> (B, ...) float32.

  steps: points of the midpoint Riemann sum; batch_steps: how many are evaluated at once (vmap
  width; None = all), which bounds memory at steps * B examples.
  """
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  delta = (x - baseline).astype(jnp.float32)

  def at(alpha):
    return input_gradients(scorer, variables, baseline + alpha * delta, target, context)

  mean_grad = jax.lax.map(at, alphas, batch_size=batch_steps).mean(axis=0)
  return delta * mean_grad


def completeness_gap(
  scorer: Scorer,
  variables: Any,
  x: jax.Array,
  target: jax.Array,
  context: Context,
  baseline: jax.Array,
  attributions: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(sum of attributions (B,), f(x) - f(baseline) (B,)): equal for exact integrated gradients."""
  total = attributions.reshape(attributions.shape[0], -1).sum(-1)
  diff = scorer(variables, x, target, context) - scorer(variables, baseline, target, context)
  return total, diff
