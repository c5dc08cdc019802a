"""Compile a config's train step for N (fake CPU) devices and report memory and FLOPs per device.

  bigjax-compile --config=NAME[:args] --devices=N [--config.x=v ...] [--memory_limit_gb=G]

Checks that a config and mesh fit before a run, without the hardware: builds the Experiment as
`bigjax-train` does (the same flags and config parsing, so every override and error is the
same), AOT-compiles its train step on N CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu) and prints the mesh, XLA's
per-device memory of the compiled step (arguments, outputs, aliased by donation, temporaries,
generated code, total), the train state's bytes per device (bigjax.mesh.describe) and the FLOPs
of one step (analytic and XLA's; see bigjax/flops/ for what each counts).

Memory is XLA:CPU's buffer assignment: a GPU/TPU compile fuses differently, so its temporaries
differ (mostly fewer); arguments and outputs (the sharded train state and batch) are the same.
The data set is read (for the batch shapes and checks) but nothing is written: no workdir.
Exit status: 0; 1 when --memory_limit_gb is given and the per-device total exceeds it; 2 for
invalid input (one line, as bigjax.train). cudnn attention needs a GPU and cannot be compiled here.
"""

from collections.abc import Sequence
import os
import re
import sys
import time
from typing import Any

from bigjax import cli
from bigjax.errors import UserError


def _devices_from_argv(argv: Sequence[str]) -> int:
  """The --devices=N value, read before jax is imported (it fixes the CPU device count)."""
  for arg in argv[1:]:
    if arg == '--devices':
      raise UserError('--devices needs a value: --devices=N')
    if arg.startswith('--devices='):
      value = arg.split('=', 1)[1]
      try:
        devices = int(value)
      except ValueError:
        devices = 0
      if devices < 1:
        raise UserError(
          f'--devices={value} must be a positive integer (the number of CPU devices to compile for)'
        )
      return devices
  return 1


def _set_cpu_devices(n: int) -> None:
  """Makes jax (not imported yet) see n CPU devices and no accelerator."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags.strip()} --xla_force_host_platform_device_count={n}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def memory_report(compiled: Any) -> dict[str, int] | None:
  """Per-device bytes of a compiled step -> dict: argument, output, alias (outputs that reuse a
  donated argument's buffer), temp, generated_code and total = argument + output - alias + temp +
  generated_code (what the device holds while the step runs). None if XLA gives no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without the analysis raise)
    return None
  if m is None:
    return None
  out = {
    'argument': m.argument_size_in_bytes,
    'output': m.output_size_in_bytes,
    'alias': m.alias_size_in_bytes,
    'temp': m.temp_size_in_bytes,
    'generated_code': m.generated_code_size_in_bytes,
  }
  out = {k: int(v) for k, v in out.items()}
  out['total'] = (
    out['argument'] + out['output'] - out['alias'] + out['temp'] + out['generated_code']
  )
  return out


def _mib(b: int) -> str:
  return f'{b:>15,d} B  {b / 2**20:10.2f} MiB'


def print_memory(compiled: Any) -> dict[str, int] | None:
  """Prints the per-device memory table of a compiled step; returns memory_report(compiled)."""
  memory = memory_report(compiled)
  if memory is None:
    print('per-device memory: XLA gives no memory analysis for this backend')
    return None
  print('per-device memory of the train step (XLA memory_analysis):')
  for key, label in (
    ('argument', 'arguments'),
    ('output', 'outputs'),
    ('alias', '- aliased (donated)'),
    ('temp', 'temporaries'),
    ('generated_code', 'generated code'),
    ('total', 'total'),
  ):
    print(f'  {label:20s} {_mib(memory[key])}')
  return memory


def _main(argv: Sequence[str]) -> int:
  """Parses argv, compiles, prints the report; returns the exit status (0 or 1)."""
  devices = _devices_from_argv(argv)
  _set_cpu_devices(devices)
  parser = cli.Parser('bigjax-compile', __doc__, with_config=True)
  parser.integer('devices', 1, 'Number of (fake) CPU devices to compile for.')
  parser.float('memory_limit_gb', None, 'Exit 1 when the per-device total exceeds this many GiB.')
  if any(a.startswith('--workdir') for a in argv[1:]):
    raise UserError('--workdir: bigjax-compile writes nothing and takes no workdir; drop it')
  fv = parser.parse(argv)
  limit, config = fv.memory_limit_gb, fv.config
  if limit is not None and not limit > 0:
    raise UserError(f'--memory_limit_gb={limit} must be a positive number of GiB (2**30 bytes)')
  import jax

  from bigjax import experiment
  from bigjax import flops as flops_lib
  from bigjax import mesh as mesh_lib

  if len(jax.devices()) != devices:
    raise UserError(
      f'--devices={devices}: jax sees {len(jax.devices())} devices (jax was imported '
      'before XLA_FLAGS was set); run bigjax-compile in a fresh process'
    )
  exp = experiment.build(config)
  t0 = time.time()
  compiled = exp.compile_train_step()
  compile_s = time.time() - t0
  _, state_bytes = mesh_lib.describe(exp.abstract, exp.shardings)
  analytic = flops_lib.analytic_train_flops(exp)
  per_device = flops_lib.xla_flops(compiled)

  print(
    f'bigjax.compile: {config.model.name} on {config.data.name}, batch {config.batch_size}, '
    f'{devices} CPU devices, mesh {dict(exp.mesh.shape)}, train step compiled in '
    f'{compile_s:.1f} s'
  )
  print(
    f'train state per device (bigjax.mesh.describe): {state_bytes:,d} B '
    f'({state_bytes / 2**20:.2f} MiB)'
  )
  memory = print_memory(compiled)
  shape = flops_lib.transformer_shape(exp)
  what = (
    f'6*N*tokens + 12*L*T*d*tokens, L={shape[1]} T={shape[2]} d={shape[3]}'
    if shape
    else 'none for this model'
  )
  print(
    f'FLOPs per step: analytic {analytic:.4g} ({what})'
    if analytic
    else f'FLOPs per step: analytic: {what}'
  )
  if per_device is None:
    print('FLOPs per step: XLA: no cost analysis')
  else:
    line = (
      f'FLOPs per step: XLA {per_device * exp.mesh.size:.4g} ({per_device:.4g} per device '
      f'x {exp.mesh.size} devices)'
    )
    if analytic:
      line += f'; analytic / XLA = {analytic / (per_device * exp.mesh.size):.3f}'
    print(line)
  if limit is not None and memory is not None and memory['total'] > limit * 2**30:
    print(
      f'bigjax: per-device memory total {memory["total"]:,d} B '
      f'({memory["total"] / 2**30:.3f} GiB) exceeds --memory_limit_gb={limit:g}; shard more '
      '(config.mesh.fsdp / tensor), lower config.batch_size or use remat',
      file=sys.stderr,
    )
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2; over the memory limit exits 1."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
