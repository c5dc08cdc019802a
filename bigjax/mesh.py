"""Device mesh and shardings from the config.

The mesh has axes ('data', 'fsdp', 'tensor'); `config.mesh.<axis>` gives each size, -1 meaning
"all remaining devices". For several nodes / slices, `config.mesh.dcn_<axis>` splits an axis across
them too (size <axis> x dcn_<axis>, a hybrid ICI x DCN mesh; see `mesh_shapes`, `device_grid`).
Parameters carry logical axis names (see `bigjax.models.layers`); `config.sharding_rules` maps
each logical name to mesh axes, e.g. ('mlp', 'tensor'). A logical axis whose size the mapped mesh
axes do not divide is left unsharded on that dimension (a 3-channel conv input cannot be split in
two), so one rule table serves every model size.
"""

import math
import os

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from bigjax.errors import UserError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both


def initialize_distributed(cfg):
  """Joins a multi-process run before any device is touched (no-op for a single process).

  cfg = config.distributed: coordinator_address ('host:port'), num_processes and process_id give
  an explicit cluster (e.g. several processes on one machine, or clusters without a scheduler jax
  knows); auto=True lets `jax.distributed.initialize()` read TPU pod / SLURM / MPI environments.
  One of several tasks of a SLURM job step (`srun`, bigjax-launch) needs neither: jax reads the
  coordinator (the step's first node), the number of processes and this one's id from SLURM.
  timeout_s bounds the wait for peers: a missing peer fails the run instead of hanging it.
  """
  if jax.distributed.is_initialized():
    return
  # XLA aborts every process after its heartbeat timeout; bigjax's PeerWatch reports a lost peer
  # with one line after peer_timeout_s, so XLA's comes well after it.
  timeouts = dict(
    initialization_timeout=cfg.timeout_s, heartbeat_timeout_seconds=int(2 * cfg.peer_timeout_s + 30)
  )
  if cfg.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      **timeouts,
    )
  elif cfg.auto or in_slurm_step_of_several_tasks():
    jax.distributed.initialize(**timeouts)


def in_slurm_step_of_several_tasks() -> bool:
  """Whether this process is one task of a SLURM job step (srun) with more than one task: the
  variables jax's SLURM cluster detection reads are set (a batch script has no SLURM_STEP_NODELIST;
  a one-task step needs no distributed initialisation)."""
  env = os.environ
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
  return all(k in env for k in needed) and int(env.get('SLURM_NTASKS', '1')) > 1


def _resolve(sizes, num_devices, devices_text):
  """Resolves {axis: size} (-1 = the rest) against `num_devices` -> tuple of 3 ints.

  devices_text names the devices in messages ('8 devices', 'the 4 devices per process')."""
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise UserError(f'config.mesh: only one axis may be -1, got {", ".join(rest)}')
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise UserError(f'config.mesh.{a}={s} must be a positive size or -1 (all remaining devices)')
  known = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % known:
    bad = [a for a in AXES if sizes[a] > 1 and num_devices % sizes[a]]
    what = (
      f'config.mesh.{bad[0]}={sizes[bad[0]]}'
      if bad
      else 'config.mesh ' + ' x '.join(f'{a}={sizes[a]}' for a in AXES if sizes[a] != -1)
    )
    raise UserError(
      f'{what} does not divide {devices_text}; choose mesh sizes whose '
      f'product divides {num_devices}'
    )
  if rest:
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise UserError(
      f'config.mesh sizes {sizes} use {known} of {devices_text}; set one axis to -1 to use the rest'
    )
  return tuple(sizes[a] for a in AXES)


def _plural(granule):
  return {'process': 'processes', 'slice': 'slices'}.get(granule, granule + 's')


def mesh_shapes(cfg, num_devices, num_granules=1, granule='process'):
  """Resolves config.mesh against `num_devices` spread over `num_granules` equal granules
  (processes, or slices on multi-slice TPU) -> (ici_shape, dcn_shape), 3-tuples in AXES order.

  The mesh axis sizes are ici * dcn. With every dcn_* size 1 the mesh is one flat grid over all
  devices (ici_shape resolved against num_devices, whatever the number of granules); otherwise
  the dcn_* sizes must multiply to num_granules and the intra sizes (-1 = the rest) are resolved
  against the devices per granule.
  """
  sizes = {a: int(cfg[a]) for a in AXES}
  dcn = {a: int(cfg[f'dcn_{a}']) for a in AXES}
  for a, s in dcn.items():
    if s < 1:
      raise UserError(
        f'config.mesh.dcn_{a}={s} must be a positive number of {_plural(granule)} '
        f'(1 = not split across {_plural(granule)})'
      )
  num_dcn = math.prod(dcn.values())
  if num_dcn == 1:
    return _resolve(sizes, num_devices, f'{num_devices} devices'), (1,) * len(AXES)
  if num_dcn != num_granules:
    product = ' x '.join(f'dcn_{a}={dcn[a]}' for a in AXES)
    raise UserError(
      f'config.mesh {product} = {num_dcn} must equal the number of '
      f'{_plural(granule)} ({num_granules}); set the dcn_* sizes to multiply to '
      f'{num_granules}, or all to 1 for one flat mesh'
    )
  if num_devices % num_granules:
    raise UserError(
      f'config.mesh.dcn_*: {num_devices} devices do not split evenly over '
      f'{num_granules} {_plural(granule)}; set all dcn_* sizes to 1 for one flat '
      'mesh'
    )
  per = num_devices // num_granules
  return _resolve(sizes, per, f'the {per} devices per {granule}'), tuple(dcn[a] for a in AXES)


def mesh_shape(cfg, num_devices, num_granules=1, granule='process'):
  """Resolves config.mesh (see mesh_shapes) -> the mesh's tuple of 3 axis sizes (ici x dcn)."""
  ici, dcn = mesh_shapes(cfg, num_devices, num_granules, granule)
  return tuple(i * d for i, d in zip(ici, dcn))


def granules(devices):
  """-> (kind, groups): the devices grouped by slice ('slice', when the devices have slice_index
  attributes naming more than one slice: multi-slice TPU) or else by process ('process'; jax 0.10.2
  also gives CPU devices of a multi-process run slice_index 0), groups ordered by index."""
  slices = {getattr(d, 'slice_index', None) for d in devices}
  kind = 'slice' if None not in slices and len(slices) > 1 else 'process'
  key = 'slice_index' if kind == 'slice' else 'process_index'
  groups = {}
  for d in devices:
    groups.setdefault(getattr(d, key), []).append(d)
  return kind, [groups[k] for k in sorted(groups)]


def device_grid(cfg, devices):
  """np.ndarray of `devices` shaped by config.mesh (axes AXES).

  All dcn_* sizes 1: `create_device_mesh` over all devices. Otherwise a hybrid mesh
  (`create_hybrid_device_mesh`): along each axis the dcn factor is the outer one, so every slice /
  process holds a contiguous block of ici_shape devices, and only dcn-split axes communicate
  across slices / processes.
  """
  kind, groups = granules(devices)
  ici, dcn = mesh_shapes(cfg, len(devices), len(groups), kind)
  if math.prod(dcn) == 1:
    try:
      return jax.experimental.mesh_utils.create_device_mesh(ici, devices)
    except Exception:  # pylint: disable=broad-except  (odd topologies: fall back to device order)
      return np.asarray(devices).reshape(ici)
  counts = sorted({len(g) for g in groups})
  if len(counts) > 1:
    raise UserError(
      f'config.mesh.dcn_*: the {_plural(kind)} hold different numbers of devices '
      f'({", ".join(map(str, counts))}); set all dcn_* sizes to 1 for one flat mesh'
    )
  try:
    return jax.experimental.mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=kind == 'process'
    )
  except Exception:  # pylint: disable=broad-except  (odd topologies: each granule in device order)
    blocks = np.empty(dcn, dtype=object)
    for i, g in enumerate(groups):
      blocks.flat[i] = np.asarray(g).reshape(ici)
    return np.block(blocks.tolist())


def make_mesh(cfg, devices=None):
  """Mesh over `devices` (default: all) with axes AXES shaped by config.mesh (see device_grid)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(device_grid(cfg, devices), AXES)


def layout(mesh):
  """One line naming each axis size and how it spans slices / processes, e.g.
  'data=8 (4 per process x 2 processes), fsdp=1, tensor=1'."""
  grid = mesh.devices
  kind, groups = granules(list(grid.flat))
  key = 'slice_index' if kind == 'slice' else 'process_index'
  ids = np.vectorize(lambda d: getattr(d, key), otypes=[int])(grid)
  parts = []
  for k, a in enumerate(mesh.axis_names):
    size = grid.shape[k]
    across = len(set(np.moveaxis(ids, k, 0).reshape(size, -1)[:, 0].tolist()))
    if len(groups) == 1 or across == 1:
      parts.append(f'{a}={size}')
    elif across == size:
      parts.append(f'{a}={size} (across {across} {_plural(kind)})')
    else:
      parts.append(f'{a}={size} ({size // across} per {kind} x {across} {_plural(kind)})')
  return ', '.join(parts)


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
  """Sharding report of a train state: the mesh layout ('mesh: ...', see `layout`), one line per
  parameter (path, shape, PartitionSpec, bytes per device), then the per-device bytes of the
  parameters and of the whole state.

  abstract_state/shardings: matching trees (ShapeDtypeStructs or arrays, and NamedShardings).
  Returns (lines, state_bytes_per_device).
  """

  def per_device(x, s):
    return math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize

  meshes = [s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)]
  lines = [f'mesh: {layout(meshes[0])}'] if meshes else []
  flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings.params)):
    lines.append(
      f'{jax.tree_util.keystr(path):64s} {str(x.shape):20s} {str(s.spec):36s} '
      f'{per_device(x, s):>12,d} B'
    )
  param_bytes = sum(
    jax.tree.leaves(jax.tree.map(per_device, abstract_state.params, shardings.params))
  )
  state_bytes = sum(jax.tree.leaves(jax.tree.map(per_device, abstract_state, shardings)))
  lines.append(
    f'parameters: {param_bytes:,d} B per device; train state (parameters, optimizer '
    f'and model state): {state_bytes:,d} B per device'
  )
  return lines, state_bytes
