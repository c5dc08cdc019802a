"""Attention maps per layer and head, and attention rollout (Abnar & Zuidema 2020).

The attention layers sow their probabilities into the 'attention' collection
(bigjax/models/attention/layer.py); it is made mutable only here, so training neither computes
nor stores them.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp

from bigjax.explain.scores import Context, Scorer


def _layer_order(path: tuple[str, ...]) -> tuple:
  return tuple(int(p[6:]) if re.fullmatch(r'layer_\d+', p) else p for p in path)


@functools.partial(jax.jit, static_argnames=('scorer',))
def attention_maps(scorer: Scorer, variables: Any, x: jax.Array, context: Context) -> jax.Array:
  """Self-attention probabilities of every layer: x (B, ...) model inputs (images, or the token
  ids when the scorer is a text one; context as for the scorer) -> (B, L, N, T, S) float32, rows
  summing to 1 (L layers in order, N heads, T queries, S keys)."""
  variables = {k: v for k, v in variables.items() if k != 'attention'}
  if scorer.text:
    kwargs: dict[str, Any] = {k: v for k, v in context.items() if k == 'segment_ids'}
    _, state = scorer.model.apply(variables, x, train=False, mutable=['attention'], **kwargs)
  else:
    _, state = scorer.model.apply(variables, x, train=False, mutable=['attention'])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get('attention', {})))
  if not flat:
    raise ValueError('the model sowed no attention weights (it has no attention layers)')
  layers = []
  for path in sorted(flat, key=_layer_order):
    (w,) = flat[path]
    layers.append(w if w.ndim == 5 else w[None])  # nn.scan stacks layers on a leading axis
  return jnp.concatenate(layers, axis=0).transpose(1, 0, 2, 3, 4)


def rollout(maps_BLNTT: jax.Array, residual: float = 0.5) -> jax.Array:
  """Attention rollout: maps (B, L, N, T, T) -> (B, T, T), how much each token's final state draws
  on each input token. Each layer's head-mean A is mixed with the residual connection,
  residual * I + (1 - residual) * A (rows renormalised), and the layers are multiplied, last on
  the left. With one layer it is that layer's residual-mixed map."""
  mean = maps_BLNTT.mean(axis=2)
  eye = jnp.eye(mean.shape[-1], dtype=mean.dtype)
  mixed = residual * eye + (1.0 - residual) * mean
  mixed = mixed / mixed.sum(-1, keepdims=True)
  out = mixed[:, 0]
  for layer in range(1, mixed.shape[1]):
    out = mixed[:, layer] @ out
  return out
