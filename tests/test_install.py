"""The package installs and its console scripts work from outside the checkout.

A fresh virtual environment (seeing this one's already-installed dependencies through a .pth
file, so nothing is downloaded; the checkout itself is not on its path) gets a regular,
non-editable install of the checkout; then, from an empty directory, `bigjax-train --help`,
`--dry_run` and a short training run of a shipped config by its bare name must work, with bigjax
imported from the new environment (not from the checkout).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import venv

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(bin dir of a venv with bigjax installed from REPO, an empty working directory)."""
  root = tmp_path_factory.mktemp('install')
  env_dir = root / 'venv'
  venv.EnvBuilder(with_pip=False).create(env_dir)
  python = env_dir / 'bin' / 'python'
  new_site = subprocess.run(
    [str(python), '-c', 'import site; print(site.getsitepackages()[0])'],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  # Plain path lines: this environment's packages become importable, but .pth files there (such as
  # an editable install of the checkout) are not run.
  with open(os.path.join(new_site, 'parent_env.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  # pip of this environment, installing into the new one; the build backend is the one already
  # installed here (no build isolation: no download).
  # Built from a copy: setuptools writes build/ and *.egg-info/ next to the sources.
  source = root / 'source'
  shutil.copytree(
    REPO,
    source,
    ignore=shutil.ignore_patterns(
      '.git', 'runs', 'build', '*.egg-info', '__pycache__', '.pytest_cache', '*.png'
    ),
  )
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      '--python',
      str(python),
      'install',
      '-q',
      '--no-deps',
      '--no-build-isolation',
      str(source),
    ],
    check=True,
    capture_output=True,
    text=True,
    timeout=300,
  )
  work = root / 'elsewhere'
  work.mkdir()
  return env_dir / 'bin', work


def _run(bin_dir, work, *argv, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's machine
  return subprocess.run(
    [str(bin_dir / argv[0]), *argv[1:]],
    cwd=work,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_installed_package_is_not_the_checkout(installed):
  bin_dir, work = installed
  proc = _run(
    bin_dir,
    work,
    'python',
    '-c',
    'import bigjax, bigjax.configs; print(bigjax.__file__); print(bigjax.configs.__file__)',
  )
  assert proc.returncode == 0, proc.stderr
  for line in proc.stdout.split():
    assert not line.startswith(REPO) and os.path.join('venv', 'lib') in line, proc.stdout


def test_help_lists_flags_and_shipped_configs(installed):
  bin_dir, work = installed
  proc = _run(bin_dir, work, 'bigjax-train', '--help')
  assert proc.returncode == 0, proc.stderr
  for text in ('--workdir', '--dry_run', '--config.FIELD=VALUE', 'mnist_cnn', 'gpt_shakespeare'):
    assert text in proc.stdout
  for script in ('bigjax-sweep', 'bigjax-sample', 'bigjax-compile'):
    assert _run(bin_dir, work, script, '--help').returncode == 0


def test_dry_run_prints_config_parameters_and_memory_and_writes_nothing(installed):
  bin_dir, work = installed
  proc = _run(
    bin_dir, work, 'bigjax-train', '--config=mnist_cnn', '--dry_run', '--config.optim.lr=3e-4'
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert 'optim.lr = 0.0003' in out and "model.name = 'cnn'" in out
  assert 'parameters: 93,322' in out  # the Keras CNN: 320 + 18,496 + 36,928 + 36,928 + 650
  assert 'conv_1' in out and 'mesh: data=1, fsdp=1, tensor=1' in out
  assert 'per-device memory of the train step' in out and 'temporaries' in out
  assert sorted(os.listdir(work)) == []


def test_train_a_shipped_config_by_name_from_another_directory(installed):
  bin_dir, work = installed
  proc = _run(bin_dir, work, 'bigjax-train', '--config=mnist_cnn:smoke', '--workdir=runs/demo')
  assert proc.returncode == 0, proc.stderr
  with open(work / 'runs' / 'demo' / 'results.json') as f:
    results = json.load(f)
  assert results['step'] == 20 and results['eval']['accuracy'] > 0.5  # 20 steps: ~0.7
