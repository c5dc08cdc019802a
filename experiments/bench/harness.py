"""What the benchmarks share: machine info, one fresh subprocess per measurement, interleaved rounds,
and the output copied to a results file (`--out`).

A benchmark script runs itself with `--worker NAME ...` (`sys.executable` and the script's absolute
path, in the caller's current directory); the worker prints one line `RESULT {json}` that
`run_worker` parses. Nothing here depends on where the repository is: bigjax is imported as an
installed package and its configs are loaded by bare name.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# CPU flags worth a line in every result: vector width, bf16/int8 dot products, AMX tiles.
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile', 'amx_bf16')


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
  isa = ','.join(f for f in ISA_FLAGS if f in flags) or 'no avx2'
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


def default_out(name, device='cpu'):
  """experiments/bench/results/<name>_<device>_<YYYY-MM-DD>.md."""
  return os.path.join(RESULTS_DIR, f'{name}_{device}_{datetime.date.today().isoformat()}.md')


def add_out_flag(parser, name, device='cpu'):
  """--out [FILE]: also write the output to FILE (default results/<name>_<device>_<date>.md)."""
  parser.add_argument(
    '--out',
    nargs='?',
    const=default_out(name, device),
    default='',
    help=f'also write the output to FILE (no FILE: {os.path.relpath(default_out(name, device))})',
  )


class Output:
  """Prints lines and, with a path, also writes them there when closed (the command line first,
  in a code block), so a results file holds exactly what the run printed."""

  def __init__(self, path=''):
    self.path, self.lines = path, []

  def print(self, text='', flush=True):
    print(text, flush=flush)
    self.lines.append(str(text))

  def close(self):
    if not self.path:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    command = ' '.join(['python', os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    with open(self.path, 'w', encoding='utf-8') as f:
      f.write(f'```\n{command}\n```\n\n' + '\n'.join(self.lines) + '\n')
    print(f'wrote {self.path}')
