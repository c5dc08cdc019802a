"""Device mesh and shardings from the config.

The mesh has axes ('data', 'fsdp', 'tensor'); `config.mesh.<axis>` gives each size, -1 meaning
"all remaining devices". Parameters carry logical axis names (see `bigjax.models.layers`);
`config.sharding_rules` maps each logical name to mesh axes, e.g. ('mlp', 'tensor'). A logical axis
whose size the mapped mesh axes do not divide is left unsharded on that dimension (a 3-channel conv
input cannot be split in two), so one rule table serves every model size.
"""
import math

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigjax.errors import UserError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both


def initialize_distributed(cfg):
  """Joins a multi-process run before any device is touched (no-op for a single process).

  cfg = config.distributed: coordinator_address ('host:port'), num_processes and process_id give
  an explicit cluster (e.g. several processes on one machine, or clusters without a scheduler jax
  knows); auto=True lets `jax.distributed.initialize()` read TPU pod / SLURM / MPI environments.
  timeout_s bounds the wait for peers: a missing peer fails the run instead of hanging it.
  """
  if jax.distributed.is_initialized():
    return
  if cfg.get('coordinator_address'):
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id,
                               initialization_timeout=cfg.get('timeout_s', 300))
  elif cfg.get('auto', False):
    jax.distributed.initialize(initialization_timeout=cfg.get('timeout_s', 300))


def mesh_shape(cfg, num_devices):
  """Resolves config.mesh sizes (-1 = the rest) against `num_devices` -> tuple of 3 ints."""
  sizes = {a: int(cfg.get(a, 1)) for a in AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise UserError(f'config.mesh: only one axis may be -1, got {", ".join(rest)}')
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise UserError(f'config.mesh.{a}={s} must be a positive size or -1 (all remaining devices)')
  known = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % known:
    bad = [a for a in AXES if sizes[a] > 1 and num_devices % sizes[a]]
    what = f'config.mesh.{bad[0]}={sizes[bad[0]]}' if bad else \
        'config.mesh ' + ' x '.join(f'{a}={sizes[a]}' for a in AXES if sizes[a] != -1)
    raise UserError(f'{what} does not divide {num_devices} devices; choose mesh sizes whose '
                    f'product divides {num_devices}')
  if rest:
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise UserError(f'config.mesh sizes {sizes} use {known} of {num_devices} devices; set one axis '
                    'to -1 to use the rest')
  return tuple(sizes[a] for a in AXES)


def make_mesh(cfg, devices=None):
  """Mesh over `devices` (default: all) with axes AXES shaped by config.mesh."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  try:
    device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  (odd topologies: fall back to device order)
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, AXES)


def data_parallel_size(mesh):
  """Number of ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh):
  """Sharding of a batch leaf (B, ...): B split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def _rule_table(rules):
  table = {}
  for logical, axes in rules:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    table.setdefault(logical, []).append(axes)
  return table


def spec_for(names, shape, mesh, rules):
  """PartitionSpec for an array of `shape` whose dimensions have logical `names`.

  For each dimension the first rule whose mesh axes are unused so far and whose size divides the
  dimension wins; otherwise the dimension is replicated.
  """
  table, used, spec = _rule_table(rules), set(), []
  for name, dim in zip(names, shape):
    choice = None
    for axes in table.get(name, []):
      size = math.prod(mesh.shape[a] for a in axes)
      if axes and not used & set(axes) and dim % size == 0:
        choice = axes
        break
    if choice:
      used |= set(choice)
      spec.append(choice[0] if len(choice) == 1 else choice)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(boxed_tree, mesh, rules):
  """NamedShardings for a tree from `jax.eval_shape(model.init, ...)`.

  Leaves boxed in nn.LogicallyPartitioned follow their names; plain leaves (BatchNorm statistics,
  step counters) are replicated. Returns an unboxed tree of NamedSharding.
  """
  def leaf(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for(x.names, x.value.shape, mesh, rules))
    return replicated(mesh)
  return jax.tree.map(leaf, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def describe(abstract_state, shardings):
  """Sharding report of a train state: one line per parameter (path, shape, PartitionSpec, bytes
  per device), then the per-device bytes of the parameters and of the whole state.

  abstract_state/shardings: matching trees (ShapeDtypeStructs or arrays, and NamedShardings).
  Returns (lines, state_bytes_per_device).
  """
  def per_device(x, s):
    return math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize

  lines = []
  flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings.params)):
    lines.append(f'{jax.tree_util.keystr(path):64s} {str(x.shape):20s} {str(s.spec):36s} '
                 f'{per_device(x, s):>12,d} B')
  param_bytes = sum(jax.tree.leaves(jax.tree.map(per_device, abstract_state.params,
                                                 shardings.params)))
  state_bytes = sum(jax.tree.leaves(jax.tree.map(per_device, abstract_state, shardings)))
  lines.append(f'parameters: {param_bytes:,d} B per device; train state (parameters, optimizer '
               f'and model state): {state_bytes:,d} B per device')
  return lines, state_bytes
