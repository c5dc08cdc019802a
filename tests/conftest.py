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


def subprocess_env(devices: int) -> dict[str, str]:
  """os.environ for a process a test starts: `devices` fake CPU devices and the repository on
  PYTHONPATH."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return dict(
    env,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')])),
  )


def load_config(name, arg=None):
  """get_config(arg) of configs/<name>.py, as `--config=configs/<name>.py:arg` would load it."""
  from bigjax import config_lib

  return config_lib.load_config_file(
    os.path.join(REPO, 'configs', f'{name}.py') + (f':{arg}' if arg else '')
  )


def tiny_gpt2(vocab: int):
  """A random 2-layer, 3-head, 24-wide `transformers` GPT-2 (torch seed 0, no dropout, context 64)
  in eval mode: the base model of the PEFT parity tests."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.GPT2Config(
    vocab_size=vocab,
    n_positions=64,
    n_embd=24,
    n_layer=2,
    n_head=3,
    bos_token_id=None,
    eos_token_id=None,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    initializer_range=0.1,
  )
  return transformers.GPT2LMHeadModel(config).eval()


def file_digests(directory):
  """{relative path: sha1} of every file under `directory` but the workdir lock (its holder's pid
  changes): what must stay bitwise unchanged when a run refuses to start."""
  import hashlib

  out = {}
  for root, _, files in os.walk(directory):
    for name in set(files) - {'.lock'}:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
  return out


def signal_once_training(cmd, cwd, workdir, sig, timeout=120):
  """Starts `cmd` (a bigjax-train command line) in `cwd`, sends `sig` once workdir/history.jsonl
  holds its first logged step (training is under way), and returns (exit status, stderr)."""
  import subprocess
  import time

  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.Popen(
    cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  history = os.path.join(workdir, 'history.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(history) and open(history).read().strip():
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def kill_after_checkpoint(cmd, env, ckpts, step):
  """Starts `cmd` (in the repo), SIGKILLs it as soon as checkpoint `step` is committed in `ckpts`."""
  import signal
  import subprocess
  import time

  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  while not (ckpts / str(step)).exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
