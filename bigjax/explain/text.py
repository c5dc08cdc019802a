"""Text models (GPT, BERT): per-token attributions on the embeddings, next-token distribution.

Token ids are not differentiable, so the attributions are taken on the token embeddings
(B, T, D) that the model's `embed` module would return (scores.replace_embeddings feeds them in)
and summed over D: integrated gradients from a baseline embedding (zeros, or the pad token's) to
the real ones, and gradient x embedding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from bigjax.explain import integrated
from bigjax.explain.scores import Context, Scorer, input_gradients

TEXT_BASELINES = ('black', 'pad')


def embeddings(variables: Any, tokens_BT: jax.Array) -> jax.Array:
  """(B, T) token ids -> (B, T, D) rows of the model's top-level `embed` table."""
  return jnp.take(variables['params']['embed']['embedding'], tokens_BT, axis=0)


def baseline_embeddings(
  variables: Any, tokens_BT: jax.Array, kind: str, pad_id: int | None
) -> jax.Array:
  """(B, T, D) reference embeddings: 'black' zeros; 'pad' the pad token's embedding everywhere."""
  e = embeddings(variables, tokens_BT)
  if kind == 'pad' and pad_id is not None:
    return jnp.broadcast_to(embeddings(variables, jnp.full_like(tokens_BT, pad_id)), e.shape)
  return jnp.zeros_like(e)


def token_integrated_gradients(
  scorer: Scorer,
  variables: Any,
  tokens_BT: jax.Array,
  target: jax.Array,
  context: Context,
  baseline_BTD: jax.Array,
  steps: int = integrated.DEFAULT_STEPS,
  batch_steps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Integrated gradients on the embeddings: -> ((B, T) per-token attributions (summed over D),
  (B, T, D) per-dimension ones). Completeness: the (B, T) ones sum to f(x) - f(baseline)."""
  x = embeddings(variables, tokens_BT)
  full = integrated.integrated_gradients(
    scorer, variables, x, target, dict(context, tokens=tokens_BT), baseline_BTD, steps, batch_steps
  )
  return full.sum(-1), full


@functools.partial(jax.jit, static_argnames=('scorer',))
def token_gradient_x_input(
  scorer: Scorer, variables: Any, tokens_BT: jax.Array, target: jax.Array, context: Context
) -> jax.Array:
  """Gradient x embedding summed over D: (B, T) tokens -> (B, T) attributions."""
  x = embeddings(variables, tokens_BT)
  g = input_gradients(scorer, variables, x, target, dict(context, tokens=tokens_BT))
  return (g * x).sum(-1)


@functools.partial(jax.jit, static_argnames=('scorer',))
def next_token_distribution(
  scorer: Scorer, variables: Any, tokens_BT: jax.Array, position_B: jax.Array
) -> jax.Array:
  """GPT: (B, T) tokens -> (B, V) probabilities of the token after position_B (B,) int."""
  logits = jnp.asarray(scorer.model.apply(variables, tokens_BT, train=False))
  return jax.nn.softmax(jnp.take_along_axis(logits, position_B[:, None, None], axis=1)[:, 0], -1)
