"""Hybrid (intra-node ICI x inter-node DCN) meshes: config.mesh.dcn_* sizes.

The two-process training run on a hybrid mesh is in tests/test_multiprocess.py.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest

from bigjax import config_lib
from bigjax import mesh as mesh_lib
from bigjax.errors import UserError


def _cfg(**sizes):
  """config.mesh of the base config with `sizes` changed."""
  cfg = config_lib.base_config().mesh
  cfg.update(sizes)
  return cfg


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Enough of a jax device for mesh_utils: id, process and (on multi-slice TPU) slice."""

  id: int
  process_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
  slice_index: int = 0


def _devices(num_processes, per_process, interleave=False):
  """Fake devices, `per_process` on each of `num_processes`; interleave: listed round-robin over
  processes (so device order alone does not group them)."""
  devs = [
    FakeDevice(p * per_process + i, p) for p in range(num_processes) for i in range(per_process)
  ]
  if interleave:
    devs = [devs[p * per_process + i] for i in range(per_process) for p in range(num_processes)]
  return devs


def _processes(grid):
  return np.vectorize(lambda d: d.process_index, otypes=[int])(grid)


def test_default_config_has_dcn_fields():
  assert dict(config_lib.base_config().mesh) == dict(
    data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1
  )


@pytest.mark.parametrize(
  'sizes, num_devices, num_granules, expected',
  [
    # all dcn_* = 1: one flat mesh over every device, however many processes.
    (dict(data=-1, fsdp=2, tensor=2), 8, 1, ((2, 2, 2), (1, 1, 1))),
    (
      dict(data=-1, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1),
      8,
      2,
      ((2, 2, 2), (1, 1, 1)),
    ),
    # -1 is the rest of the devices per granule.
    (dict(data=-1, fsdp=1, tensor=1, dcn_data=2), 8, 2, ((4, 1, 1), (2, 1, 1))),
    (dict(data=2, fsdp=-1, tensor=1, dcn_fsdp=2), 16, 2, ((2, 4, 1), (1, 2, 1))),
    (dict(data=1, fsdp=1, tensor=-1, dcn_data=2, dcn_fsdp=2), 16, 4, ((1, 1, 4), (2, 2, 1))),
    (dict(data=4, fsdp=1, tensor=1, dcn_data=2), 8, 2, ((4, 1, 1), (2, 1, 1))),
    (dict(data=1, fsdp=1, tensor=1, dcn_data=4), 4, 4, ((1, 1, 1), (4, 1, 1))),
  ],
)
def test_mesh_shapes_resolve(sizes, num_devices, num_granules, expected):
  assert mesh_lib.mesh_shapes(_cfg(**sizes), num_devices, num_granules) == expected
  ici, dcn = expected
  assert mesh_lib.mesh_shape(_cfg(**sizes), num_devices, num_granules) == tuple(
    i * d for i, d in zip(ici, dcn)
  )


@pytest.mark.parametrize(
  'sizes, num_devices, num_granules, granule, message',
  [
    (
      dict(dcn_data=0),
      8,
      2,
      'process',
      'config.mesh.dcn_data=0 must be a positive number of processes (1 = not split across '
      'processes)',
    ),
    (
      dict(dcn_tensor=-1),
      8,
      2,
      'slice',
      'config.mesh.dcn_tensor=-1 must be a positive number of slices',
    ),
    (
      dict(dcn_data=2),
      8,
      4,
      'process',
      'config.mesh dcn_data=2 x dcn_fsdp=1 x dcn_tensor=1 = 2 must equal the number of processes '
      '(4); set the dcn_* sizes to multiply to 4, or all to 1 for one flat mesh',
    ),
    (
      dict(dcn_data=2, dcn_fsdp=2),
      8,
      2,
      'slice',
      'config.mesh dcn_data=2 x dcn_fsdp=2 x dcn_tensor=1 = 4 must equal the number of slices (2)',
    ),
    (dict(dcn_fsdp=2), 8, 1, 'process', 'must equal the number of processes (1)'),
    (
      dict(data=-1, tensor=3, dcn_data=2),
      8,
      2,
      'process',
      'config.mesh.tensor=3 does not divide the 4 devices per process; choose mesh sizes whose '
      'product divides 4',
    ),
    (
      dict(data=8, dcn_data=2),
      8,
      2,
      'process',
      'config.mesh.data=8 does not divide the 4 devices per process',
    ),
    (
      dict(data=2, fsdp=1, tensor=1, dcn_data=2),
      8,
      2,
      'slice',
      "config.mesh sizes {'data': 2, 'fsdp': 1, 'tensor': 1} use 2 of the 4 devices per slice; "
      'set one axis to -1 to use the rest',
    ),
    (
      dict(data=-1, fsdp=-1, dcn_data=2),
      8,
      2,
      'process',
      'config.mesh: only one axis may be -1, got data, fsdp',
    ),
    (
      dict(data=-1, dcn_data=2),
      9,
      2,
      'process',
      'config.mesh.dcn_*: 9 devices do not split evenly over 2 processes',
    ),
    # dcn_* = 1: the messages of the flat mesh, unchanged.
    (
      dict(data=-1, tensor=3),
      8,
      2,
      'process',
      'config.mesh.tensor=3 does not divide 8 devices; choose mesh sizes whose product divides 8',
    ),
    (
      dict(data=2, fsdp=2, tensor=1),
      8,
      1,
      'process',
      "config.mesh sizes {'data': 2, 'fsdp': 2, 'tensor': 1} use 4 of 8 devices; set one axis to -1 "
      'to use the rest',
    ),
  ],
)
def test_mesh_shapes_errors(sizes, num_devices, num_granules, granule, message):
  with pytest.raises(UserError) as e:
    mesh_lib.mesh_shapes(_cfg(**sizes), num_devices, num_granules, granule)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_hybrid_grid_gives_each_process_a_contiguous_block_of_the_dcn_axis():
  devs = _devices(2, 4, interleave=True)
  grid = mesh_lib.device_grid(_cfg(data=4, fsdp=1, tensor=1, dcn_data=2), devs)
  assert grid.shape == (8, 1, 1)
  np.testing.assert_array_equal(_processes(grid)[:, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
  # Within a process, its devices in their own order.
  assert [d.id for d in grid[:4, 0, 0]] == [0, 1, 2, 3]

  grid = mesh_lib.device_grid(_cfg(data=2, fsdp=-1, tensor=1, dcn_fsdp=2), devs)
  assert grid.shape == (2, 4, 1)
  np.testing.assert_array_equal(_processes(grid)[..., 0], [[0, 0, 1, 1], [0, 0, 1, 1]])
  assert len({d.id for d in grid.flat}) == 8

  # The same global shape as a flat mesh lays the devices out in device order instead.
  flat = mesh_lib.device_grid(_cfg(data=2, fsdp=4, tensor=1), _devices(2, 4))
  np.testing.assert_array_equal(_processes(flat)[..., 0], [[0, 0, 0, 0], [1, 1, 1, 1]])


def test_hybrid_grid_over_four_processes_on_two_axes():
  grid = mesh_lib.device_grid(
    _cfg(data=1, fsdp=2, tensor=1, dcn_data=2, dcn_fsdp=2), _devices(4, 2)
  )
  assert grid.shape == (2, 4, 1)
  np.testing.assert_array_equal(_processes(grid)[..., 0], [[0, 0, 1, 1], [2, 2, 3, 3]])


def test_slices_are_the_granules_when_devices_have_a_slice_index():
  # 4 processes x 2 devices on 2 slices: dcn_data=2 matches the slices, not the processes.
  devs = [FakeSliceDevice(i, i // 2, slice_index=i // 4) for i in range(8)]
  assert mesh_lib.granules(devs)[0] == 'slice'
  grid = mesh_lib.device_grid(_cfg(data=-1, fsdp=1, tensor=1, dcn_data=2), devs)
  slices = np.vectorize(lambda d: d.slice_index, otypes=[int])(grid)
  np.testing.assert_array_equal(slices[:, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
  with pytest.raises(UserError, match=r'must equal the number of slices \(2\)'):
    mesh_lib.device_grid(_cfg(data=-1, dcn_data=4), devs)


def test_processes_are_the_granules_on_a_single_slice():
  # A multi-process CPU (or single-slice) run: every device has slice_index 0.
  devs = [FakeSliceDevice(i, i // 4, slice_index=0) for i in range(8)]
  assert mesh_lib.granules(devs)[0] == 'process'
  grid = mesh_lib.device_grid(_cfg(data=2, fsdp=-1, tensor=1, dcn_fsdp=2), devs)
  np.testing.assert_array_equal(_processes(grid)[..., 0], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_unequal_processes_are_rejected():
  devs = [FakeDevice(i, 0 if i < 3 else 1) for i in range(8)]
  with pytest.raises(UserError, match=r'the processes hold different numbers of devices \(3, 5\)'):
    mesh_lib.device_grid(_cfg(data=-1, dcn_data=2), devs)
  # All dcn_* = 1: one flat mesh, as before.
  assert mesh_lib.device_grid(_cfg(data=-1), devs).shape == (8, 1, 1)


def test_fallback_when_mesh_utils_fails(monkeypatch):
  def fail(*args, **kwargs):
    raise ValueError('odd topology')

  monkeypatch.setattr(jax.experimental.mesh_utils, 'create_hybrid_device_mesh', fail)
  grid = mesh_lib.device_grid(
    _cfg(data=2, fsdp=-1, tensor=1, dcn_fsdp=2), _devices(2, 4, interleave=True)
  )
  np.testing.assert_array_equal(_processes(grid)[..., 0], [[0, 0, 1, 1], [0, 0, 1, 1]])
  assert [d.id for d in grid[0, :, 0]] == [0, 1, 4, 5]


def test_layout_names_the_split():
  grid = mesh_lib.device_grid(_cfg(data=2, fsdp=-1, tensor=1, dcn_fsdp=2), _devices(2, 4))
  mesh = types.SimpleNamespace(devices=grid, axis_names=mesh_lib.AXES)
  assert mesh_lib.layout(mesh) == 'data=2, fsdp=4 (2 per process x 2 processes), tensor=1'
  flat = mesh_lib.device_grid(_cfg(data=2, fsdp=4, tensor=1), _devices(2, 4))
  mesh = types.SimpleNamespace(devices=flat, axis_names=mesh_lib.AXES)
  assert mesh_lib.layout(mesh) == 'data=2 (across 2 processes), fsdp=4, tensor=1'


def test_single_process_real_devices():
  mesh = mesh_lib.make_mesh(_cfg(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2)
  assert mesh_lib.layout(mesh) == 'data=2, fsdp=2, tensor=2'
  with pytest.raises(UserError, match=r'= 2 must equal the number of processes \(1\)'):
    mesh_lib.make_mesh(_cfg(data=-1, dcn_data=2))


def test_hybrid_grid_comes_from_create_hybrid_device_mesh(monkeypatch):
  calls, real = [], jax.experimental.mesh_utils.create_hybrid_device_mesh

  def spy(*args, **kwargs):
    calls.append((args[:2], kwargs))
    return real(*args, **kwargs)

  monkeypatch.setattr(jax.experimental.mesh_utils, 'create_hybrid_device_mesh', spy)
  mesh_lib.device_grid(_cfg(data=-1, fsdp=1, tensor=1, dcn_data=2), _devices(2, 4))
  mesh_lib.device_grid(
    _cfg(data=-1, dcn_data=2), [FakeSliceDevice(i, 0, slice_index=i // 4) for i in range(8)]
  )
  mesh_lib.device_grid(_cfg(data=-1), _devices(2, 4))  # flat: not hybrid
  assert calls == [
    (((4, 1, 1), (2, 1, 1)), dict(process_is_granule=True)),
    (((4, 1, 1), (2, 1, 1)), dict(process_is_granule=False)),
  ]
