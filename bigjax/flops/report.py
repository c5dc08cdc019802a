"""`throughput_report`: step time, examples/tokens per second, model FLOPs and MFU of a run."""

from typing import Any

import numpy as np

from bigjax.flops import counting, peaks


def throughput_report(
  exp: Any, compiled: Any, step_seconds: float, steps_timed: int, *, peak: peaks.Peak | None = None
) -> dict[str, Any]:
  """Throughput and MFU of training `exp` -> a JSON-ready dict.

  step_seconds: wall seconds of the timed steps ALL TOGETHER (e.g. train.py's train_s);
  steps_timed: how many steps they were. compiled: exp.compile_train_step()'s result, or None.
  peak: (flops per device, source) to use instead of peak_flops(first mesh device).
  Keys: step_time_s, examples_per_s, tokens_per_s (token-sequence models, inputs (B, T) int, only;
  else None), model_flops_per_step (analytic if known, else XLA's global count),
  model_flops_source, analytic_flops_per_step, xla_flops_per_device, xla_flops_per_step (per device
  x devices), analytic_over_xla, model_flops_per_s, peak_flops_per_device, peak_units, peak_source
  and mfu = model_flops_per_step / step_time_s / (peak * peak_units). Missing values are None.
  """
  devices = exp.mesh.size
  step_time = step_seconds / steps_timed if steps_timed > 0 and step_seconds > 0 else None
  batch = exp.config.batch_size
  inputs = exp.sample['inputs']
  is_tokens = np.issubdtype(inputs.dtype, np.integer) and inputs.ndim == 2
  tokens_per_step = batch * int(inputs.shape[1]) if is_tokens else None
  analytic = counting.analytic_train_flops(exp)
  per_device = counting.xla_flops(compiled) if compiled is not None else None
  xla_global = per_device * devices if per_device is not None else None
  model_flops = analytic if analytic is not None else xla_global
  if peak is None:
    peak = peaks.peak_flops(next(iter(exp.mesh.devices.flat)))
  peak_value, peak_source = peak
  units = peaks.peak_units(exp.mesh)
  rate = lambda amount: amount / step_time if amount is not None and step_time else None
  model_rate = rate(model_flops)
  return {
    'step_time_s': step_time,
    'steps_timed': steps_timed,
    'examples_per_s': rate(batch),
    'tokens_per_s': rate(tokens_per_step),
    'model_flops_per_step': model_flops,
    'model_flops_source': (
      'analytic' if analytic is not None else 'xla' if xla_global is not None else None
    ),
    'analytic_flops_per_step': analytic,
    'xla_flops_per_device': per_device,
    'xla_flops_per_step': xla_global,
    'analytic_over_xla': analytic / xla_global if analytic and xla_global else None,
    'model_flops_per_s': model_rate,
    'peak_flops_per_device': peak_value,
    'peak_units': units,
    'peak_source': peak_source,
    'mfu': model_rate / (peak_value * units) if model_rate and peak_value else None,
  }
