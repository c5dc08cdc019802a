"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on Dense / DenseGeneral kernels.

A targeted layer y = x W + b (kernel W of shape in_dims + out_dims, e.g. (D, N, H) for a query
projection) gets A (in_dims..., r) and B (r, out_dims...) beside W:

  LoRA  y = x W + b + s * (dropout(x) A) B,                 s = alpha / r
  DoRA  y = b + g * (x W + s * (dropout(x) A) B),           g = m / ||W + s A B||_c

as HF PEFT computes them (A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), its kaiming_uniform(a=sqrt(5));
B = 0, so the adapted model is the base exactly at step 0). ||.||_c is the L2 norm of each output
unit's column of weights over the input dims; as in DoRA sec. 4.3 and PEFT it is treated as a
constant in the backward pass. DoRA's magnitude m starts at ||W||_c; it is stored as the
offset m - ||W_0||_c (`magnitude_offset`, zeros at init), so a base loaded after the init (from
config.init_from) needs no second pass to reset m. A, B and the offset carry the kernel's logical
axis names (the rank axis is unsharded), so they are sharded like the kernel they adapt.

Parameters added to each targeted module: lora_a, lora_b (+ magnitude_offset with DoRA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.errors import UserError
from bigjax.peft import common, qlora

PARAMS = ('lora_a', 'lora_b', 'magnitude_offset')


@dataclasses.dataclass(frozen=True)
class Spec:
  """targets: module paths ('stack/layer_0/self_attention/query') whose kernel is adapted.
  ranks: (module, rank) of the modules whose rank is not `rank` (an imported PEFT adapter's
  rank_pattern, GPT-2's fused c_attn); every module's update is scaled by alpha / rank."""

  targets: frozenset[str]
  rank: int
  alpha: float
  dropout: float = 0.0
  dora: bool = False
  ranks: tuple[tuple[str, int], ...] = ()
  quant: str = ''  # QLoRA (bigjax/peft/qlora.py): 'int8' | 'nf4' kernels of `quantized`
  quantized: frozenset[str] = frozenset()

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def rank_of(self, module: str) -> int:
    return dict(self.ranks).get(module, self.rank)

  def interceptor(self, train: bool):
    return functools.partial(_intercept, self, train)

  def describe(self) -> str:
    kind = 'dora' if self.dora else 'lora'
    base = f', over {len(self.quantized)} {self.quant} kernels' if self.quant else ''
    return f'{kind} (r={self.rank}, alpha={self.alpha:g}) on {len(self.targets)} kernels{base}'

  def merge(self, flat_params: dict[str, Any]) -> dict[str, Any]:
    """{path: array} with every targeted kernel replaced by its merged weight (LoRA:
    W + s A B; DoRA: m (W + s A B) / ||W + s A B||_c) and the adapter's parameters removed."""
    out = qlora.dequantized(flat_params) if self.quant else dict(flat_params)
    for module in sorted(self.targets):
      a, b = out.pop(f'{module}/lora_a'), out.pop(f'{module}/lora_b')
      kernel = jnp.asarray(out[f'{module}/kernel'])
      lead = a.ndim + b.ndim - 2 - kernel.ndim  # a scanned stack's leading layer axis
      n_in = a.ndim - lead - 1
      rows = math.prod(a.shape[lead : lead + n_in])
      a2 = jnp.reshape(a, (*a.shape[:lead], rows, a.shape[-1]))
      b2 = jnp.reshape(b, (*b.shape[:lead], a.shape[-1], -1))
      w2 = jnp.reshape(kernel, (*kernel.shape[:lead], rows, -1))
      new = w2 + self.scaling * (a2 @ b2)
      if self.dora:
        offset = jnp.reshape(out.pop(f'{module}/magnitude_offset'), (*kernel.shape[:lead], -1))
        magnitude = jnp.linalg.norm(w2, axis=-2) + offset
        new = new * (magnitude / jnp.linalg.norm(new, axis=-2))[..., None, :]
      out[f'{module}/kernel'] = jnp.reshape(new, kernel.shape).astype(kernel.dtype)
    return out


def make_spec(cfg, dense: dict[str, str], model: nn.Module) -> Spec:
  """config.peft -> Spec over the Dense kernels config.peft.target selects, or those of the PEFT
  adapter config.peft.init_from (bigjax/peft/hf_import.py)."""
  quant = dict(quant=cfg.get('quantize', ''), quantized=qlora.selected(cfg, dense))
  if cfg.get('init_from'):
    from bigjax.peft import hf_import

    return dataclasses.replace(hf_import.spec(cfg, dense, model), **quant)
  targets = common.select_kernels(cfg, dense)
  return Spec(targets, cfg.rank, float(cfg.alpha), cfg.dropout, cfg.dora, **quant)


def spec_from_params(cfg, flat_params: dict[str, Any]) -> Spec:
  """The Spec of a params tree that holds LoRA parameters (a saved run); each module's rank is
  its lora_a's last axis."""
  from bigjax.peft import hf_directory

  cfg = hf_directory.settings(cfg)  # config.peft.init_from: the adapter's rank, alpha and dora
  ranks = {
    k.rsplit('/', 1)[0]: v.shape[-1] for k, v in flat_params.items() if k.endswith('/lora_a')
  }
  if not ranks:
    raise UserError(
      f'config.peft.method={cfg.method!r} but the parameters hold no lora_a; the run was not '
      'trained with LoRA'
    )
  odd = tuple(sorted((m, r) for m, r in ranks.items() if r != cfg.rank))
  quantized = frozenset(k.rsplit('/', 1)[0] for k in qlora.quantized_kernels(flat_params))
  quant = cfg.get('quantize', '') if quantized else ''
  return Spec(
    frozenset(ranks), cfg.rank, float(cfg.alpha), cfg.dropout, cfg.dora, odd, quant, quantized
  )


def contracted_axes(module: nn.Module, ndim: int) -> int:
  """How many trailing input axes a Dense / DenseGeneral contracts (ValueError for a
  DenseGeneral with batch_dims or non-trailing axes, which LoRA here does not adapt)."""
  if isinstance(module, nn.Dense):
    return 1
  axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
  axes = sorted(a % ndim for a in axes)
  if module.batch_dims or axes != list(range(ndim - len(axes), ndim)):
    raise ValueError(
      f'{"/".join(module.path)}: LoRA adapts DenseGeneral layers that contract trailing axes '
      'without batch_dims'
    )
  return len(axes)


def _boxed(init, names):
  return init if names is None else nn.with_logical_partitioning(init, names)


def input_dropout(x, rate: float, rng) -> jax.Array:
  """Inverted dropout of an adapter's input x (any shape) at `rate` from `rng`."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _intercept(spec: Spec, train: bool, next_fun, args, kwargs, context):
  """The nn.intercept_methods interceptor: adds the (Do)LoRA term to targeted layers' output,
  and computes the layers of spec.quantized from their stored codes (QLoRA)."""
  module = context.module
  if context.method_name != '__call__' or not isinstance(module, common.DENSE_TYPES):
    return next_fun(*args, **kwargs)
  path = '/'.join(module.path)
  quantized = path in spec.quantized
  if path not in spec.targets and not quantized:
    return next_fun(*args, **kwargs)
  x = args[0] if args else kwargs['inputs']
  n_in = contracted_axes(module, x.ndim)
  scope = module.scope  # the intercepted module's: its new parameters are created beside W
  assert scope is not None
  if quantized:
    if module.is_initializing() and not scope.has_variable('params', 'kernel_scale'):
      next_fun(*args, **kwargs)  # the module creates its float kernel (and bias) ...
      qlora.store(module, spec.quant, n_in)  # ... which is replaced by its codes and scales
    y = qlora.dense(module, x, spec.quant, n_in)
  else:
    y = next_fun(*args, **kwargs)
  if path not in spec.targets:
    return y
  boxed_kernel = scope.get_variable('params', 'kernel')
  names = getattr(boxed_kernel, 'names', None)  # logical axes (present while initialising)
  if quantized:
    kernel = qlora.kernel(module, spec.quant, n_in, y.dtype)
  else:
    kernel = nn.meta.unbox(boxed_kernel)
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  r, pdtype = spec.rank_of(path), module.param_dtype
  # PEFT's kaiming_uniform(a=sqrt(5)) for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  a_init = nn.initializers.variance_scaling(
    1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(n_in)), out_axis=-1
  )
  a = scope.param('lora_a', _boxed(a_init, names and (*names[:n_in], None)), (*in_shape, r), pdtype)
  b = scope.param(
    'lora_b',
    _boxed(nn.initializers.zeros, names and (None, *names[n_in:])),
    (r, *out_shape),
    pdtype,
  )
  dtype = y.dtype
  dropped = bool(train and spec.dropout)
  h = (input_dropout(x, spec.dropout, module.make_rng('dropout')) if dropped else x).astype(dtype)
  contract = tuple(range(x.ndim - n_in, x.ndim))
  dot = functools.partial(jax.lax.dot_general, precision=module.precision)
  xa = dot(h, a.astype(dtype), ((contract, tuple(range(n_in))), ((), ())))
  delta = dot(xa, b.astype(dtype), (((xa.ndim - 1,), (0,)), ((), ())))
  if not spec.dora:
    return y + delta * spec.scaling
  offset = scope.param(
    'magnitude_offset', _boxed(nn.initializers.zeros, names and names[n_in:]), out_shape, pdtype
  )
  rows = math.prod(in_shape)
  w2 = jnp.reshape(kernel, (rows, -1)).astype(dtype)
  ab = jnp.reshape(a, (rows, r)).astype(dtype) @ jnp.reshape(b, (r, -1)).astype(dtype)
  norm = jax.lax.stop_gradient(jnp.linalg.norm(w2 + spec.scaling * ab, axis=0))
  magnitude = jnp.linalg.norm(w2, axis=0) + jnp.reshape(offset, (-1,)).astype(dtype)
  g = jnp.reshape(magnitude / norm, out_shape)
  if dropped:  # with dropout, PEFT applies the base weight to the dropped-out input too
    base = dot(h, kernel.astype(dtype), ((contract, tuple(range(n_in))), ((), ())))
  else:
    bias = scope.get_variable('params', 'bias') if module.use_bias else None
    base = y if bias is None else y - nn.meta.unbox(bias).astype(dtype)
  return y + (g - 1) * base + g * delta * spec.scaling


common.METHODS.add('lora', sys.modules[__name__])
