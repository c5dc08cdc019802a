"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP on the
output of chosen layers, y -> y + relu(y W_down + b_down) W_up + b_up.

config.peft.target picks the Dense / DenseGeneral layers whose output it adapts: Houlsby's
placement is after the attention output projection and after the MLP,
target='(self_attention/out|mlp/wo)/kernel'; Pfeiffer's after the MLP only, target='mlp/wo/kernel'.
config.peft.bottleneck is the hidden width m. W_down (out..., m) has PEFT-style U(+-1/sqrt(fan_in))
init and W_up (m, out...) and both biases start at zero, so the adapted model is the base exactly
at step 0 (Houlsby's near-identity init). The weights carry the layer's output logical axis names
(the bottleneck axis is unsharded). Not foldable into the base weights (the ReLU): no merge.

Parameters added to each targeted module: adapter_down, adapter_down_bias, adapter_up,
adapter_up_bias.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import flax.linen as nn
import jax

from bigjax.errors import UserError
from bigjax.peft import common
from bigjax.peft.lora import contracted_axes

PARAMS = ('adapter_down', 'adapter_down_bias', 'adapter_up', 'adapter_up_bias')


@dataclasses.dataclass(frozen=True)
class Spec:
  targets: frozenset[str]
  bottleneck: int

  def interceptor(self, train: bool):
    del train
    return functools.partial(_intercept, self)

  def describe(self) -> str:
    return f'adapter (bottleneck {self.bottleneck}) on {len(self.targets)} layers'


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  del model
  common.refuse_dropout(cfg, 'bottleneck adapters')
  return Spec(common.select_kernels(cfg, dense), cfg.bottleneck)


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  downs = {k.rsplit('/', 1)[0]: v for k, v in flat_params.items() if k.endswith('/adapter_down')}
  if not downs:
    raise UserError(
      f'config.peft.method={cfg.method!r} but the parameters hold no adapter_down; the run was '
      'not trained with adapters'
    )
  return Spec(frozenset(downs), next(iter(downs.values())).shape[-1])


def _intercept(spec: Spec, next_fun, args, kwargs, context):
  path = common.targeted(spec, context)
  if path is None:
    return next_fun(*args, **kwargs)
  module = context.module
  x = args[0] if args else kwargs['inputs']
  n_in = contracted_axes(module, x.ndim)
  y = next_fun(*args, **kwargs)
  scope = module.scope
  assert scope is not None
  boxed_kernel = scope.get_variable('params', 'kernel')
  names = getattr(boxed_kernel, 'names', None)
  out_shape = nn.meta.unbox(boxed_kernel).shape[n_in:]
  out_names = None if names is None else tuple(names[n_in:])
  m, pdtype, n_out = spec.bottleneck, module.param_dtype, len(out_shape)
  down_init = nn.initializers.variance_scaling(
    1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(n_out)), out_axis=-1
  )
  zeros = nn.initializers.zeros
  down = scope.param(
    'adapter_down',
    common.boxed(down_init, out_names and (*out_names, None)),
    (*out_shape, m),
    pdtype,
  )
  down_bias = scope.param('adapter_down_bias', common.boxed(zeros, names and (None,)), (m,), pdtype)
  up = scope.param(
    'adapter_up', common.boxed(zeros, out_names and (None, *out_names)), (m, *out_shape), pdtype
  )
  up_bias = scope.param('adapter_up_bias', common.boxed(zeros, out_names), out_shape, pdtype)
  dtype = y.dtype
  axes = tuple(range(y.ndim - n_out, y.ndim))
  dot = functools.partial(jax.lax.dot_general, precision=module.precision)
  h = dot(y, down.astype(dtype), ((axes, tuple(range(n_out))), ((), ())))
  h = jax.nn.relu(h + down_bias.astype(dtype))
  delta = dot(h, up.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
  return y + delta + up_bias.astype(dtype)


common.METHODS.add('adapter', sys.modules[__name__])
