"""`bigjax-train --config=... --dry_run`: what a run would be, without running or writing anything.

Prints the resolved config (every field, after overrides), the facts derived from the data, the
parameter count with a per-module table, the mesh, and the per-device memory of the train step
compiled ahead of time.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from bigjax import compile as compile_lib
from bigjax import config_lib, experiment
from bigjax import mesh as mesh_lib


def parameter_table(params) -> tuple[int, list[str]]:
  """(total parameter count, lines of a per-module table: module path, parameters, shapes)."""
  rows: dict[str, list] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, 'key', str(k)) for k in path]
    module = '/'.join(str(k) for k in keys[:-1]) or '(root)'
    entry = rows.setdefault(module, [0, []])
    entry[0] += int(np.prod(leaf.shape))
    entry[1].append(f'{keys[-1]}{tuple(leaf.shape)}')
  total = sum(n for n, _ in rows.values())
  width = max(len(m) for m in rows) if rows else 6
  lines = [f'{"module":<{width}}  {"params":>12}  shapes']
  lines += [f'{m:<{width}}  {n:>12,d}  {" ".join(s)}' for m, (n, s) in rows.items()]
  lines.append(f'{"total":<{width}}  {total:>12,d}')
  return total, lines


def run(config) -> None:
  """Prints the resolved config, parameter count and per-module table, the mesh and the per-device
  memory of the AOT-compiled train step. Writes nothing."""

  exp = experiment.build(config)
  print('config (after overrides; every field can be set with --config.FIELD=VALUE):')
  print('\n'.join(f'  {k} = {v!r}' for k, v in config_lib.flat_fields(config.to_dict()).items()))
  facts = {k: v for k, v in dataclasses.asdict(exp.data).items() if v not in (None, ())}
  derived = {
    k: v
    for k, v in experiment.model_kwargs(config.model, exp.data, exp.task).items()
    if k not in config.model.kwargs
  }
  print(
    f'derived from the data: {facts}; model fields filled from it: {derived}; task output '
    f'size {exp.task.output_size}'
  )
  total, lines = parameter_table(exp.abstract.params)
  print(f'parameters: {total:,d}')
  print('\n'.join(lines))
  print(
    f'mesh: {mesh_lib.layout(exp.mesh)} over {exp.mesh.size} {jax.devices()[0].platform} devices'
  )
  compile_lib.print_memory(exp.compile_train_step())
