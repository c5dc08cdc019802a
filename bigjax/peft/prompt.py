"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
P learned virtual token embeddings in front of the input embeddings, as HF PEFT's PromptTuning
computes them.

The text models' VirtualTokens hook (bigjax/models/virtual_tokens.py) returns cat(prompt, token
embeddings): the virtual rows take positions 0..P-1 and the tokens P.., every token attends to them
(in a causal model the virtual rows see only each other), and their outputs are dropped, so no
loss target falls on them. BERT's pooled representation is the first row's, the first virtual
token's, as in HF PEFT's sequence classification. With a KV cache (generation) the first call
writes the P virtual rows and leaves a 'cache' flag, `prompt_in_cache`; later calls add tokens only.

config.peft.virtual_tokens = P. The embeddings start as N(0, 0.02), the models' own token
embedding init (Lester et al. found embeddings of sampled vocabulary better for T5; here the init
runs before config.init_from loads the base, so there is no trained vocabulary to sample from).
config.peft.target is not used (one prompt per model) and config.peft.dropout must be 0.

Parameters added: virtual_tokens/prompt_embeddings (P, D), logical axes (None, 'embed').
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.models.virtual_tokens import VirtualTokens
from bigjax.peft import common, hf_directory

PARAMS = ('prompt_embeddings',)
FLAG = 'prompt_in_cache'  # the 'cache' variable that says the virtual rows are written


@dataclasses.dataclass(frozen=True)
class Spec:
  """virtual_tokens: P, the number of learned embeddings in front of the tokens."""

  virtual_tokens: int

  def interceptor(self, train: bool):
    del train  # no dropout
    return functools.partial(_intercept, self)

  def describe(self) -> str:
    return f'prompt tuning ({self.virtual_tokens} virtual tokens)'


def check_unused_fields(cfg, what: str) -> None:
  """UserError for config.peft.target or .dropout set beside a method that uses neither (prompt
  and prefix tuning)."""
  from bigjax import config_lib

  if cfg.target != config_lib.base_config().peft.target:
    raise UserError(
      f'config.peft.target={cfg.target!r} is not used by {what}; remove config.peft.target'
    )
  common.refuse_dropout(cfg, what)


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  """config.peft -> Spec (virtual_tokens from config.peft.init_from's adapter when given)."""
  del dense, model
  check_unused_fields(cfg, 'prompt tuning')
  return Spec(hf_directory.settings(cfg).virtual_tokens)


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  found = [v for k, v in flat_params.items() if k.rsplit('/', 1)[-1] == PARAMS[0]]
  if not found:
    raise UserError(
      f'config.peft.method={cfg.method!r} but the parameters hold no {PARAMS[0]}; the run was '
      'not trained with prompt tuning'
    )
  return Spec(int(found[0].shape[0]))


def _intercept(spec: Spec, next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != '__call__' or not isinstance(module, VirtualTokens):
    return next_fun(*args, **kwargs)
  x, _ = next_fun(*args, **kwargs)  # the base's: no virtual rows
  scope = module.scope
  assert scope is not None
  prompt = scope.param(
    PARAMS[0],
    common.boxed(nn.initializers.normal(0.02), (None, 'embed')),
    (spec.virtual_tokens, x.shape[-1]),
    jnp.dtype(module.param_dtype),
  )
  if kwargs.get('decode', False):
    if module.is_initializing() or module.has_variable('cache', FLAG):
      return x, 0  # creating the cache, or the virtual rows are in it already
    scope.put_variable('cache', FLAG, jnp.ones((), bool))
  rows = jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], *prompt.shape))
  return jnp.concatenate([rows, x], axis=1), 0


common.METHODS.add('prompt', sys.modules[__name__])
