"""Grad-CAM (Selvaraju et al. 2017) for the convolutional models (bigjax cnn, resnet).

  cam = relu(sum_k alpha_k A_k),  alpha_k = mean over (h, w) of d score / d A_k[h, w]

A = the (B, h, w, K) output of the target layer: by default the last direct child of the model
whose output is a feature map (the CNN's last conv, the ResNet's last block). A and its gradient
come from one `nn.intercept_methods` interceptor that returns A + delta for a zero delta (the
gradient with respect to delta is the gradient with respect to A), so the model is unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.explain.scores import Context, Scorer

MODELS = ('cnn', 'resnet')


def feature_map_layers(model: nn.Module, variables: Any, x: jax.Array) -> list[str]:
  """Names of the model's direct children whose output is a (B, h, w, K) feature map, in call
  order (x: a batch of the model's inputs)."""
  names: list[str] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = tuple(context.module.scope.path)
    if context.method_name == '__call__' and len(path) == 1 and getattr(out, 'ndim', 0) == 4:
      names.append(path[0])
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  return list(dict.fromkeys(names))


def _with_delta(layer: str, delta: jax.Array, store: dict):
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and tuple(context.module.scope.path) == (layer,):
      store['activations'] = out
      return out + delta.astype(out.dtype)
    return out

  return nn.intercept_methods(interceptor)


@functools.partial(jax.jit, static_argnames=('scorer', 'layer'))
def gradcam(
  scorer: Scorer,
  variables: Any,
  x: jax.Array,
  target: jax.Array,
  context: Context,
  layer: str,
) -> jax.Array:
  """Grad-CAM maps at `layer` (a direct child of the model with a (B, h, w, K) output): x (B, H, W, C)
  -> (B, h, w) float32, >= 0, at the layer's resolution (images.upsample brings it to H x W)."""

  def score(delta):
    store: dict = {}
    with _with_delta(layer, delta, store):
      s = scorer(variables, x, target, context).sum()
    return s, store['activations']

  shape = _layer_shape(scorer, variables, x, target, context, layer)
  grads, acts = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float32))
  alphas = grads.mean(axis=(1, 2), keepdims=True)
  return jax.nn.relu((alphas * acts.astype(jnp.float32)).sum(-1))


def _layer_shape(scorer, variables, x, target, context, layer) -> tuple[int, ...]:
  def run(v):
    store: dict = {}
    with _with_delta(layer, jnp.zeros(()), store):
      scorer(v, x, target, context)
    if 'activations' not in store:
      raise UserError(f'--layer={layer!r} is not a direct child of the model with a feature map')
    return store['activations']

  return tuple(jax.eval_shape(run, variables).shape)
