"""What the benchmarks share: machine info, one fresh subprocess per measurement, interleaved rounds.

A benchmark script runs itself with `--worker NAME ...` (`sys.executable` and the script's absolute
path, in the caller's current directory); the worker prints one line `RESULT {json}` that
`run_worker` parses. Nothing here depends on where the repository is: bigjax is imported as an
installed package and its configs are loaded by bare name.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys


def version(pkg):
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def machine_info():
  """Versions, core count, CPU model and ISA, load average: the lines every result table needs."""
  cpu = next(
    (l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
    platform.processor() or '?',
  )
  flags = next((l for l in open('/proc/cpuinfo') if l.startswith('flags')), '').split()
  isa = ','.join(f for f in ('avx2', 'avx512f', 'amx_tile') if f in flags) or 'no avx2'
  info = (
    f'python {platform.python_version()}, jax {version("jax")}, jaxlib {version("jaxlib")}, '
    f'flax {version("flax")}, optax {version("optax")}, torch {version("torch")}, '
    f'numpy {version("numpy")}\nnproc {len(os.sched_getaffinity(0))}, CPU: {cpu} ({isa}), '
    f'load average at start {os.getloadavg()[0]:.2f}'
  )
  if os.getloadavg()[0] > 0.5:
    info += '\nWARNING: the machine is busy; the numbers will be noisy (torch eager most of all)'
  return info


def run_worker(script, name, *args):
  """Runs `python script --worker name *args` in a fresh process; returns its RESULT dict."""
  cmd = [sys.executable, os.path.abspath(script), '--worker', name, *map(str, args)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    sys.exit(
      f'{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
    )
  return json.loads(lines[-1][len('RESULT ') :])


def worker_result(result):
  """Prints a worker's result in the form run_worker reads."""
  print('RESULT ' + json.dumps(result), flush=True)
