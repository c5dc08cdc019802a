"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose Dense kernels are stored quantized
(config.peft.quantize = 'int8' | 'nf4', the kernels of the modules config.peft.quantize_layers
full-matches).

A quantized kernel W (in..., out...) is stored as `kernel` = integer codes of W's shape and
`kernel_scale` (nb, out...): W ~ scale * level[code], in blocks of the first input axis
('rows', the input axes flattened):
  int8  symmetric absmax per output unit (one block): code = round(W / s), s = max|W| / 127,
        |W - s code| <= s / 2;
  nf4   the 16 NormalFloat levels of QLoRA (its Appendix E), absmax per block of 64 rows (the
        whole column when the rows are not a multiple of 64): code = argmin |W / s - level|,
        |W - s level[code]| <= s * (the largest half-gap between levels, 0.161).
Codes take one byte each (nf4 codes are not packed two to a byte here: QLoRA's numerics with
int8's memory); the scales are float32 (no double quantization). The layer computes
x . dequant(W) + b in its dtype, and gradients reach x (and so the adapters below) as usual.

Why not Qwix's PtqProvider (bigjax.compress.quantize): its quantized params (WithAux/QArray) lose
the kernels' logical axis names, so they would not be created by our jitted, sharded init or load
into a sharded mesh from a HuggingFace checkpoint; and it finds a module's weight by object
identity. Here the codes keep the kernel's names (and so its sharding), and a checkpoint's float
tensors are quantized on the host one at a time while loading (`quantize_loaders`).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError

KINDS = ('int8', 'nf4')  # config.peft.quantize ('' = off)
CODE_DTYPES = {'int8': np.int8, 'nf4': np.uint8}
NF4_BLOCK = 64
# NormalFloat4 (QLoRA, Appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)


def check(cfg) -> None:
  """UserError for an unknown config.peft.quantize, a quantize_layers that is not a regex, or
  save='trainable' (not supported with a quantized base yet: bigjax-sample / -export rebuild the
  base of an adapter-only checkpoint in float)."""
  if cfg.get('quantize') and cfg.quantize not in KINDS:
    raise UserError(
      f'config.peft.quantize={cfg.quantize!r} is unknown; use one of {", ".join(KINDS)} (or '
      "'' for a float base)"
    )
  if cfg.get('quantize') and cfg.save == 'trainable':
    raise UserError(
      f"config.peft.save='trainable' with config.peft.quantize={cfg.quantize!r} is not supported "
      "(the base would be rebuilt in float for bigjax-sample / -export); use config.peft.save='all'"
    )
  try:
    re.compile(cfg.get('quantize_layers', '.*'))
  except re.error as e:
    raise UserError(
      f'config.peft.quantize_layers={cfg.quantize_layers!r} is not a regular expression ({e})'
    ) from None


def selected(cfg, dense: dict[str, str]) -> frozenset[str]:
  """The Dense modules whose kernels config.peft.quantize stores quantized (none when off);
  UserError for a quantize_layers that matches none."""
  check(cfg)
  if not cfg.get('quantize'):
    return frozenset()
  chosen = frozenset(m for m in dense if re.fullmatch(cfg.quantize_layers, m))
  if not chosen:
    raise UserError(
      f'config.peft.quantize_layers={cfg.quantize_layers!r} matches no Dense layer; layers are '
      f'{", ".join(list(dense)[:4])}, ...'
    )
  return chosen


# ----------------------------------------------------------------------------------------------
# Codes and scales (numpy on the host, or jax inside the model: `xp`)
# ----------------------------------------------------------------------------------------------
def block_rows(kind: str, rows: int) -> int:
  return rows if kind == 'int8' or rows % NF4_BLOCK else NF4_BLOCK


def quantize(w, kind: str, lead: int, n_in: int, xp: Any = np):
  """Float kernel (lead..., in..., out...) -> (codes of its shape, scale (lead..., nb, out...))."""
  shape = w.shape
  rows = math.prod(shape[lead : lead + n_in])
  out = shape[lead + n_in :]
  block = block_rows(kind, rows)
  wb = xp.reshape(w.astype(xp.float32), (*shape[:lead], rows // block, block, math.prod(out)))
  absmax = xp.max(xp.abs(wb), axis=-2, keepdims=True)
  scale = absmax / 127.0 if kind == 'int8' else absmax
  safe = xp.where(scale == 0, 1.0, scale)
  if kind == 'int8':
    codes = xp.clip(xp.round(wb / safe), -127, 127)
  else:
    midpoints = xp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)  # the nearest level's index
    codes = xp.searchsorted(midpoints, wb / safe)
  codes = xp.reshape(codes.astype(CODE_DTYPES[kind]), shape)
  return codes, xp.reshape(scale, (*shape[:lead], rows // block, *out))


def dequantize(codes, scale, kind: str, lead: int, n_in: int, dtype=jnp.float32, xp: Any = jnp):
  """The float kernel of (codes, scale) from `quantize`."""
  shape = codes.shape
  rows = math.prod(shape[lead : lead + n_in])
  nb = scale.shape[lead]
  values = codes.astype(dtype) if kind == 'int8' else xp.asarray(NF4_LEVELS, dtype)[codes]
  vb = xp.reshape(values, (*shape[:lead], nb, rows // nb, -1))
  sb = xp.reshape(scale.astype(dtype), (*shape[:lead], nb, 1, -1))
  return xp.reshape(vb * sb, shape)


def error_bound(scale, kind: str):
  """The largest |W - dequantize(quantize(W))| of a block with this scale."""
  half_gap = 0.5 if kind == 'int8' else float(np.max(np.diff(NF4_LEVELS)) / 2)
  return scale * half_gap


# ----------------------------------------------------------------------------------------------
# Inside the model (called by the LoRA interceptor for the modules of Spec.quantized)
# ----------------------------------------------------------------------------------------------
def _names(boxed):
  return getattr(boxed, 'names', None)


def store(module: nn.Module, kind: str, n_in: int) -> None:
  """At init: replaces the module's float kernel, just created by its own __call__, by its codes
  (boxed like the kernel) and adds kernel_scale (the rank of the kernel's output axes, blocks
  unsharded)."""
  scope = module.scope
  assert scope is not None
  boxed = scope.get_variable('params', 'kernel')
  codes, scale = quantize(nn.meta.unbox(boxed), kind, 0, n_in, xp=jnp)
  names = _names(boxed)
  scope.put_variable('params', 'kernel', boxed.replace_boxed(codes) if names is not None else codes)
  init = lambda *_: scale
  if names is not None:
    init = nn.with_logical_partitioning(init, (None, *names[n_in:]))
  scope.param('kernel_scale', init)


def kernel(module: nn.Module, kind: str, n_in: int, dtype) -> jax.Array:
  """The dequantized kernel of a quantized module, in `dtype`."""
  scope = module.scope
  assert scope is not None
  codes = nn.meta.unbox(scope.get_variable('params', 'kernel'))
  scale = nn.meta.unbox(scope.get_variable('params', 'kernel_scale'))
  return dequantize(codes, scale, kind, 0, n_in, dtype)


def dense(module: nn.Module, x: jax.Array, kind: str, n_in: int) -> jax.Array:
  """The Dense / DenseGeneral output x . W + b with W dequantized (what the module computes)."""
  scope = module.scope
  assert scope is not None
  dtype = module.dtype or jnp.result_type(x.dtype, module.param_dtype)
  w = kernel(module, kind, n_in, dtype)
  contract = tuple(range(x.ndim - n_in, x.ndim))
  y = jax.lax.dot_general(
    x.astype(dtype), w, ((contract, tuple(range(n_in))), ((), ())), precision=module.precision
  )
  if module.use_bias:
    y = y + nn.meta.unbox(scope.get_variable('params', 'bias')).astype(dtype)
  return y


# ----------------------------------------------------------------------------------------------
# Params trees: loading float checkpoints, the float view, merging
# ----------------------------------------------------------------------------------------------
def _lead(path: str) -> int:
  return 1 if re.search(r'(^|/)layers/', path) else 0  # a scanned stack's leading layer axis


def _layout(kernel_shape, scale_shape, path: str) -> tuple[int, int]:
  """(lead, n_in) of a quantized kernel from its and its scale's shapes."""
  lead = _lead(path)
  n_out = len(scale_shape) - lead - 1
  return lead, len(kernel_shape) - lead - n_out


def quantized_kernels(flat_params: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
  """{kernel path: (kind, lead, n_in)} of a flat params tree (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, scale in flat_params.items():
    if path.endswith('/kernel_scale'):
      k = path.removesuffix('_scale')
      kind = 'int8' if np.dtype(flat_params[k].dtype) == np.int8 else 'nf4'
      out[k] = (kind, *_layout(flat_params[k].shape, scale.shape, k))
  return out


def float_view(flat_params: dict[str, Any]) -> dict[str, Any]:
  """The abstract float params a checkpoint of the base holds: each quantized kernel as a
  float32 ShapeDtypeStruct of its shape, no kernel_scale."""
  quantized = quantized_kernels(flat_params)
  out = {}
  for path, value in flat_params.items():
    if path.endswith('/kernel_scale'):
      continue
    if path in quantized:
      sharding = getattr(value, 'sharding', None)
      value = jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=sharding)
    out[path] = value
  return out


def quantize_loaders(
  flat_params: dict[str, Any], loaders: dict[str, Callable[[], np.ndarray]]
) -> dict[str, Callable[[], np.ndarray]]:
  """Loaders of float kernels -> loaders of their codes and scales, for the kernels quantized in
  `flat_params` (the model's params, abstract or not); each float tensor is read and quantized
  once on the host."""
  quantized = quantized_kernels(flat_params)
  out = dict(loaders)
  for path, (kind, lead, n_in) in quantized.items():
    if path not in loaders:
      continue
    held: dict[str, np.ndarray] = {}

    def part(i, load=loaders[path], kind=kind, lead=lead, n_in=n_in, held=held):
      if not held:
        held['codes'], held['scale'] = quantize(load(), kind, lead, n_in)
      value = held.pop('codes' if i == 0 else 'scale')
      return value

    out[path] = functools.partial(part, 0)
    out[path + '_scale'] = functools.partial(part, 1)
  return out


def quantize_arrays(flat_params: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  """`quantize_loaders` for arrays in memory ({path: float array} -> codes and scales too)."""
  loaders: dict[str, Callable[[], np.ndarray]] = {
    k: functools.partial(np.asarray, v) for k, v in arrays.items()
  }
  return {k: load() for k, load in quantize_loaders(flat_params, loaders).items()}


def dequantized(flat_params: dict[str, Any]) -> dict[str, Any]:
  """A flat params tree with every quantized kernel replaced by its float32 value and the scales
  removed (for merging and export)."""
  quantized = quantized_kernels(flat_params)
  out = {k: v for k, v in flat_params.items() if not k.endswith('/kernel_scale')}
  for path, (kind, lead, n_in) in quantized.items():
    out[path] = dequantize(
      jnp.asarray(flat_params[path]), jnp.asarray(flat_params[path + '_scale']), kind, lead, n_in
    )
  return out
