"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): P learned keys and values in front of every self-attention layer's, as HF PEFT's
PrefixTuning computes them without its reparameterization (prefix_projection=False, PEFT's
default; the MLP Li & Liang train through is not implemented: it is a training-time device and
folds into the prefixes afterwards).

The interceptor makes each self-attention layer's key and value projections return P learned rows
in front of the tokens' ((B, P + T, K, H): grouped-query models learn K heads, as PEFT does); the
attention layers put them before the tokens' keys and values after rotary positions and the KV
cache (bigjax/models/virtual_tokens.py: prefix keys are not rotated, as PEFT's cached ones are
not, and not cached: every call attends them), and every query attends them. The text models'
VirtualTokens hook returns offset P, so the tokens take positions P.. (PEFT passes the prefix as a
P-long KV cache, which shifts positions the same way). Nothing is prepended to the model's rows:
outputs, loss targets and BERT's pooled [CLS] are the tokens' own.

config.peft.virtual_tokens = P. Prefixes start as N(0, 0.02), the scale of the models' own
initialisation (so the base is not an exact no-op at step 0: the prefix takes attention weight).
config.peft.target is not used (every self-attention layer) and config.peft.dropout must be 0.

Parameters added to each self-attention key and value module: prefix (P, K, H), logical axes
(None, 'kv_heads', 'kv') like the projection's output (sharded as its kernel's heads).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.models.virtual_tokens import VirtualTokens
from bigjax.peft import common, hf_directory, prompt
from bigjax.peft.lora import contracted_axes

PARAMS = ('prefix',)
KEY_VALUE = re.compile(r'(^|/)self_attention/(key|value)$')  # the projections that get prefixes


@dataclasses.dataclass(frozen=True)
class Spec:
  """targets: the key and value module paths; virtual_tokens: P."""

  targets: frozenset[str]
  virtual_tokens: int

  def interceptor(self, train: bool):
    del train  # no dropout
    return functools.partial(_intercept, self)

  def describe(self) -> str:
    layers = len(self.targets) // 2
    return f'prefix tuning ({self.virtual_tokens} virtual keys/values in {layers} attention layers)'


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  """config.peft -> Spec over every self-attention key and value projection (virtual_tokens from
  config.peft.init_from's adapter when given)."""
  prompt.check_unused_fields(cfg, 'prefix tuning')
  targets = frozenset(m for m in dense if KEY_VALUE.search(m))
  if not targets:
    raise UserError(
      f"config.peft.method='prefix' puts keys/values in front of self-attention layers; "
      f'{type(model).__module__} has none (module paths look like {next(iter(dense), "-")})'
    )
  return Spec(targets, hf_directory.settings(cfg).virtual_tokens)


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  found = {k.rsplit('/', 1)[0]: v for k, v in flat_params.items() if k.endswith('/' + PARAMS[0])}
  if not found:
    raise UserError(
      f'config.peft.method={cfg.method!r} but the parameters hold no {PARAMS[0]}; the run was '
      'not trained with prefix tuning'
    )
  return Spec(frozenset(found), int(next(iter(found.values())).shape[-3]))


def _intercept(spec: Spec, next_fun, args, kwargs, context):
  module = context.module
  if context.method_name == '__call__' and isinstance(module, VirtualTokens):
    x, _ = next_fun(*args, **kwargs)
    return x, spec.virtual_tokens  # the tokens start at position P
  path = common.targeted(spec, context)
  if path is None:
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs['inputs']
  n_in = contracted_axes(module, x.ndim)
  y = next_fun(*args, **kwargs)  # (B, T, K, H)
  scope = module.scope
  assert scope is not None
  boxed_kernel = scope.get_variable('params', 'kernel')
  names = getattr(boxed_kernel, 'names', None)  # logical axes (present while initialising)
  out_shape = nn.meta.unbox(boxed_kernel).shape[n_in:]
  prefix = scope.param(
    PARAMS[0],
    common.boxed(nn.initializers.normal(0.02), names and (None, *names[n_in:])),
    (spec.virtual_tokens, *out_shape),
    module.param_dtype,
  )
  rows = jnp.broadcast_to(prefix.astype(y.dtype), (y.shape[0], *prefix.shape))
  return jnp.concatenate([rows, y], axis=1)


common.METHODS.add('prefix', sys.modules[__name__])
