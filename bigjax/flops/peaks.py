"""Peak FLOP/s of a device: a datasheet table for GPUs/TPUs, a measured (and cached) matmul peak
for CPUs, and how many peak units a mesh offers.

Peaks (`PEAK_FLOPS_PER_DEVICE`) are dense (no sparsity) bfloat16 tensor-core / MXU peaks: MFU of a
float32 model on a GPU/TPU is measured against the bf16 peak too. On CPU the peak is a measured
float32 2048^3 jax matmul of the whole host (`cpu_matmul_peak`), not a datasheet value.
"""

import json
import os
import platform
import time
from typing import Any

import numpy as np

from bigjax.errors import UserError
from bigjax.reporting import write_atomic

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

Peak = tuple[float | None, str]  # (FLOP/s per device or None, where it came from)


def match_device_kind(kind: str) -> str | None:
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


def cpu_peak_cache_path() -> str:
  """~/.cache/bigjax/cpu_matmul_peak.json: {key: {'flops', 'median_flops', 'best_flops', ...}}."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'bigjax', 'cpu_matmul_peak.json')


def cpu_peak_key() -> str:
  """The cache key: CPU model, usable cores and jax version (a change of any re-measures)."""
  import jax

  return f'{_cpu_model()} | {_num_cores()} cores | jax {jax.__version__}'


def measure_matmul(n: int = CPU_MATMUL_N, reps: int = 5) -> dict[str, float]:
  """Times a float32 (n, n) @ (n, n) jax matmul on the default device: 2 warm-ups, then `reps`
  timed calls.

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
  return {
    'median_flops': 2.0 * n**3 / float(np.median(times)),
    'best_flops': 2.0 * n**3 / min(times),
  }


def _read_cache(path):
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    return {}
  return cache if isinstance(cache, dict) else {}


def _write_cache(path, cache):
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(cache, indent=1))
  except OSError:
    pass  # read-only home: measure again next time


def cpu_matmul_peak() -> tuple[float, str]:
  """The host's float32 matmul FLOP/s (median of a 2048^3 jax matmul) -> (flops, source).

  Measured once (about a second) and cached in cpu_peak_cache_path() under cpu_peak_key(), so later
  runs read it. BIGJAX_CPU_PEAK_FLOPS=<FLOP/s> overrides both. Measure on a quiet machine: a busy
  one caches a low peak (the entry records the load average; delete the file to re-measure).
  """
  override = os.environ.get(CPU_PEAK_ENV)
  if override:
    try:
      value = float(override)
    except ValueError:
      value = -1.0
    if not value > 0:
      raise UserError(
        f'{CPU_PEAK_ENV}={override!r} must be a positive number of FLOP/s, e.g. '
        '1.3e11; fix or unset it'
      )
    return value, f'{CPU_PEAK_ENV}={override}'
  path, key = cpu_peak_cache_path(), cpu_peak_key()
  cache = _read_cache(path)
  entry = cache.get(key)
  cached = entry.get('flops') if isinstance(entry, dict) else None
  if isinstance(cached, (int, float)) and cached > 0:
    return float(cached), f'float32 {CPU_MATMUL_N}^3 jax matmul on {key}, cached in {path}'
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  measured = measure_matmul()
  cache[key] = dict(
    measured,
    flops=measured['median_flops'],
    n=CPU_MATMUL_N,
    load_average=load,
    measured_at=time.strftime('%Y-%m-%dT%H:%M:%S'),
  )
  _write_cache(path, cache)
  busy = f' at load average {load:.2f} (busy: may be low)' if load and load > 0.5 else ''
  return (
    measured['median_flops'],
    f'float32 {CPU_MATMUL_N}^3 jax matmul on {key}, measured now{busy}, cached in {path}',
  )


def peak_flops(device: Any = None) -> Peak:
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
    return None, (
      f'unknown device kind {device.device_kind!r}: no peak in bigjax.flops.PEAK_FLOPS_PER_DEVICE'
    )
  return PEAK_FLOPS_PER_DEVICE[name], f'dense bf16 peak of {name} (datasheet)'


def peak_units(mesh: Any) -> int:
  """How many times the per-device peak a `jax.sharding.Mesh` offers: its devices on GPU/TPU, its
  hosts (processes) on CPU, whose measured peak covers all of a host's (possibly fake) devices."""
  devices = list(mesh.devices.flat)
  if devices[0].platform == 'cpu':
    return len({d.process_index for d in devices})
  return len(devices)
