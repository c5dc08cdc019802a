"""Sweeps: one config over a grid of overrides and seeds (or CV folds), ending in a table and plots.

  python -m bigjax.sweep --sweep=experiments/<name>/sweep.py --workdir=DIR [--jobs=N]

A sweep file defines `get_sweep()` returning a `Sweep`:

  from bigjax import sweep

  def get_sweep():
    return sweep.Sweep(
        config='configs/mnist_cnn.py:smoke',        # as --config takes it, from the repo root
        overrides={'num_epochs': 2},               # every run
        settings=sweep.product(sweep.axis('batch_size', [32, 64]),
                               sweep.zip(sweep.axis('optim.lr', [1e-3, 3e-3]),
                                         sweep.axis('optim.warmup_steps', [0, 100]))),
        seeds=[0, 1],                              # or folds=K: K-fold cross-validation
        metrics=['accuracy', 'loss'])              # keys of results.json['eval']; first = main

Every run is a plain `python -m bigjax.train` subprocess (cwd = the repo root) in its own workdir
DIR/runs/<setting>/seed_<s> (or fold_<i>), its output appended to log.txt there, so every run
resumes on its own: re-running the sweep skips finished runs and re-launches the others. Before
anything runs, every run's config is built exactly as bigjax.train will parse it, so an unknown
field or a bad value is one line (UserError, exit 2). At the end DIR gets results.csv (one row per
run), results.md (one row per setting: mean ± std over seeds or folds), metric_vs_<axis>.png for
each axis with several values, learning_curves.png, and whatever the sweep's plot(runs, DIR) draws.
"""
import argparse
import builtins
import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tqdm

from bigjax import config_lib
from bigjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_TAIL_LINES = 15


# ----------------------------------------------------------------------------------------------
# Declaring a sweep
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Axis:
  field: str  # dotted config field, e.g. 'optim.lr'
  values: tuple
  label: Optional[str] = None  # short name in setting names, tables and plots


@dataclasses.dataclass(frozen=True)
class Grid:
  """Settings over some axes. `settings` holds one {field: value} dict per setting (fields in axis
  order); `groups` holds the tuples of axis indices that vary in lock-step (one per zip)."""
  axes: tuple
  settings: tuple
  groups: tuple


def axis(field, values, label=None):
  """One config field (dotted, e.g. 'model.kwargs.dropout') taking each of `values` in turn.

  label: a short name for the field in setting names, tables and plots (default: the field's last
  part, or more parts where two axes share it)."""
  values = tuple(values)
  if not isinstance(field, str) or not field:
    raise UserError(f'sweep.axis({field!r}): the field must be a dotted config path, e.g. '
                    '"optim.lr"')
  if not values:
    raise UserError(f'sweep.axis({field!r}) has no values')
  return Grid((Axis(field, values, label),), tuple({field: v} for v in values), ((0,),))


def product(*grids):
  """All combinations of the settings of `grids` (axes, products, zips); the last varies fastest."""
  _check_grids(grids, 'product')
  axes, groups, settings = (), (), [{}]
  for g in grids:
    groups += tuple(tuple(i + len(axes) for i in group) for group in g.groups)
    axes += g.axes
    settings = [{**s, **t} for s in settings for t in g.settings]
  return Grid(axes, tuple(settings), groups)


def zip(*grids):  # pylint: disable=redefined-builtin
  """The settings of `grids` taken in lock-step: the i-th setting joins the i-th of each grid."""
  _check_grids(grids, 'zip')
  lengths = [len(g.settings) for g in grids]
  if len(set(lengths)) > 1:
    sizes = ', '.join(f'{"+".join(a.field for a in g.axes)} has {n}' for g, n in
                      builtins.zip(grids, lengths))
    raise UserError(f'sweep.zip needs axes of the same length: {sizes} values')
  axes = sum((g.axes for g in grids), ())
  settings = tuple({k: v for part in parts for k, v in part.items()}
                   for parts in builtins.zip(*(g.settings for g in grids)))
  return Grid(axes, settings, (tuple(range(len(axes))),))


def _check_grids(grids, name):
  if not grids or not all(isinstance(g, Grid) for g in grids):
    raise UserError(f'sweep.{name} takes one or more sweep.axis/product/zip results')
  fields = [a.field for g in grids for a in g.axes]
  twice = sorted({f for f in fields if fields.count(f) > 1})
  if twice:
    raise UserError(f'sweep.{name}: field {twice[0]!r} is on more than one axis')


@dataclasses.dataclass
class Sweep:
  """A declared sweep (see the module docstring). Each setting of `settings` runs once per seed,
  or, with folds=K > 0, once per fold i of K (config.data.cv_folds=K, config.data.cv_fold=i) with
  the single seed of `seeds`. plot(runs, outdir), if given, draws experiment-specific figures.

  metrics: names read from each run's results.json: 'accuracy' is results['eval']['accuracy'] (the
  final eval), 'train/accuracy' results['train']['accuracy'] (the train metrics of the last log
  interval), 'best/accuracy' results['best']['eval']['accuracy'] (early stopping's best state).
  derived: {name: fn(metrics dict) -> float}, computed per run after `metrics` and reported like
  them, e.g. {'gap': lambda m: m['train/accuracy'] - m['accuracy']}."""
  config: str
  overrides: dict = dataclasses.field(default_factory=dict)
  settings: Optional[Grid] = None
  seeds: Sequence[int] = (0,)
  folds: int = 0
  metrics: Sequence[str] = ('loss',)
  derived: dict = dataclasses.field(default_factory=dict)
  plot: Optional[Callable] = None

  @property
  def reported(self):
    """The metric names in the tables: `metrics`, then `derived`."""
    return [*self.metrics, *self.derived]


@dataclasses.dataclass
class Run:
  """One run of a sweep, and what became of it.

  status: 'pending' (to launch), 'done' (finished by this invocation), 'skipped' (finished before
  it), or 'failed' (`message` says why, with the end of its log). `metrics` maps each of the
  sweep's metrics to its value in results.json['eval'] (NaN when missing)."""
  setting: str  # the setting's name, e.g. 'dropout=0.5,lr=0.003'
  values: dict  # {field: value} of the setting
  seed: Optional[int]
  fold: Optional[int]
  workdir: str
  args: list  # bigjax.train flags after --config and --workdir
  config: dict = None  # the config bigjax.train will run, as in its config.json
  status: str = 'pending'
  results: Optional[dict] = None
  metrics: dict = dataclasses.field(default_factory=dict)
  message: str = ''

  @property
  def name(self):
    return f'{self.setting}/{self.replica}'

  @property
  def replica(self):
    return f'fold_{self.fold}' if self.fold is not None else f'seed_{self.seed}'

  @property
  def finished(self):
    return self.status in ('done', 'skipped')


# ----------------------------------------------------------------------------------------------
# Planning: the runs and their validated configs (nothing is written)
# ----------------------------------------------------------------------------------------------
def load_sweep(path):
  """Imports the sweep file at `path` and returns its get_sweep(), a Sweep; else UserError."""
  if not os.path.isfile(path):
    raise UserError(f'--sweep={path}: no such sweep file; sweeps live in '
                    'experiments/<name>/sweep.py')
  name = 'bigjax_sweep_' + re.sub(r'\W', '_', os.path.splitext(os.path.abspath(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_sweep', None)):
    raise UserError(f'--sweep={path} defines no get_sweep(); it must return a bigjax.sweep.Sweep')
  result = module.get_sweep()
  if not isinstance(result, Sweep):
    raise UserError(f'--sweep={path}: get_sweep() returned a {type(result).__name__}, not a '
                    'bigjax.sweep.Sweep')
  return result


def short_names(axes):
  """Each axis' label, else the shortest dotted suffix of its field that no other axis shares."""
  names = []
  for a in axes:
    parts = a.field.split('.')
    for n in range(1, len(parts) + 1):
      name = '.'.join(parts[-n:])
      if not any(b is not a and b.field.split('.')[-n:] == parts[-n:] for b in axes):
        break
    names.append(a.label or name)
  return names


def _fmt(value):
  """A value as it appears in a setting name: compact and filesystem-safe."""
  if isinstance(value, (bool, type(None))):
    text = str(value).lower()
  elif isinstance(value, (tuple, list)):
    text = '-'.join(_fmt(v) for v in value) or 'empty'
  else:
    text = repr(value) if isinstance(value, float) else str(value)
  return re.sub(r'[^A-Za-z0-9_.+-]', '_', text)


def _show(value):
  """A value as it appears in tables and legends."""
  return value if isinstance(value, str) else repr(_builtin(value))


def setting_name(setting, names):
  """'lr=0.003,warmup=100' for {field: value} with the axes' short `names` ('base' when empty)."""
  text = ','.join(f'{n}={_fmt(v)}' for n, v in builtins.zip(names, setting.values()))
  return re.sub(r'[^A-Za-z0-9_.=,+-]', '_', text) or 'base'


def _builtin(value):
  """numpy scalars -> python, lists -> tuples (recursively): the types config fields hold."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, list)):
    return tuple(_builtin(v) for v in value)
  return value


def flag_value(value):
  """The text of `--config.FIELD=<text>` that bigjax.train's flags parse back to `value`."""
  value = _builtin(value)
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return value if isinstance(value, str) else repr(value)


def _jsonable(value):
  return json.loads(json.dumps(value, default=lambda x: x.to_dict() if hasattr(x, 'to_dict')
                               else _builtin(x)))


def _resolve_config(spec):
  path, colon, arg = spec.partition(':')
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.isfile(full):
    raise UserError(f'sweep config {path!r}: no such config file (paths are relative to the repo '
                    f'root {ROOT})')
  return full + colon + arg


def _check_field(config, field, where):
  """UserError naming `field` unless the dotted path exists in `config`; returns its value."""
  node, parts = config, field.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      parent = 'config' + ''.join(f'.{p}' for p in parts[:i])
      known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
      raise UserError(f'sweep {where} field {field!r}: {parent} has no field {part!r}; its fields: '
                      f'{known}')
    node = node[part]
  return node


def _parse_like_train(spec, args):
  """The config `python -m bigjax.train --config=spec <args>` runs (same ml_collections flags)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['bigjax.train', f'--config={spec}', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def plan(sw, workdir):
  """The sweep's runs, each with its bigjax.train flags and the config they give.

  Raises UserError (naming the field, value or run) for anything bigjax.train would reject while
  parsing its flags, before anything is written."""
  if not isinstance(sw.config, str) or not sw.config:
    raise UserError("Sweep.config must be a config spec like 'configs/mnist_cnn.py:smoke'")
  if isinstance(sw.metrics, str) or not sw.metrics:
    raise UserError("Sweep.metrics must be a non-empty list of results.json['eval'] keys")
  seeds = list(sw.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
    raise UserError(f'Sweep.seeds={sw.seeds!r} must be distinct integers')
  if sw.folds and (sw.folds < 2 or len(seeds) != 1):
    raise UserError(f'Sweep.folds={sw.folds} needs folds >= 2 and a single seed (seeds={seeds})')
  spec = _resolve_config(sw.config)
  base = config_lib.load_config_file(spec)
  grid = sw.settings or Grid((), ({},), ())
  set_by_sweep = ['seed'] + (['data.cv_folds', 'data.cv_fold'] if sw.folds else [])
  for where, fields in (('overrides', list(sw.overrides)), ('axis', [a.field for a in grid.axes])):
    for field in fields:
      _check_field(base, field, where)
      if field in set_by_sweep or (where == 'overrides' and field in grid.settings[0]):
        raise UserError(f'sweep {where} field {field!r} is also set by '
                        f'{"an axis" if field in grid.settings[0] else "the sweep seeds/folds"}')
  for field in set_by_sweep:
    _check_field(base, field, 'seeds/folds')
  names = short_names(grid.axes)
  replicas = [(seeds[0], i) for i in range(sw.folds)] if sw.folds else [(s, None) for s in seeds]
  runs, seen = [], {}
  for setting in grid.settings:
    name = setting_name(setting, names)
    if name in seen:
      raise UserError(f'sweep settings {seen[name]} and {setting} are both named {name!r}; give '
                      'the axes labels or values that differ in their names')
    seen[name] = setting
    for seed, fold in replicas:
      run = Run(name, dict(setting), seed, fold, '', [])
      run.workdir = os.path.join(workdir, 'runs', name, run.replica)
      fields = {**sw.overrides, **setting, 'seed': seed}
      if sw.folds:
        fields.update({'data.cv_folds': sw.folds, 'data.cv_fold': fold})
      run.args, run.config = _run_flags(spec, base, fields, run.name)
      runs.append(run)
  return runs


def _run_flags(spec, base, fields, run_name):
  """bigjax.train flags setting `fields`, checked by parsing them as train does: (flags, config)."""
  args = []
  for field, value in fields.items():
    if value is None and _check_field(base, field, '') is None:
      continue  # already None; ml_collections cannot parse None from the command line
    args.append(f'--config.{field}={flag_value(value)}')
  try:
    config = _parse_like_train(spec, args)
  except Exception as e:  # absl/ml_collections errors: bad value for the field's type
    raise UserError(f'sweep run {run_name}: {str(e).strip().splitlines()[0]}') from None
  for field, value in fields.items():
    parsed = _check_field(config, field, '')
    if _jsonable(parsed) != _jsonable(value):
      raise UserError(f'sweep run {run_name}: config.{field}={value!r} cannot be given to '
                      f'bigjax.train (--config.{field}={flag_value(value)} reads as {parsed!r}); '
                      'use a value of the type the field has')
  return args, json.loads(config.to_json())


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def is_finished(run):
  """Whether `run.workdir` holds this run's final results (see `unfinished_reason`)."""
  return unfinished_reason(run) is None


def unfinished_reason(run):
  """None when `run.workdir` holds this run's final results, else why not.

  bigjax.train writes config.json at the start of every launch and results.json (atomically) only
  when a launch completes. So a run is finished when results.json exists, is newer than config.json
  (no launch started since — e.g. one killed while resuming — is pending), and config.json agrees
  with the config this sweep asks for on every field both have (a sweep edited since, e.g. to more
  epochs, re-launches the run, which then resumes from its checkpoints)."""
  results = os.path.join(run.workdir, 'results.json')
  config = os.path.join(run.workdir, 'config.json')
  if not (os.path.exists(results) and os.path.exists(config)):
    return 'it has no results.json'
  if os.stat(results).st_mtime_ns <= os.stat(config).st_mtime_ns:
    return 'its results.json is older than its config.json'
  with open(config) as f:
    saved, wanted = _flatten(json.load(f)), _flatten(run.config)
  changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
  if changed:
    return (f"its config.json differs from the config the sweep asks for in {', '.join(changed)}")
  return None


def _flatten(tree, prefix=''):
  """{'a': {'b': 1}} -> {'a.b': 1}. Fields present on one side only (a field bigjax added or
  removed since the run) do not make a run unfinished; differing values of a field do."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def metric_value(results, name):
  """A metric of a results.json dict by name (see Sweep.metrics); NaN when absent."""
  section, _, key = name.rpartition('/')
  report = {'': results.get('eval'), 'train': results.get('train'),
            'best': (results.get('best') or {}).get('eval')}.get(section) or {}
  value = report.get(key)
  return float(value) if value is not None and np.ndim(value) == 0 else math.nan


def _load_results(run, sw):
  with open(os.path.join(run.workdir, 'results.json')) as f:
    run.results = json.load(f)
  run.metrics = {m: metric_value(run.results, m) for m in sw.metrics}
  for name, fn in sw.derived.items():
    run.metrics[name] = float(fn(dict(run.metrics)))


def _log_tail(run, n=LOG_TAIL_LINES):
  try:
    with open(os.path.join(run.workdir, 'log.txt'), errors='replace') as f:
      lines = [l.rstrip() for l in f.read().replace('\r', '\n').splitlines()
               if l.strip() and not re.search(r'\d%\|', l)]  # not tqdm progress bars
  except OSError:
    return '(no log.txt)'
  return '\n'.join('    ' + l for l in lines[-n:])


class _Launch:
  """One bigjax.train subprocess, its output appended to the run's log.txt."""

  def __init__(self, run, spec):
    os.makedirs(run.workdir, exist_ok=True)
    self.run, self.start = run, time.time()
    cmd = [sys.executable, '-m', 'bigjax.train', f'--config={spec}',
           f'--workdir={os.path.abspath(run.workdir)}', *run.args]
    self.log = open(os.path.join(run.workdir, 'log.txt'), 'a')
    self.log.write(f'\n==== bigjax.sweep {time.strftime("%Y-%m-%d %H:%M:%S")}: '
                   f'(cd {ROOT} && {shlex.join(cmd)})\n')
    self.log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED='1')  # a killed run's log keeps its last lines
    # Same process group as the sweep: Ctrl-C (or killing the group) reaches the runs too.
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)

  def close(self):
    self.log.close()


def _prepare_datasets(runs):
  """Prepares the offline datasets the runs read, here, before launching several runs at once:
  concurrent runs would otherwise all prepare the same dataset into one TFDS dir on first use."""
  from bigjax.data import offline, pipeline
  for name, data_dir, split in sorted({(r.config['data']['name'], r.config['data']['data_dir'],
                                        r.config['data'][key]) for r in runs
                                       for key in ('train_split', 'eval_split')}, key=str):
    if name in offline.NAMES:
      pipeline.check_available(name, split, data_dir)


def run_sweep(sweep_path, workdir, jobs=1):
  """Runs (or finishes) the sweep in `sweep_path` under `workdir`, `jobs` runs at a time, then
  writes results.csv, results.md and the plots into `workdir`. Returns the list of Run records;
  failed runs have status 'failed' (the others still run). Raises UserError for invalid input before
  anything is launched or written."""
  if jobs < 1:
    raise UserError(f'--jobs={jobs} must be at least 1')
  sw = load_sweep(sweep_path)
  runs = plan(sw, workdir)
  for run in runs:
    if is_finished(run):
      run.status = 'skipped'
      _load_results(run, sw)
  pending = [r for r in runs if r.status == 'pending']
  if pending and jobs > 1:
    _prepare_datasets(pending)
  os.makedirs(workdir, exist_ok=True)
  spec = sw.config
  running = []
  bar = tqdm.tqdm(total=len(runs), initial=len(runs) - len(pending), unit='run', desc='sweep',
                  dynamic_ncols=True)
  try:
    while pending or running:
      while pending and len(running) < jobs:
        running.append(_Launch(pending.pop(0), spec))
      _postfix(bar, runs, len(running), len(pending))
      time.sleep(0.2)
      for launch in [l for l in running if l.proc.poll() is not None]:
        running.remove(launch)
        launch.close()
        _settle(launch, sw)
        bar.update(1)
        bar.write(_describe(launch.run, time.time() - launch.start), file=sys.stderr)
    _postfix(bar, runs, 0, 0)
  finally:
    for launch in running:  # interrupted: SIGTERM makes each run save a checkpoint and exit
      launch.proc.terminate()
    for launch in running:
      try:
        launch.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        launch.proc.kill()
      launch.close()
    bar.close()
  write_reports(sw, runs, workdir, sweep_path)
  return runs


def _postfix(bar, runs, running, left):
  postfix = dict(running=running, left=left, failed=sum(r.status == 'failed' for r in runs))
  if postfix != getattr(bar, 'last_postfix', None):  # redraw on changes only (quiet when logged)
    bar.last_postfix = postfix
    bar.set_postfix(postfix)


def _settle(launch, sw):
  run, code = launch.run, launch.proc.returncode
  reason = unfinished_reason(run)
  if code == 0 and reason is None:
    run.status = 'done'
    _load_results(run, sw)
  else:
    run.status = 'failed'
    why = f'exit status {code}' if code else f'exited 0 but {reason}'
    run.message = f'{why}; last lines of {os.path.join(run.workdir, "log.txt")}:\n{_log_tail(run)}'


def _describe(run, seconds):
  if run.status == 'failed':
    return f'FAILED {run.name} after {seconds:.1f} s: {run.message}'
  values = ', '.join(f'{k}={v:.4g}' for k, v in run.metrics.items())
  return f'done {run.name} in {seconds:.1f} s: {values}'


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def setting_stats(runs, metrics):
  """{setting name: {metric: (mean, std, n)}} over the finished runs of each setting; std has
  ddof=0 (population), n counts the finished seeds/folds with a finite value."""
  stats = {}
  for run in runs:
    stats.setdefault(run.setting, [])
    if run.finished:
      stats[run.setting].append(run)
  out = {}
  for name, done in stats.items():
    out[name] = {}
    for m in metrics:
      values = np.array([r.metrics[m] for r in done], float)
      values = values[np.isfinite(values)]
      out[name][m] = ((float(values.mean()), float(values.std()), len(values)) if len(values)
                      else (math.nan, math.nan, 0))
  return out


def write_reports(sw, runs, outdir, sweep_path=''):
  """results.csv, results.md and the plots in `outdir`, then the sweep's plot(runs, outdir)."""
  grid = sw.settings or Grid((), ({},), ())
  names = short_names(grid.axes)
  metrics = sw.reported
  stats = setting_stats(runs, metrics)
  replica = 'fold' if sw.folds else 'seed'
  with open(os.path.join(outdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['setting', *(a.field for a in grid.axes), replica, *metrics, 'step',
                     'wall_time_s', 'status'])
    for r in runs:
      res = r.results or {}
      writer.writerow([r.setting, *(_show(r.values[a.field]) for a in grid.axes),
                       r.fold if sw.folds else r.seed,
                       *(repr(r.metrics[m]) if r.finished else '' for m in metrics),
                       # wall time of the bigjax.train launch that finished the run
                       res.get('step', ''), res.get('wall_time_s', ''),
                       'finished' if r.finished else r.status])
  # One row per setting, in sweep order.
  lines = [f'| {" | ".join([*names, *metrics, "n"])} |', '|' + ' --- |' * (len(names) +
                                                                           len(metrics) + 1)]
  settings = {r.setting: r.values for r in runs}
  for name, values in settings.items():
    cells = [_show(values[a.field]) for a in grid.axes]
    cells += [f'{mean:.4g} ± {std:.4g}' if n else '—' for mean, std, n in
              (stats[name][m] for m in metrics)]
    n_done = sum(r.finished for r in runs if r.setting == name)
    lines.append(f'| {" | ".join([*cells, str(n_done)])} |')
  failed = [r.name for r in runs if r.status == 'failed']
  lines += ['', f'mean ± std (population std, ddof=0) over {replica}s; n = finished {replica}s. '
            f'Config {sw.config}' + (f', sweep {sweep_path}' if sweep_path else '') + '.']
  if failed:
    lines.append(f'Failed runs (not in the table): {", ".join(failed)}.')
  with open(os.path.join(outdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot_metric_vs_axes(grid, names, runs, stats, metrics[0], replica, outdir)
  plot_learning_curves(runs, metrics[0], outdir)
  if sw.plot is not None:
    sw.plot(runs, outdir)


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_metric_vs_axes(grid, names, runs, stats, metric, replica, outdir):
  """metric_vs_<axis>.png for each axis with more than one value: the metric (mean, error bars =
  std over seeds/folds) against the axis, one line per combination of the axes not zipped with
  it."""
  settings = {r.setting: r.values for r in runs}
  for i, (ax, name) in enumerate(builtins.zip(grid.axes, names)):
    values = list({_show(v): v for v in ax.values}.values())
    if len(values) < 2:
      continue
    locked = next(g for g in grid.groups if i in g)
    others = [j for j in range(len(grid.axes)) if j not in locked]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {_show(v): (v if numeric else k) for k, v in enumerate(values)}
    lines = {}
    for setting, vals in settings.items():
      key = ', '.join(f'{names[j]}={_show(vals[grid.axes[j].field])}' for j in others)
      mean, std, _ = stats[setting][metric]
      lines.setdefault(key, []).append((position[_show(vals[ax.field])], mean, std))
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(6, 4))
    for key, points in lines.items():
      x, y, e = np.array(sorted(points)).T
      axes.errorbar(x, y, yerr=e, marker='o', capsize=3, label=key or None)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      axes.set_xscale('log')
    if not numeric:
      axes.set_xticks(range(len(values)), [_show(v) for v in values])
    axes.set_xlabel(name)
    axes.set_ylabel(f'{metric} (mean ± std over {replica}s)')
    axes.set_title(f'{metric} vs {name}')
    if any(lines):
      axes.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, f'metric_vs_{_fmt(name)}.png'), dpi=100)
    plt.close(fig)


def _curve(runs, split, key):
  """Mean over `runs` of results['history'] entries' `key` for `split`, at each step they have."""
  by_step = {}
  for r in runs:
    for h in r.results.get('history', []):
      if h.get('split') == split and np.ndim(h.get(key)) == 0 and h.get(key) is not None:
        by_step.setdefault(h['step'], []).append(float(h[key]))
  steps = sorted(by_step)
  return steps, [float(np.mean(by_step[s])) for s in steps]


def plot_learning_curves(runs, metric, outdir):
  """learning_curves.png: train loss against step per setting (mean over seeds/folds) and, when the
  history has eval entries, the eval `metric` against step."""
  done = {}
  for r in runs:
    if r.finished:
      done.setdefault(r.setting, []).append(r)
  curves = {name: (_curve(rs, 'train', 'loss'), _curve(rs, 'eval', metric))
            for name, rs in done.items()}
  has_eval = any(ev[0] for _, ev in curves.values())
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(11 if has_eval else 6, 4),
                           squeeze=False)
  for name, (train, ev) in curves.items():
    line, = axes[0, 0].plot(*train, label=name)
    if has_eval and ev[0]:
      axes[0, 1].plot(*ev, marker='o', color=line.get_color(), label=name)
  axes[0, 0].set(xlabel='step', ylabel='train loss (mean over runs)', title='train loss')
  if has_eval:
    axes[0, 1].set(xlabel='step', ylabel=f'eval {metric}', title=f'eval {metric}')
  if curves:
    axes[0, 0].legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'learning_curves.png'), dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def main(argv=None):
  """CLI entry. Exit 2 on invalid input (one line), 1 when some runs failed (named), else 0."""
  parser = argparse.ArgumentParser(prog='python -m bigjax.sweep',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--sweep', required=True, help='experiments/<name>/sweep.py')
  parser.add_argument('--workdir', required=True, help='where runs/, results.* and plots go')
  parser.add_argument('--jobs', type=int, default=1, help='runs at a time (default 1)')
  args = parser.parse_args(argv)
  # SIGTERM unwinds like Ctrl-C: the runs get SIGTERM too (they save a checkpoint and exit).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    runs = run_sweep(args.sweep, args.workdir, args.jobs)
  except UserError as e:
    print(f'bigjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('bigjax: sweep interrupted; run the same command again to resume', file=sys.stderr)
    sys.exit(130)
  with open(os.path.join(args.workdir, 'results.md')) as f:
    print(f.read())
  failed = [r.name for r in runs if r.status == 'failed']
  if failed:
    print(f'bigjax: sweep: {len(failed)} of {len(runs)} runs failed: {", ".join(failed)} (their '
          f'log.txt is under {os.path.join(args.workdir, "runs")})', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  # Run the imported bigjax.sweep, not this __main__ copy: sweep files build bigjax.sweep.Sweep.
  from bigjax import sweep as _sweep
  _sweep.main()
