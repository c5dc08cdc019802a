"""bigjax.sweep: a 2-setting x 2-seed sweep end to end (table numbers recomputed from the runs,
plots), a second invocation that launches nothing, a SIGKILLed sweep that resumes its runs when
re-run, failed runs, and bad sweep files rejected before anything is written."""

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bigjax import sweep, train
from bigjax.errors import UserError

from conftest import REPO

SMOKE = os.path.join(REPO, 'experiments', 'sweep_smoke', 'sweep.py')
# The smoke sweep's runs: (setting name, lr, warmup, seed).
EXPECTED = [
  ('lr=0.001,warmup=0', 0.001, 0, 0),
  ('lr=0.001,warmup=0', 0.001, 0, 1),
  ('lr=0.01,warmup=5', 0.01, 5, 0),
  ('lr=0.01,warmup=5', 0.01, 5, 1),
]


@pytest.fixture(scope='module', autouse=True)
def one_device_runs():
  """The runs are subprocesses that inherit os.environ: give them 1 CPU device, not conftest's 8."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XLA_FLAGS', '')
    yield


def _checkpoint_steps(run_dir):
  directory = os.path.join(run_dir, 'checkpoints')
  return [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """The smoke sweep, started with the CLI, SIGKILLed (with its runs) once a run has checkpoints
  but no results, then run again to the end through the Python API.

  One sweep serves the end-to-end, second-invocation and interrupted-sweep tests: runs cost ~10 s
  of start-up each on the 2-core test machine. Returns (workdir, runs, the interrupted run's dir).
  """
  workdir = str(tmp_path_factory.mktemp('sweep'))
  elsewhere = str(tmp_path_factory.mktemp('elsewhere'))  # a sweep runs from any directory
  proc = subprocess.Popen(
    [sys.executable, '-m', 'bigjax.sweep', f'--sweep={SMOKE}', f'--workdir={workdir}', '--jobs=2'],
    cwd=elsewhere,
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  interrupted, deadline = None, time.time() + 150
  try:
    while interrupted is None and time.time() < deadline and proc.poll() is None:
      for run_dir in glob.glob(os.path.join(workdir, 'runs', '*', 'seed_*')):
        if max(_checkpoint_steps(run_dir), default=0) >= 28 and not os.path.exists(
          os.path.join(run_dir, 'results.json')
        ):
          interrupted = run_dir
      time.sleep(0.02)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its bigjax.train runs
    proc.wait(timeout=30)
  assert interrupted, 'no run was caught between its first checkpoints and its end'
  assert not os.path.exists(os.path.join(workdir, 'results.csv'))
  runs = sweep.run_sweep(SMOKE, workdir, jobs=2)
  return workdir, runs, interrupted


def _results(workdir, setting, seed):
  with open(os.path.join(workdir, 'runs', setting, f'seed_{seed}', 'results.json')) as f:
    return json.load(f)


def _read_csv(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return list(csv.DictReader(f))


def _md_rows(workdir):
  """results.md's table body as lists of cells."""
  with open(os.path.join(workdir, 'results.md')) as f:
    table = [l for l in f.read().splitlines() if l.startswith('|')]
  return [[c.strip() for c in l.strip('|').split('|')] for l in table[2:]]


def _write_sweep(tmp_path, body, name='sweep.py'):
  path = tmp_path / name
  path.write_text('from bigjax import sweep\n\n' + body)
  return str(path)


@pytest.mark.slow  # trains the smoke sweep (~70 s on 2 cores, shared)
def test_sweep_end_to_end_table_and_plots(finished):
  workdir, runs, _ = finished
  assert [(r.setting, r.seed, r.finished) for r in runs] == [
    (s, seed, True) for s, _, _, seed in EXPECTED
  ]
  rows = _read_csv(workdir)
  assert [
    (r['setting'], float(r['optim.lr']), int(r['optim.warmup_steps']), int(r['seed'])) for r in rows
  ] == EXPECTED
  for row, (setting, lr, warmup, seed) in zip(rows, EXPECTED):
    res = _results(workdir, setting, seed)
    assert row['status'] == 'finished' and int(row['step']) == res['step'] == 210
    for metric in ('accuracy', 'loss', 'roc_auc'):
      assert np.isfinite(float(row[metric])) and float(row[metric]) == res['eval'][metric]
    assert float(row['wall_time_s']) > 0
    # The overrides, the setting and the seed reached the run's config (tuple and bool included).
    config = json.load(open(os.path.join(workdir, 'runs', setting, f'seed_{seed}', 'config.json')))
    assert (config['optim']['lr'], config['optim']['warmup_steps'], config['seed']) == (
      lr,
      warmup,
      seed,
    )
    assert config['model']['kwargs']['hidden'] == [16, 8] and config['checkpoint_every'] == 14
  assert len({float(r['accuracy']) for r in rows} | {float(r['loss']) for r in rows}) > 4

  md = _md_rows(workdir)
  assert [row[:2] for row in md] == [['0.001', '0'], ['0.01', '5']]
  for row, setting in zip(md, ['lr=0.001,warmup=0', 'lr=0.01,warmup=5']):
    assert row[-1] == '2'
    for cell, metric in zip(row[2:5], ('accuracy', 'loss', 'roc_auc')):
      values = [_results(workdir, setting, seed)['eval'][metric] for seed in (0, 1)]
      mean, std = (float(x) for x in cell.split(' ± '))
      assert mean == pytest.approx(np.mean(values), rel=1e-3, abs=1e-12), (metric, cell, values)
      assert std == pytest.approx(np.std(values), rel=1e-3, abs=1e-6), (metric, cell, values)

  for png in ('metric_vs_lr.png', 'metric_vs_warmup.png', 'learning_curves.png'):
    with open(os.path.join(workdir, png), 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000, png
  log = open(os.path.join(workdir, 'runs', 'lr=0.01,warmup=5', 'seed_1', 'log.txt')).read()
  assert '==== bigjax.sweep' in log and '--config.seed=1' in log and 'final eval' in log


@pytest.mark.slow  # trains the smoke sweep (~70 s on 2 cores, shared)
def test_second_invocation_launches_nothing(finished, monkeypatch):
  workdir, _, _ = finished
  paths = sorted(glob.glob(os.path.join(workdir, 'runs', '*', '*', '*.*')))
  before = {p: (os.stat(p).st_mtime_ns, open(p, 'rb').read()) for p in paths}
  csv_before = open(os.path.join(workdir, 'results.csv')).read()

  def no_launch(*args, **kwargs):
    raise AssertionError(f'the second invocation launched {args}')

  monkeypatch.setattr(subprocess, 'Popen', no_launch)
  runs = sweep.run_sweep(SMOKE, workdir)
  assert [r.status for r in runs] == ['skipped'] * 4
  assert (
    len(paths) >= 12
    and {p: (os.stat(p).st_mtime_ns, open(p, 'rb').read()) for p in paths} == before
  )
  assert open(os.path.join(workdir, 'results.csv')).read() == csv_before
  assert [r.metrics['accuracy'] for r in runs] == [float(r['accuracy']) for r in _read_csv(workdir)]


@pytest.mark.slow  # trains the smoke sweep (~70 s on 2 cores, shared)
def test_killed_sweep_resumes_its_runs_when_rerun(finished):
  workdir, runs, interrupted = finished
  assert all(r.finished for r in runs) and 'done' in [r.status for r in runs]
  log = open(os.path.join(interrupted, 'log.txt')).read()
  assert log.count('==== bigjax.sweep') == 2  # launched, killed, launched again
  resumed_at = int(re.search(r'resuming at step (\d+)', log).group(1))
  results = json.load(open(os.path.join(interrupted, 'results.json')))
  assert resumed_at >= 14 and results['step'] == 210
  assert results['steps_this_run'] == 210 - resumed_at  # resumed, not restarted


@pytest.mark.slow  # slow: moved out of the default run 2026-12-06 (default run under 10 min on 2 cores)
def test_failed_runs_are_reported_and_the_others_go_on(tmp_path, capsys):
  # Batches larger than the 455-example training split: those runs exit 2 at start-up. The good
  # run (batch 32) starts beside the first failure and the second failure starts after it, so a
  # failure that stopped the running runs or the launching of the others would show.
  path = _write_sweep(
    tmp_path,
    "def get_sweep():\n  return sweep.Sweep(\n"
    "      config='mlp_breast_cancer:smoke', seeds=[0],\n"
    "      settings=sweep.axis('batch_size', [8000, 32, 9000]),\n"
    "      metrics=['accuracy'])\n",
  )
  workdir = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(['bigjax-sweep', f'--sweep={path}', f'--workdir={workdir}', '--jobs=2'])
  err = capsys.readouterr().err
  assert exit_info.value.code == 1
  assert '2 of 3 runs failed: batch_size=8000/seed_0, batch_size=9000/seed_0' in err
  assert 'config.batch_size=9000 is larger than the training split' in err  # the log's tail
  rows = _read_csv(str(workdir))
  assert [r['setting'] for r in rows] == ['batch_size=8000', 'batch_size=32', 'batch_size=9000']
  assert [(r['status'], r['accuracy']) for r in rows[::2]] == [('failed', '')] * 2
  # The good run finished: its results.json, and its row in results.csv and results.md.
  results = _results(str(workdir), 'batch_size=32', 0)
  assert rows[1]['status'] == 'finished' and int(rows[1]['step']) == results['step'] > 0
  assert float(rows[1]['accuracy']) == results['eval']['accuracy'] > 0.5
  md = [row[1:] for row in _md_rows(str(workdir))]
  assert md[::2] == [['—', '0']] * 2
  assert md[1] == [f'{results["eval"]["accuracy"]:.4g} ± 0', '1']


@pytest.mark.parametrize(
  'body, expected',
  [
    (
      "  return sweep.Sweep(config=CFG, overrides={'optim.lrr': 1})",
      "sweep overrides field 'optim.lrr': config.optim has no field 'lrr'; its fields: b1",
    ),
    (
      "  return sweep.Sweep(config=CFG, settings=sweep.axis('model.kwargs.dropout', [0.0, 0.5]))",
      "sweep axis field 'model.kwargs.dropout': config.model.kwargs has no field 'dropout'",
    ),
    (
      "  return sweep.Sweep(config=CFG, settings=sweep.zip_axes(\n"
      "      sweep.axis('optim.lr', [1e-3, 1e-2]), sweep.axis('optim.warmup_steps', [0, 5, 10])))",
      'sweep.zip_axes needs axes of the same length: optim.lr has 2, optim.warmup_steps has 3 '
      'values',
    ),
    (
      "  return sweep.Sweep(config=CFG, overrides={'optim.lr': 'fast'})",
      "sweep run base/seed_0: flag --config.optim.lr=fast: could not convert string to float",
    ),
    (
      "  return sweep.Sweep(config=CFG, overrides={'data.name': None})",
      "config.data.name=None cannot be given to bigjax.train",
    ),
    (
      "  return sweep.Sweep(config=CFG, settings=sweep.product(sweep.axis('optim.lr', [1]),\n"
      "                     sweep.axis('optim.lr', [2])))",
      "field 'optim.lr' is on more than one",
    ),
    ("  return sweep.Sweep(config=CFG, overrides={'seed': 3})", "field 'seed' is also set by the"),
    ("  return sweep.Sweep(config='configs/nope.py')", "sweep config 'configs/nope.py': no such"),
    ("  return 3", 'get_sweep() returned a int, not a bigjax.sweep.Sweep'),
    ("  pass\nget_sweep = None", 'defines no get_sweep()'),
  ],
  ids=[
    'override',
    'axis',
    'zip',
    'type',
    'none',
    'twice',
    'seed',
    'config',
    'not_sweep',
    'no_get_sweep',
  ],
)
def test_bad_sweep_is_one_line_before_anything_is_written(body, expected, tmp_path, capsys):
  path = _write_sweep(tmp_path, f"CFG = 'mlp_breast_cancer:smoke'\n\n\ndef get_sweep():\n{body}\n")
  workdir = tmp_path / 'out'
  with pytest.raises(UserError, match=re.escape(expected)):
    sweep.run_sweep(path, str(workdir))
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(['bigjax-sweep', f'--sweep={path}', f'--workdir={workdir}'])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and err.startswith('bigjax: error: ') and '\n' not in err
  assert not workdir.exists()


def test_missing_sweep_file(tmp_path):
  with pytest.raises(UserError, match='--sweep=nope/sweep.py: no such sweep file'):
    sweep.run_sweep('nope/sweep.py', str(tmp_path / 'out'))


def test_settings_names_and_run_flags(tmp_path):
  grid = sweep.product(
    sweep.axis('model.kwargs.dropout', [0.0, 0.5]),
    sweep.zip_axes(
      sweep.axis('optim.lr', [1e-3, 3e-3]), sweep.axis('optim.warmup_steps', [0, 100], label='wu')
    ),
  )
  assert [list(s.values()) for s in grid.settings] == [
    [0.0, 1e-3, 0],
    [0.0, 3e-3, 100],
    [0.5, 1e-3, 0],
    [0.5, 3e-3, 100],
  ]
  assert grid.groups == ((0,), (1, 2))
  names = sweep.short_names(grid.axes)
  assert [sweep.setting_name(s, names) for s in grid.settings] == [
    'dropout=0.0,lr=0.001,wu=0',
    'dropout=0.0,lr=0.003,wu=100',
    'dropout=0.5,lr=0.001,wu=0',
    'dropout=0.5,lr=0.003,wu=100',
  ]
  twin = sweep.product(
    sweep.axis('model.kwargs.dropout', [0.1]),
    sweep.axis('dropout', [0.2]),
    sweep.axis('model.kwargs.hidden', [(32, 16), ()]),
  )
  names = sweep.short_names(twin.axes)
  assert names == ['kwargs.dropout', 'dropout', 'hidden']
  assert (
    sweep.setting_name(twin.settings[0], names) == 'kwargs.dropout=0.1,dropout=0.2,hidden=32-16'
  )
  assert sweep.setting_name(twin.settings[1], names).endswith('hidden=empty')

  # A None that the config already holds is left off the command line (flags cannot say None).
  runs = sweep.plan.plan(
    sweep.Sweep(
      config='mlp_breast_cancer:smoke', overrides={'data.data_dir': None, 'num_epochs': 2}
    ),
    str(tmp_path),
  )
  assert runs[0].args == ['--config.num_epochs=2', '--config.seed=0']
  assert runs[0].workdir == str(tmp_path / 'runs' / 'base' / 'seed_0') and not os.listdir(tmp_path)

  # Values reach bigjax.train's own flag parser as the same values.
  cases = {
    'model.kwargs.hidden': [4, 2],
    'data.standardize': False,
    'optim.lr': np.float32(0.5),
    'model.kwargs.activation': 'tanh',
    'num_epochs': np.int64(3),
    'data.eval_split': 'a b',
    'sharding_rules': (('batch', ('data', 'fsdp')),),
    'optim.step_boundaries': (0.25,),
  }
  argv = [f'--config.{k}={sweep.flag_value(v)}' for k, v in cases.items()]
  spec = os.path.join(REPO, 'configs', 'mlp_breast_cancer.py') + ':smoke'
  config, _ = train.parse_flags(['train', f'--config={spec}', '--workdir=x', *argv])
  for field, value in cases.items():
    parsed = config
    for part in field.split('.'):
      parsed = parsed[part]
    expected = sweep.to_builtin(value)
    assert parsed == expected and type(parsed) is type(expected), field


def test_folds_set_cv_fields(tmp_path):
  from bigjax import config_lib

  path = _write_sweep(
    tmp_path,
    "def get_sweep():\n  return sweep.Sweep(\n"
    "      config='mlp_breast_cancer:smoke', folds=3, seeds=[7])\n",
  )
  assert 'cv_folds' in config_lib.base_config().data
  runs = sweep.plan.plan(sweep.load_sweep(path), str(tmp_path))
  assert [
    (r.name, r.seed, r.config['data']['cv_fold'], r.config['data']['cv_folds']) for r in runs
  ] == [(f'base/fold_{i}', 7, i, 3) for i in range(3)]


def test_finished_run_survives_new_config_fields_but_not_changed_values(tmp_path):
  """A field bigjax added since a run (absent from its config.json) keeps it finished; a field the
  sweep now sets differently makes it unfinished."""
  wanted = {'seed': 0, 'num_epochs': 5, 'mesh': {'data': -1, 'dcn_data': 1}}
  run = sweep.Run(
    setting='s', values={}, seed=0, fold=None, workdir=str(tmp_path), args=[], config=wanted
  )
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'seed': 0, 'num_epochs': 5, 'mesh': {'data': -1}}, f)
  time.sleep(0.01)
  (tmp_path / 'results.json').write_text('{}')
  assert sweep.unfinished_reason(run) is None
  run.config = dict(wanted, num_epochs=10)
  assert 'num_epochs' in sweep.unfinished_reason(run)


def test_plan_from_another_directory_with_a_bare_config_name(tmp_path, monkeypatch):
  """A sweep plans from any directory: a bare config name is the shipped config file, and each
  run's --config and workdir are absolute (runs inherit the caller's directory)."""
  monkeypatch.chdir(tmp_path)
  _write_sweep(
    tmp_path,
    "def get_sweep():\n  return sweep.Sweep(config='mnist_cnn:smoke', "
    "seeds=[0, 1], settings=sweep.axis('num_epochs', [1, 2], label='epochs'))\n",
  )
  runs = sweep.plan.plan(sweep.load_sweep('sweep.py'), 'out')
  assert [r.name for r in runs] == [
    'epochs=1/seed_0',
    'epochs=1/seed_1',
    'epochs=2/seed_0',
    'epochs=2/seed_1',
  ]
  with open(os.path.join(REPO, 'configs', 'mnist_cnn.py')) as f:
    shipped = f.read()
  for run in runs:
    path, _, arg = run.spec.partition(':')
    assert os.path.isabs(path) and os.path.basename(path) == 'mnist_cnn.py' and arg == 'smoke'
    assert open(path).read() == shipped
    assert run.workdir == str(tmp_path / 'out' / 'runs' / run.setting / run.replica)
    assert (run.config['num_epochs'], run.config['seed']) == (run.values['num_epochs'], run.seed)
  assert not (tmp_path / 'out').exists()  # planning writes nothing


@pytest.mark.parametrize(
  'path',
  sorted(glob.glob(os.path.join(REPO, 'experiments', '*', 'sweep.py'))),
  ids=lambda p: os.path.basename(os.path.dirname(p)),
)
def test_experiment_sweeps_plan_from_any_directory(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runs = sweep.plan.plan(sweep.load_sweep(path), str(tmp_path / 'out'))
  assert runs and all(os.path.isfile(r.spec.partition(':')[0]) for r in runs)
  assert not os.listdir(tmp_path)


def test_reports_read_train_best_and_derived_metrics_by_fold_and_call_the_plot_hook(tmp_path):
  """results.csv / results.md from known results.json files (no training): `train/` and `best/`
  metrics come from their sections, `derived` from the run's metrics, a folds sweep labels its
  replicas by fold, the means and stds are over the folds, and the plot hook gets the runs."""
  hook_calls = []

  def plot(runs, outdir):
    hook_calls.append(([r.name for r in runs], outdir))

  sw = sweep.Sweep(
    config='mlp_breast_cancer:smoke',
    settings=sweep.axis('optim.lr', [1e-3, 1e-2]),
    folds=3,
    metrics=['accuracy', 'train/loss', 'best/accuracy'],
    derived={'gap': lambda m: m['best/accuracy'] - m['accuracy']},
    plot=plot,
  )
  runs = sweep.plan.plan(sw, str(tmp_path))
  assert [(r.setting, r.fold) for r in runs] == [
    (s, f) for s in ('lr=0.001', 'lr=0.01') for f in range(3)
  ]
  for i, run in enumerate(runs):  # accuracy 0.5 + i/100, train loss 1 + i, best = accuracy + 0.1
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
      json.dump(run.config, f)
    results = {
      'step': 70,
      'wall_time_s': 2.0,
      'eval': {'accuracy': 0.5 + i / 100},
      'train': {'loss': 1.0 + i},
      'best': {'eval': {'accuracy': 0.6 + i / 100}},
      'history': [],
    }
    with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    run.status = 'skipped'
  for run in runs:
    sweep.report.load_results(run, sw)
  sweep.write_reports(sw, runs, str(tmp_path))

  rows = _read_csv(str(tmp_path))
  assert list(rows[0])[:3] == ['setting', 'optim.lr', 'fold']
  for i, row in enumerate(rows):
    assert int(row['fold']) == i % 3
    assert float(row['accuracy']) == pytest.approx(0.5 + i / 100)
    assert float(row['train/loss']) == 1.0 + i
    assert float(row['best/accuracy']) == pytest.approx(0.6 + i / 100)
    assert float(row['gap']) == pytest.approx(0.1)
  md = _md_rows(str(tmp_path))
  for row, first in zip(md, (0, 3)):
    acc, loss, best, gap, n = row[1:]
    assert acc == f'{np.mean([0.5 + (first + k) / 100 for k in range(3)]):.4g} ± ' + (
      f'{np.std([k / 100 for k in range(3)]):.4g}'
    )
    assert loss.startswith(f'{first + 2:.4g} ± ') and best.startswith(f'{0.61 + first / 100:.4g}')
    assert gap.startswith('0.1 ± ') and n == '3'
  assert 'over folds; n = finished folds' in open(tmp_path / 'results.md').read()
  assert hook_calls == [([r.name for r in runs], str(tmp_path))]
