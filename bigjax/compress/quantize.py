"""Quantization through Qwix (config.quantize): post-training (PTQ) and quantization-aware
training (QAT) of the dot_general / conv / einsum ops of Dense, Conv and attention projections.

config.quantize fields:
  mode           '' (off) | 'ptq' (train in float; at the end quantize, calibrate and evaluate)
                 | 'qat' (train with fake quantization, straight-through gradients; at the end
                 convert to the real quantized model and evaluate it).
  weight_dtype   'int8' | 'int4' | 'fp8' (float8_e4m3fn): per-channel symmetric ('absmax') weights.
  act_dtype      the activations' type, '' = weight-only (Dense/einsum only: Qwix quantizes a conv's
                 input and kernel to the same type).
  calibration    'absmax' (symmetric) | 'minmax' (asymmetric) for the activations.
  calibration_batches  training batches whose activation statistics fix the static activation
                 scales (PTQ); QAT uses dynamic per-example activation scales (see static_scales).
  layers         regular expression (full match) over module paths ('conv_0', 'stack/layer_0/...')
                 that are quantized.

Qwix 0.1.8 serves our Linen modules and jax 0.10.2 (checked in ENVIRONMENT_NOTES.md): it intercepts
`jax.lax.dot_general`/`conv_general_dilated`/`jnp.einsum` inside the module, so no model file
changes. With int8 weights and activations the lowered ops are i8 x i8 -> i32 dots and
convolutions (`preferred_element_type`), rescaled to float after. XLA:CPU runs the dots as
s8 x s8 -> s32; it has no int8 convolution, so it widens a conv's s8 operands to s32 first
(tests/test_quantize.py). Neither uses the CPU's VNNI instructions in a measurable way here.
"""

from __future__ import annotations

import re
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from bigjax.errors import UserError

MODES = ('ptq', 'qat')
DTYPES = {'int8': jnp.int8, 'int4': jnp.int4, 'fp8': jnp.float8_e4m3fn}
CALIBRATIONS = ('absmax', 'minmax')
BITS = {'int8': 8, 'int4': 4, 'fp8': 8}


def enabled(cfg) -> bool:
  return bool(cfg.mode)


def _dtype(cfg, field: str):
  name = cfg[field]
  if name not in DTYPES:
    raise UserError(f'config.quantize.{field}={name!r} is unknown; use one of {", ".join(DTYPES)}')
  return DTYPES[name]


def static_scales(cfg) -> bool:
  """Whether the activations get static (calibrated) scales: PTQ yes. QAT no: Qwix 0.1.8 creates
  its static-scale statistics inside a custom_vjp trace, which leaks a tracer under our jitted,
  sharded state init (UnexpectedTracerError, checked); QAT quantizes activations with dynamic
  per-example scales instead (Qwix's default on XLA), and so does its converted model."""
  return bool(cfg.act_dtype) and cfg.mode == 'ptq'


def rules(cfg, training: bool) -> list[qwix.QuantizationRule]:
  """config.quantize -> one Qwix rule for the `layers` modules (a QtRule when `training`: QAT and
  calibration runs); activation scales static when static_scales(cfg)."""
  act = _dtype(cfg, 'act_dtype') if cfg.act_dtype else None
  kw = dict(
    module_path=cfg.layers,
    weight_qtype=_dtype(cfg, 'weight_dtype'),
    act_qtype=act,
    act_static_scale=static_scales(cfg) if act is not None else None,
    act_calibration_method=cfg.calibration if act is not None else None,
  )
  return [qwix.QtRule(**kw) if training else qwix.QuantizationRule(**kw)]


def _kernels(params) -> dict[str, tuple[int, ...]]:
  """{module path: kernel shape} of every weight matrix (leaf named kernel / embedding)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if keys and keys[-1] in ('kernel', 'embedding'):
      out['/'.join(keys[:-1])] = tuple(x.shape)
  return out


def check(cfg, model: nn.Module, sample_x: jax.Array) -> None:
  """UserError naming the config.quantize field for an unknown mode, dtype or calibration, a
  layers pattern that matches no weight, a conv asked for weight-only or mixed types, or a
  matched layer whose weights Qwix does not quantize (e.g. an nn.Embed lookup), or int4
  activations with int4 weights (XLA rejects int4 x int4 dots).

  sample_x: a prepared model input batch (B, ...)."""
  if not enabled(cfg):
    return
  if cfg.mode not in MODES:
    raise UserError(f'config.quantize.mode={cfg.mode!r} is unknown; use one of {", ".join(MODES)}')
  if cfg.calibration not in CALIBRATIONS:
    raise UserError(
      f'config.quantize.calibration={cfg.calibration!r} is unknown; use one of '
      f'{", ".join(CALIBRATIONS)}'
    )
  if cfg.act_dtype == 'int4' and cfg.weight_dtype == 'int4':  # XLA's hlo verifier rejects it
    raise UserError(
      "config.quantize.act_dtype='int4' with weight_dtype='int4': XLA cannot compile int4 x int4 "
      "dots on CPU or GPU; use act_dtype='int8' (or '' for weight-only int4)"
    )
  try:
    regex = re.compile(cfg.layers)
  except re.error as e:
    raise UserError(
      f'config.quantize.layers={cfg.layers!r} is not a regular expression ({e})'
    ) from None
  floats = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_x))['params']
  matched = {m: s for m, s in _kernels(floats).items() if regex.fullmatch(m)}
  if not matched:
    raise UserError(
      f'config.quantize.layers={cfg.layers!r} matches no layer with weights; layers are '
      f'{", ".join(_kernels(floats))}'
    )
  convs = [m for m, s in matched.items() if len(s) == 4]
  if convs and cfg.act_dtype != cfg.weight_dtype:
    raise UserError(
      f'config.quantize.act_dtype={cfg.act_dtype!r}: Qwix quantizes a conv ({convs[0]}) only with '
      f'activations of its weights\' type; set act_dtype={cfg.weight_dtype!r} or leave convs out '
      'of config.quantize.layers'
    )
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules(cfg, training=False)))
  abstract = jax.eval_shape(lambda: ptq.init(jax.random.key(0), sample_x))['params']
  flat = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_quantized(x))
  done = {'/'.join(k[:-1]) for k, v in flat.items() if _is_quantized(v)}
  missed = sorted(set(matched) - done)
  if missed:
    raise UserError(
      f'config.quantize.layers={cfg.layers!r} matches {missed[0]}, a layer type Qwix does not '
      'quantize (it quantizes Dense, Conv, DenseGeneral and einsum projections, not embedding '
      'lookups); narrow the pattern'
    )


def _is_quantized(x) -> bool:
  return type(x).__name__ == 'WithAux'


def qat_model(model: nn.Module, cfg) -> nn.Module:
  """The model with fake-quantized ops (Qwix QtProvider): forward in the quantized values,
  gradients straight through the rounding."""
  return qwix.quantize_model(model, qwix.QtProvider(rules(cfg, training=True)))


def ptq_model(model: nn.Module, cfg) -> nn.Module:
  """The model with real quantized ops (Qwix PtqProvider); its params come from quantized_params."""
  return qwix.quantize_model(model, qwix.PtqProvider(rules(cfg, training=False)))


def calibrate(model: nn.Module, cfg, params, model_state: dict, batches: list[dict]) -> dict:
  """Activation statistics ('quant_stats' collection) of the float `params` over `batches`
  (prepared batches as the model sees them: {'inputs': (B, ...)[, 'segment_ids', 'positions']},
  after task.prepare), through the QAT-provider model."""
  from bigjax import steps

  qat = qat_model(model, cfg)
  state = {k: v for k, v in model_state.items() if k != 'quant_stats'}
  init = steps.apply_model(
    qat, None, batches[0], train=False, init_rngs={'params': jax.random.key(0)}
  )
  stats = jax.tree.map(jnp.zeros_like, init.get('quant_stats', {}))  # init counted batch 0 once
  # Not jitted: Qwix 0.1.8 updates the statistics inside a custom_vjp, which leaks a tracer
  # under jit (see static_scales); a few eager batches cost about a second.
  for batch in batches:
    variables = {'params': params, **state, 'quant_stats': stats}
    _, new = steps.apply_model(qat, variables, batch, train=False, mutable=['quant_stats'])
    stats = new['quant_stats']
  return stats


def quantized_params(
  model: nn.Module, cfg, params, quant_stats: dict, sample_x: jax.Array
) -> tuple[Any, int]:
  """Float `params` (unboxed) -> (Qwix PTQ params for ptq_model(model, cfg), bytes): integer
  weights with per-channel float32 scales, activation scales from `quant_stats` (see calibrate,
  or the QAT run's running averages), other leaves (biases, norms) as they are. Bytes count the
  packed size (int4: two weights per byte) plus scales and float leaves."""
  ptq = ptq_model(model, cfg)
  abstract = jax.eval_shape(lambda: ptq.init(jax.random.key(0), sample_x))['params']
  qparams = qwix.quantize_params(jax.tree.map(jnp.asarray, params), abstract, quant_stats)
  return qparams, param_bytes(qparams, cfg)


def param_bytes(tree, cfg=None) -> int:
  """Bytes of a (quantized) param tree: integer weights at their bit width, the rest as stored."""
  bits = BITS[cfg.weight_dtype] if cfg is not None else 8
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if any(getattr(k, 'name', None) == 'qvalue' for k in path):
      total += (int(np.prod(x.shape)) * bits + 7) // 8
    else:
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def flat_arrays(qparams, cfg) -> dict[str, np.ndarray]:
  """A quantized param tree -> {'dense_0/kernel.qvalue': array, ...} for writing (int4 packed
  two per byte into uint8, fp8 as its raw uint8 bits)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(qparams):
    # dict keys are the module path ('.../norm/scale' is a norm's scale); the attributes of a
    # quantized leaf (WithAux.array.qvalue / .scale) become the suffix '.qvalue' / '.scale'
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    attrs = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey) and k.name != 'array']
    name = '/'.join(keys) + ''.join(f'.{a}' for a in attrs)
    a = np.asarray(x)
    if cfg.weight_dtype == 'int4' and name.endswith('.qvalue'):
      nibbles = (a.astype(np.int8).ravel() & 0xF).astype(np.uint8)
      nibbles = np.concatenate([nibbles, np.zeros(len(nibbles) % 2, np.uint8)])
      a = nibbles[0::2] | (nibbles[1::2] << 4)
    elif a.dtype.itemsize == 1 and a.dtype.kind not in 'iub':
      a = a.view(np.uint8)
    out[name] = a
  return out


def _ms_per_batch(fn, variables, batch, repeats: int = 10) -> float:
  jax.block_until_ready(fn(variables, batch))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, batch))
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3)


def prepared(exp, batch: dict) -> dict:
  """A host batch of the run -> the batch its model sees: task.prepare with the eval step's
  fixed key (a causal-LM window (B, T + 1) becomes inputs and targets (B, T))."""
  return exp.task.prepare(jax.tree.map(jnp.asarray, batch), jax.random.key(exp.config.seed))


def quantize_run(exp, params, model_state: dict) -> tuple[nn.Module, nn.Module, dict, int]:
  """(float model, PTQ model, the PTQ model's variables, their bytes) for a run's float `params`
  and `model_state` (single-device jax arrays: Qwix finds a module's weight by identity, and
  numpy arrays are copied). Activations (static_scales) are calibrated on
  config.quantize.calibration_batches training batches; QAT runs' parameters are quantized the
  same way, with dynamic activation scales."""
  from bigjax import experiment, init_from, steps

  config = exp.config
  cfg = config.quantize
  base = experiment.make_model(  # the float model (a QAT run's too)
    config.model, exp.data, exp.task, init_from.hf_architecture(config)
  )
  stats = {}
  if static_scales(cfg):
    batches = [prepared(exp, exp.batches.batch(i)) for i in range(cfg.calibration_batches)]
    stats = calibrate(base, cfg, params, model_state, batches)
  sample = steps.prepare_inputs(prepared(exp, exp.batches.batch(0))['inputs'], None, None)
  qparams, qbytes = quantized_params(base, cfg, params, stats, sample)
  others = {k: v for k, v in model_state.items() if k != 'quant_stats'}
  return base, ptq_model(base, cfg), {'params': qparams, **others}, qbytes


def _eval_fn(exp, model: nn.Module):
  """jitted (variables, host eval batch) -> the task's per-example eval outputs."""
  from bigjax import steps

  def run(variables, batch):
    batch = exp.task.prepare(batch, jax.random.key(exp.config.seed))
    return exp.task.eval_outputs(steps.apply_model(model, variables, batch, train=False), batch)

  return jax.jit(run)


def report(exp, state) -> dict[str, float]:
  """The quantized model of a finished run, evaluated: {'quant_<metric>': eval report scalars of
  the quantized model, 'float_bytes', 'quant_bytes', 'float_ms', 'quant_ms' (median ms per eval
  batch of config.eval_batch_size on this host, jitted, float against quantized)}.

  PTQ: the float parameters, activations calibrated on config.quantize.calibration_batches
  training batches. QAT: the trained parameters, dynamic activation scales (static_scales)."""
  params = jax.tree.map(jnp.asarray, jax.device_get(state.params))
  model_state = jax.tree.map(jnp.asarray, jax.device_get(state.model_state))
  base, ptq, qvariables, qbytes = quantize_run(exp, params, model_state)
  others = {k: v for k, v in qvariables.items() if k != 'params'}
  quant_fn, float_fn = _eval_fn(exp, ptq), _eval_fn(exp, base)
  outputs = [jax.device_get(quant_fn(qvariables, batch)) for batch in exp.eval_batches()]
  n = exp.eval_loader.num_examples
  outputs = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
  evals = exp.task.eval_report(outputs, exp.eval_labels())
  out = {f'quant_{k}': float(v) for k, v in evals.items() if np.ndim(v) == 0}
  first = next(exp.eval_batches())
  out.update(
    float_bytes=float(param_bytes(params)),
    quant_bytes=float(qbytes),
    float_ms=_ms_per_batch(float_fn, {'params': params, **others}, first),
    quant_ms=_ms_per_batch(quant_fn, qvariables, first),
  )
  return out


def write_quantized(run_dir: str, path: str, cfg=None) -> int:
  """Quantizes the newest checkpoint of the run in `run_dir` (config.quantize of its config.json,
  or `cfg`; with mode '' there, int8 PTQ with the base defaults), calibrating on its training data
  when activations are quantized, and writes the arrays (flat_arrays, an uncompressed .npz) to
  `path`. Returns the file's size on disk in bytes. What `bigjax-export --quantized` calls."""
  import io
  import os

  from bigjax import checkpoint, config_lib, experiment, init_from, reporting

  config = config_lib.saved_config(os.path.join(run_dir, 'config.json'))
  if cfg is not None:
    config.quantize.update(cfg)
  if not config.quantize.mode:
    config.quantize.mode = 'ptq'
  exp = experiment.build(config, jax.devices()[:1])
  _, state = checkpoint.load_latest(init_from.checkpoint_dir(run_dir))
  params = jax.tree.map(jnp.asarray, state['params'])
  model_state = jax.tree.map(jnp.asarray, state.get('model_state', {}))
  _, _, qvariables, _ = quantize_run(exp, params, model_state)
  buffer = io.BytesIO()
  np.savez(buffer, **flat_arrays(qvariables['params'], config.quantize))  # type: ignore[arg-type]
  reporting.write_atomic(path, buffer.getvalue())
  return os.path.getsize(path)
