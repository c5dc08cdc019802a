"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations, as HF PEFT's IA3 computes them.

For each Dense / DenseGeneral whose kernel path config.peft.target matches (IA3's choice: the
key and value projections and the MLP's output layer, target='(key|value|mlp/wo)/kernel'):
  y = (x W + b) * l        l (out...,), for the layers config.peft.ia3_feedforward does not match;
  y = (x * l) W + b        l (in...,), for those it matches (PEFT's feedforward_modules: the
                           scale of the MLP's hidden activation, on the input of its output layer).
l starts at ones, so the adapted model is the base exactly at step 0; it carries the kernel's
logical axis names (sharded like the axes it scales). Both forms fold into W (and b): `merge`.

Parameters added to each targeted module: ia3_scale.
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
from bigjax.peft import common
from bigjax.peft.lora import contracted_axes

PARAMS = ('ia3_scale',)


@dataclasses.dataclass(frozen=True)
class Spec:
  """targets: the module paths adapted; inputs: those of them scaled on their input side."""

  targets: frozenset[str]
  inputs: frozenset[str]

  def interceptor(self, train: bool):
    del train  # IA3 has no dropout
    return functools.partial(_intercept, self)

  def describe(self) -> str:
    return f'ia3 on {len(self.targets)} kernels ({len(self.inputs)} scaled on the input side)'

  def merge(self, flat_params: dict[str, Any]) -> dict[str, Any]:
    """{path: array} with each scale folded into its kernel (and, output side, bias)."""
    out = dict(flat_params)
    for module in sorted(self.targets):
      scale = jnp.asarray(out.pop(f'{module}/ia3_scale'))
      kernel = jnp.asarray(out[f'{module}/kernel'])
      lead = 1 if re.search(r'(^|/)layers/', module) else 0  # a scanned stack's layer axis
      n = scale.ndim - lead
      if module in self.inputs:  # (lead, in...) over the kernel's first input axes
        shaped = jnp.reshape(scale, scale.shape + (1,) * (kernel.ndim - scale.ndim))
        out[f'{module}/kernel'] = (kernel * shaped).astype(kernel.dtype)
      else:  # (lead, out...) over the kernel's last axes
        shaped = jnp.reshape(
          scale, scale.shape[:lead] + (1,) * (kernel.ndim - lead - n) + scale.shape[lead:]
        )
        out[f'{module}/kernel'] = (kernel * shaped).astype(kernel.dtype)
        if f'{module}/bias' in out:
          bias = jnp.asarray(out[f'{module}/bias'])
          out[f'{module}/bias'] = (bias * scale).astype(bias.dtype)
    return out


def _feedforward(cfg, targets: frozenset[str]) -> frozenset[str]:
  try:
    regex = re.compile(cfg.ia3_feedforward)
  except re.error as e:
    raise UserError(
      f'config.peft.ia3_feedforward={cfg.ia3_feedforward!r} is not a regular expression ({e})'
    ) from None
  return frozenset(m for m in targets if regex.search(f'{m}/kernel'))


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  """config.peft -> Spec over the kernels config.peft.target selects."""
  del model
  common.refuse_dropout(cfg, "IA3 (PEFT's IA3 has none either)")
  targets = common.select_kernels(cfg, dense)
  return Spec(targets, _feedforward(cfg, targets))


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  """The Spec of a params tree that holds IA3 scales (a saved run)."""
  targets = frozenset(k.rsplit('/', 1)[0] for k in flat_params if k.endswith('/ia3_scale'))
  if not targets:
    raise UserError(
      f"config.peft.method={cfg.method!r} but the parameters hold no ia3_scale; the run was not "
      'trained with IA3'
    )
  return Spec(targets, _feedforward(cfg, targets))


def _intercept(spec: Spec, next_fun, args, kwargs, context):
  path = common.targeted(spec, context)
  if path is None:
    return next_fun(*args, **kwargs)
  module = context.module
  x = args[0] if args else kwargs['inputs']
  n_in = contracted_axes(module, x.ndim)
  scope = module.scope
  assert scope is not None
  ones = nn.initializers.ones
  if path in spec.inputs:
    scale = scope.param('ia3_scale', ones, x.shape[x.ndim - n_in :], module.param_dtype)
    scaled = x * scale.astype(x.dtype)
    y = next_fun(scaled, *args[1:], **kwargs) if args else next_fun(**{**kwargs, 'inputs': scaled})
    boxed_kernel = scope.get_variable('params', 'kernel')
    if getattr(boxed_kernel, 'names', None) is not None:  # initialising: the kernel's input names
      named = dataclasses.replace(boxed_kernel, value=scale, names=boxed_kernel.names[:n_in])
      scope.put_variable('params', 'ia3_scale', named)
    return y
  y = next_fun(*args, **kwargs)
  boxed_kernel = scope.get_variable('params', 'kernel')
  names = getattr(boxed_kernel, 'names', None)
  shape = nn.meta.unbox(boxed_kernel).shape
  scale = scope.param(
    'ia3_scale', common.boxed(ones, names and names[n_in:]), shape[n_in:], module.param_dtype
  )
  return y * scale.astype(y.dtype)


common.METHODS.add('ia3', sys.modules[__name__])
