"""FLOPs of a training step, device peaks, and model FLOPs utilisation (MFU).

  flops = analytic_train_flops(exp)                  # model FLOPs of one step, global batch
  report = throughput_report(exp, compiled, train_s, timed_steps)   # step time, tokens/s, MFU...

Conventions (all counts are FLOPs = floating-point operations; one multiply-add is 2 FLOPs):
  * Model FLOPs of a step are those of the model alone, forward + backward = 3x forward, for the
    global batch. Recomputation (remat), the optimizer update and elementwise work are not counted,
    as in the usual MFU definition (PaLM, appendix B). For the transformers (bigjax.models gpt,
    bert, vit): 6 * N * tokens + 12 * L * T * d * tokens, where N counts the parameters that
    multiply every token (lookup tables such as position embeddings are left out), T is the
    sequence length the model sees, d = embed_dim, L = num_layers, tokens = batch * T; the second
    term is attention's scores and weighted sum with no saving from causal masking.
  * XLA's count (`xla_flops`) is what XLA's cost analysis reports for the compiled program. On a
    mesh that program is the SPMD-partitioned program of ONE device, so `xla_flops` is per device;
    `throughput_report` multiplies it by the number of devices for a global figure, which counts
    replicated work (the optimizer update of replicated parameters, the loss) once per device. XLA
    counts every floating-point op (elementwise, optimizer, recomputation), counts a while loop's
    body ONCE whatever its trip count (so `scan=True` and `grad_accum_steps > 1` under-count by
    about the number of iterations), and counts custom calls (cuDNN attention) as zero.
  * Peaks (`PEAK_FLOPS_PER_DEVICE`) are dense (no sparsity) bfloat16 tensor-core / MXU peaks: MFU
    of a float32 model on a GPU/TPU is measured against the bf16 peak too. On CPU the peak is a
    measured float32 2048^3 jax matmul of the whole host (`cpu_matmul_peak`), not a datasheet value.
"""
import json
import os
import platform
import time

import numpy as np

# Dense bfloat16 peak FLOP/s per device (chip) from the vendors' datasheets, no sparsity.
PEAK_FLOPS_PER_DEVICE = {
    'H100 SXM': 989.5e12,
    'H100 PCIe': 756e12,
    'H200': 989.5e12,
    'A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6e': 918e12,
}

# (substrings that must all occur in the normalised device kind, PEAK_FLOPS_PER_DEVICE key), most
# specific first. Normalised = lower case without spaces, '-' and '_'; jax reports e.g.
# 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB',
# 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e).
_KIND_PATTERNS = (
    (('h100', 'pcie'), 'H100 PCIe'),
    (('h100',), 'H100 SXM'),
    (('h200',), 'H200'),
    (('a100',), 'A100'),
    (('tpuv5lite',), 'TPU v5e'),
    (('tpuv5e',), 'TPU v5e'),
    (('tpuv6lite',), 'TPU v6e'),
    (('tpuv6e',), 'TPU v6e'),
    (('tpuv5',), 'TPU v5p'),  # 'TPU v5' and 'TPU v5p' (after the lite / e kinds above)
    (('tpuv4',), 'TPU v4'),
)

CPU_PEAK_ENV = 'BIGJAX_CPU_PEAK_FLOPS'
CPU_MATMUL_N = 2048


# ----------------------------------------------------------------------------------------------
# Model FLOPs
# ----------------------------------------------------------------------------------------------
def _count(tree):
  import jax
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def transformer_shape(exp):
  """(kind, L, T, d, patches) of a gpt/bert/vit Experiment, or None for other models.

  T: sequence length the transformer stack sees (ViT: patches + 1 with the class token);
  patches: ViT patches per image (0 otherwise)."""
  from bigjax.models import bert, gpt, vit
  model, inputs = exp.model, exp.sample['inputs']
  if isinstance(model, (gpt.Model, bert.Model)):
    kind = 'gpt' if isinstance(model, gpt.Model) else 'bert'
    return kind, model.num_layers, int(inputs.shape[1]), model.embed_dim, 0
  if isinstance(model, vit.Model):
    patches = (inputs.shape[1] // model.patch_size) * (inputs.shape[2] // model.patch_size)
    return 'vit', model.num_layers, patches + (model.pool == 'cls'), model.embed_dim, patches
  return None


def _param_groups(exp, kind):
  """Parameter counts of a transformer by how often they multiply: (per token, per ViT patch,
  per example). Lookup-only tables (position and segment embeddings, the class token, and BERT's
  token embedding when no MLM head reuses it) multiply nothing and are left out."""
  params = exp.abstract.params
  lookup = {'position_embed', 'segment_embed', 'cls'}
  per_example_names = {'pooler', 'classifier', 'nsp', 'head'}  # run on one vector per example
  if kind == 'bert' and exp.model.head == 'classify':
    lookup.add('embed')  # untied: a lookup, no output matmul
  per_token = per_patch = per_example = 0
  for name, sub in params.items():
    n = _count(sub)
    if name in lookup:
      continue
    if kind == 'vit' and name == 'patch_embed':
      per_patch += n
    elif kind != 'gpt' and name in per_example_names:
      per_example += n
    else:
      per_token += n
  return per_token, per_patch, per_example


def analytic_train_flops(exp):
  """Model FLOPs of one training step (forward + backward = 3x forward) for the global batch.

  gpt/bert/vit: 6 * N * tokens + 12 * L * T * d * tokens with tokens = batch * T, where N counts
  the parameters that act on every token (all but lookup tables: position/segment embeddings, the
  ViT class token, BERT's untied token embedding). Heads that run once per example (BERT pooler,
  classifier and NSP head, ViT head) count 6 * params * batch and the ViT patch embedding
  6 * params * batch * patches instead of per token; for GPT this is exactly 6 * N * tokens with
  N = parameters minus position embeddings. Returns a float, or None for other models.
  """
  shape = transformer_shape(exp)
  if shape is None:
    return None
  kind, layers, t, d, patches = shape
  batch = exp.config.batch_size
  per_token, per_patch, per_example = _param_groups(exp, kind)
  tokens = batch * t
  return float(6 * per_token * tokens + 6 * per_patch * batch * patches + 6 * per_example * batch
               + 12 * layers * t * d * tokens)


def xla_flops(compiled):
  """FLOPs of one call of a jax AOT `Compiled` per XLA's cost analysis, or None if unavailable.

  Per device: on a mesh this is the SPMD-partitioned program of one device (multiply by the
  number of devices for the whole step). A while loop's body (nn.scan, gradient accumulation)
  counts once, whatever its trip count; custom calls (cuDNN attention) count zero.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  if not analysis or analysis.get('flops') is None:
    return None
  flops = float(analysis['flops'])
  return flops if flops > 0 else None


# ----------------------------------------------------------------------------------------------
# Peaks
# ----------------------------------------------------------------------------------------------
def match_device_kind(kind):
  """`jax.Device.device_kind` -> its PEAK_FLOPS_PER_DEVICE key, or None if unknown."""
  norm = ''.join(c for c in str(kind).lower() if c not in ' -_')
  for needles, name in _KIND_PATTERNS:
    if all(n in norm for n in needles):
      return name
  return None


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown cpu'


def _num_cores():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_peak_cache_path():
  """~/.cache/bigjax/cpu_matmul_peak.json: {key: {'flops', 'median_flops', 'best_flops', ...}}."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'bigjax', 'cpu_matmul_peak.json')


def cpu_peak_key():
  """The cache key: CPU model, usable cores and jax version (a change of any re-measures)."""
  import jax
  return f'{_cpu_model()} | {_num_cores()} cores | jax {jax.__version__}'


def measure_matmul(n=CPU_MATMUL_N, reps=5):
  """Times a float32 n^3 jax matmul on the default device: 2 warm-ups, then `reps` timed calls.

  Returns {'median_flops', 'best_flops'} in FLOP/s (2 n^3 FLOPs per matmul)."""
  import jax
  import jax.numpy as jnp
  mm = jax.jit(lambda a, b: a @ b)
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
  for _ in range(2):
    mm(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return {'median_flops': 2.0 * n**3 / float(np.median(times)),
          'best_flops': 2.0 * n**3 / min(times)}


def cpu_matmul_peak():
  """The host's float32 matmul FLOP/s (median of a 2048^3 jax matmul) -> (flops, source).

  Measured once (about a second) and cached in cpu_peak_cache_path() under cpu_peak_key(), so later
  runs read it. BIGJAX_CPU_PEAK_FLOPS=<FLOP/s> overrides both. Measure on a quiet machine: a busy
  one caches a low peak (the entry records the load average; delete the file to re-measure).
  """
  from bigjax.errors import UserError
  override = os.environ.get(CPU_PEAK_ENV)
  if override:
    try:
      value = float(override)
    except ValueError:
      value = -1.0
    if not value > 0:
      raise UserError(f'{CPU_PEAK_ENV}={override!r} must be a positive number of FLOP/s, e.g. '
                      '1.3e11; fix or unset it')
    return value, f'{CPU_PEAK_ENV}={override}'
  path, key = cpu_peak_cache_path(), cpu_peak_key()
  cache = {}
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  if not isinstance(cache, dict):
    cache = {}
  entry = cache.get(key)
  cached = entry.get('flops') if isinstance(entry, dict) else None
  if isinstance(cached, (int, float)) and cached > 0:
    return float(cached), f'float32 {CPU_MATMUL_N}^3 jax matmul on {key}, cached in {path}'
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  measured = measure_matmul()
  cache[key] = dict(measured, flops=measured['median_flops'], n=CPU_MATMUL_N, load_average=load,
                    measured_at=time.strftime('%Y-%m-%dT%H:%M:%S'))
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(cache, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass  # read-only home: measure again next time
  busy = f' at load average {load:.2f} (busy: may be low)' if load and load > 0.5 else ''
  return (measured['median_flops'],
          f'float32 {CPU_MATMUL_N}^3 jax matmul on {key}, measured now{busy}, cached in {path}')


def peak_flops(device=None):
  """Peak FLOP/s of one `device` (default jax.devices()[0]) -> (flops or None, source text).

  GPU/TPU: the dense bf16 datasheet peak of its kind. CPU: cpu_matmul_peak(), which is the whole
  host's (all its CPU devices share those cores). Unknown kinds give (None, 'unknown device kind
  ...')."""
  if device is None:
    import jax
    device = jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_matmul_peak()
  name = match_device_kind(device.device_kind)
  if name is None:
    return None, (f'unknown device kind {device.device_kind!r}: no peak in '
                  'bigjax.flops.PEAK_FLOPS_PER_DEVICE')
  return PEAK_FLOPS_PER_DEVICE[name], f'dense bf16 peak of {name} (datasheet)'


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def peak_units(mesh):
  """How many times the per-device peak the mesh offers: its devices on GPU/TPU, its hosts
  (processes) on CPU, whose measured peak covers all of a host's (possibly fake) devices."""
  devices = list(mesh.devices.flat)
  if devices[0].platform == 'cpu':
    return len({d.process_index for d in devices})
  return len(devices)


def throughput_report(exp, compiled, step_seconds, steps_timed, *, peak=None):
  """Throughput and MFU of training `exp` -> a JSON-ready dict.

  step_seconds: wall seconds of the timed steps ALL TOGETHER (e.g. train.py's train_s);
  steps_timed: how many steps they were. compiled: exp.compile_train_step()'s result, or None.
  peak: (flops per device, source) to use instead of peak_flops(first mesh device).
  Keys: step_time_s, examples_per_s, tokens_per_s (token-sequence models only, else None),
  model_flops_per_step (analytic if known, else XLA's global count), model_flops_source,
  analytic_flops_per_step, xla_flops_per_device, xla_flops_per_step (per device x devices),
  analytic_over_xla, model_flops_per_s, peak_flops_per_device, peak_units, peak_source and
  mfu = model_flops_per_step / step_time_s / (peak * peak_units). Missing values are None.
  """
  devices = exp.mesh.size
  step_time = step_seconds / steps_timed if steps_timed > 0 and step_seconds > 0 else None
  batch = exp.config.batch_size
  inputs = exp.sample['inputs']
  is_tokens = np.issubdtype(inputs.dtype, np.integer) and inputs.ndim == 2
  tokens_per_step = batch * int(inputs.shape[1]) if is_tokens else None
  analytic = analytic_train_flops(exp)
  per_device = xla_flops(compiled) if compiled is not None else None
  xla_global = per_device * devices if per_device is not None else None
  model_flops = analytic if analytic is not None else xla_global
  if peak is None:
    peak = peak_flops(next(iter(exp.mesh.devices.flat)))
  peak_value, peak_source = peak
  units = peak_units(exp.mesh)
  rate = lambda amount: amount / step_time if amount is not None and step_time else None
  model_rate = rate(model_flops)
  return {
      'step_time_s': step_time,
      'steps_timed': steps_timed,
      'examples_per_s': rate(batch),
      'tokens_per_s': rate(tokens_per_step),
      'model_flops_per_step': model_flops,
      'model_flops_source': ('analytic' if analytic is not None else
                             'xla' if xla_global is not None else None),
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
