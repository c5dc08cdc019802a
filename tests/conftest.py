"""Test setup: 8 fake CPU devices (for the sharding tests) and a private TFDS data dir.

Both must be set before jax / tensorflow_datasets are imported anywhere.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TFDS_DATA_DIR', tempfile.mkdtemp(prefix='bigjax_tfds_'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# MFU in tests uses a fixed CPU peak instead of measuring (and caching) one on a busy machine.
os.environ.setdefault('BIGJAX_CPU_PEAK_FLOPS', '1e11')

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_device():
  """The first device alone: the unsharded reference for equality tests."""
  return jax.devices()[:1]


def load_config(name, arg=None):
  """get_config(arg) of configs/<name>.py, as `--config=configs/<name>.py:arg` would load it."""
  from bigjax import config_lib

  return config_lib.load_config_file(
    os.path.join(REPO, 'configs', f'{name}.py') + (f':{arg}' if arg else '')
  )
