"""The 2 x 2 smoke sweep the cluster launcher tests run (tests/test_slurm.py, tests/test_ray.py),
and its --launcher=local reference, run once per pytest process whichever test file asks first.

Runs are 14 steps of the breast-cancer MLP (mostly start-up), 1 CPU device each.
"""

import os

from bigjax import sweep

SWEEP = """from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mlp_breast_cancer:smoke',
    overrides={'num_epochs': 1, 'log_every': 7, 'checkpoint_every': 7},
    settings=sweep.axis('optim.lr', [1e-3, 1e-2]),
    seeds=[0, 1],
    metrics=['accuracy', 'loss'],
  )
"""
_cache: dict = {}


def sweep_file(tmp_path_factory) -> str:
  """The sweep file, written once per pytest process: every launcher runs this same path (the
  results.md footer names it)."""
  if 'sweep' not in _cache:
    path = tmp_path_factory.mktemp('cluster_sweep') / 'sweep.py'
    path.write_text(SWEEP)
    _cache['sweep'] = str(path)
  return _cache['sweep']


def local_reference(tmp_path_factory) -> str:
  """The sweep's workdir under --launcher=local --jobs=2 (run on first use)."""
  if 'local' not in _cache:
    workdir = str(tmp_path_factory.mktemp('local_reference') / 'out')
    runs = sweep.run_sweep(sweep_file(tmp_path_factory), workdir, jobs=2)
    assert [r.status for r in runs] == ['done'] * 4, [r.message for r in runs]
    _cache['local'] = workdir
  return _cache['local']


def results_md(workdir) -> str:
  with open(os.path.join(str(workdir), 'results.md')) as f:
    return f.read()
