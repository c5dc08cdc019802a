"""What an attribution differentiates: a model's scalar score per example.

A `Scorer` is a frozen (hashable) description of "the score of target t for input x" that every
method in bigjax.explain takes as a static argument, so each jitted method compiles once per model
and input shape, not once per example:

  scorer(variables, x, target, context) -> (B,) float32

- images / tabular (`Scorer(model)`): x (B, ...) float inputs, target (B,) int class; the score is
  the class logit (for a binary model with one output, +logit for class 1 and -logit for class 0).
- text (`Scorer(model, text=True)`): x (B, T, D) float token embeddings, which replace the output
  of the model's top-level `embed` module (through `nn.intercept_methods`, so the model is
  unchanged); context['tokens'] (B, T) int still feeds the rest (padding masks, positions). GPT
  scores the logit of token target at context['position'] (B,) int; BERT head='classify' the class
  logit; BERT head='pretrain' the MLM logit of token target at context['position'].

Attention weights come from the models' own `sow` into the 'attention' collection (mutable only
here), Grad-CAM's activations from an interceptor on the target layer (gradcam.py).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Context = dict[str, jax.Array]


@contextlib.contextmanager
def replace_embeddings(embeddings_BTD: jax.Array):
  """Inside: the top-level `embed` module (an nn.Embed directly under the model) returns
  `embeddings_BTD` instead of looking the tokens up. `embed.attend` (GPT's tied head) is untouched."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == '__call__'
      and isinstance(module, nn.Embed)
      and tuple(module.scope.path) == ('embed',)
    ):
      return embeddings_BTD.astype(module.dtype or jnp.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
  """The differentiable score of a model; see the module docstring.

  model: the run's Linen module. text: x is token embeddings (GPT, BERT) and context['tokens']
  the token ids they replace.
  """

  model: nn.Module
  text: bool = False

  def _key(self) -> tuple:
    # A module built from config.json holds lists (conv_features=[32, 64]), which Linen cannot
    # hash; jit's static arguments need a hash, so the scorer is keyed by its fields' values.
    fields = [
      (f.name, repr(getattr(self.model, f.name)))
      for f in dataclasses.fields(self.model)
      if f.name not in ('parent', 'name')
    ]
    return (type(self.model), tuple(fields), self.text)

  def __hash__(self) -> int:
    return hash(self._key())

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Scorer) and self._key() == other._key()

  def outputs(self, variables: Any, x: jax.Array, context: Context, **apply_kwargs) -> Any:
    """The model's outputs for x (inputs, or embeddings when text); apply_kwargs go to apply."""
    if not self.text:
      return self.model.apply(variables, x, train=False, **apply_kwargs)
    with replace_embeddings(x):
      kwargs: dict[str, Any] = {k: v for k, v in context.items() if k == 'segment_ids'}
      return self.model.apply(variables, context['tokens'], train=False, **kwargs, **apply_kwargs)

  def select(self, out: Any, target: jax.Array, context: Context) -> jax.Array:
    """Model outputs -> (B,) score of `target`."""
    if isinstance(out, dict):  # BERT pretrain: the masked-LM logits
      out = out['mlm_logits']
    if out.ndim == 3:  # (B, T, V): a token's logits at context['position']
      out = jnp.take_along_axis(out, context['position'][:, None, None], axis=1)[:, 0]
    if out.shape[-1] == 1:  # binary: +logit for class 1, -logit for class 0
      return out[:, 0] * (2.0 * target.astype(jnp.float32) - 1.0)
    return jnp.take_along_axis(out, target[:, None].astype(jnp.int32), axis=1)[:, 0]

  def __call__(
    self, variables: Any, x: jax.Array, target: jax.Array, context: Context | None = None
  ) -> jax.Array:
    """(B,) float32 score of `target` (B,) int for x; see the module docstring."""
    context = context or {}
    return self.select(self.outputs(variables, x, context), target, context).astype(jnp.float32)


def input_gradients(
  scorer: Callable, variables: Any, x: jax.Array, target: jax.Array, context: Context
) -> jax.Array:
  """d score_b / d x_b for every example b: x (B, ...) -> (B, ...). Examples are independent
  (eval mode), so the gradient of the summed scores is the per-example gradient."""
  return jax.grad(lambda x: scorer(variables, x, target, context).sum())(x)


@functools.partial(jax.jit, static_argnames=('scorer',))
def predicted_targets(scorer: Scorer, variables: Any, x: jax.Array, context: Context) -> jax.Array:
  """(B,) int: the predicted class (or token at context['position']) of each example."""
  out = scorer.outputs(variables, x, context)
  if isinstance(out, dict):
    out = out['mlm_logits']
  if out.ndim == 3:
    out = jnp.take_along_axis(out, context['position'][:, None, None], axis=1)[:, 0]
  if out.shape[-1] == 1:
    return (out[:, 0] > 0).astype(jnp.int32)
  return out.argmax(-1).astype(jnp.int32)
