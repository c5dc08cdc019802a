"""FLOPs of a training step, device peaks, and model FLOPs utilisation (MFU).

  flops = analytic_train_flops(exp)                  # model FLOPs of one step, global batch
  report = throughput_report(exp, compiled, train_s, timed_steps)   # step time, tokens/s, MFU...

Conventions (all counts are FLOPs = floating-point operations; one multiply-add is 2 FLOPs):
  * Model FLOPs of a step are those of the model alone, forward + backward = 3x forward, for the
    global batch. Recomputation (remat), the optimizer update and elementwise work are not counted,
    as in the usual MFU definition (PaLM, appendix B). Each model family provides its own count
    (`Model.train_flops_per_example`, see `counting`); bigjax.flops imports no model class. For the
    transformers (bigjax.models gpt, bert, vit): 6 * N * tokens + 12 * L * T * d * tokens, where N
    counts the parameters that multiply every token (lookup tables such as position embeddings are
    left out), T is the sequence length the model sees, d = embed_dim, L = num_layers,
    tokens = batch * T; the second term is attention's scores and weighted sum with no saving from
    causal masking. Models without a count report None (the report then uses XLA's count).
  * XLA's count (`xla_flops`) is what XLA's cost analysis reports for the compiled program. On a
    mesh that program is the SPMD-partitioned program of ONE device, so `xla_flops` is per device;
    `throughput_report` multiplies it by the number of devices for a global figure, which counts
    replicated work (the optimizer update of replicated parameters, the loss) once per device. XLA
    counts every floating-point op (elementwise, optimizer, recomputation), counts a while loop's
    body ONCE whatever its trip count (so `scan=True` and `grad_accum_steps > 1` under-count by
    about the number of iterations), and counts custom calls (cuDNN attention) as zero.
  * Peaks (`PEAK_FLOPS_PER_DEVICE`, `peaks`) are dense (no sparsity) bfloat16 tensor-core / MXU
    peaks: MFU of a float32 model on a GPU/TPU is measured against the bf16 peak too. On CPU the
    peak is a measured float32 2048^3 jax matmul of the whole host (`cpu_matmul_peak`), not a
    datasheet value.

Modules: `counting` (analytic and XLA counts), `peaks` (peak table, CPU measurement and cache),
`report` (throughput_report).
"""

from bigjax.flops import counting, peaks
from bigjax.flops.counting import (
  LOOKUP_TABLES,
  PER_EXAMPLE_HEADS,
  analytic_train_flops,
  param_count,
  transformer_shape,
  transformer_train_flops,
  xla_flops,
)
from bigjax.flops.peaks import (
  CPU_MATMUL_N,
  CPU_PEAK_ENV,
  PEAK_FLOPS_PER_DEVICE,
  cpu_matmul_peak,
  cpu_peak_cache_path,
  cpu_peak_key,
  match_device_kind,
  measure_matmul,
  peak_flops,
  peak_units,
)
from bigjax.flops.report import throughput_report

__all__ = [
  'CPU_MATMUL_N',
  'CPU_PEAK_ENV',
  'LOOKUP_TABLES',
  'PEAK_FLOPS_PER_DEVICE',
  'PER_EXAMPLE_HEADS',
  'analytic_train_flops',
  'counting',
  'cpu_matmul_peak',
  'cpu_peak_cache_path',
  'cpu_peak_key',
  'match_device_kind',
  'measure_matmul',
  'param_count',
  'peak_flops',
  'peak_units',
  'peaks',
  'throughput_report',
  'transformer_shape',
  'transformer_train_flops',
  'xla_flops',
]
