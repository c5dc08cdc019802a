"""Planning a sweep: its runs, their names, their validated configs, and which are finished.

Nothing here writes a file or launches anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import importlib.util
import json
import os
import re
from typing import Any

from bigjax import cli, config_lib
from bigjax.errors import UserError
from bigjax.sweep.grid import Grid, flag_value, setting_name, short_names, to_builtin


@dataclasses.dataclass
class Sweep:
  """A declared sweep (see bigjax.sweep). Each setting of `settings` runs once per seed, or, with
  folds=K > 0, once per fold i of K (config.data.cv_folds=K, config.data.cv_fold=i) with the
  single seed of `seeds`. plot(runs, outdir), if given, draws experiment-specific figures.

  config: as --config takes it: a shipped config's bare name or a config file path, optionally
  with ':args' (e.g. 'mnist_cnn:smoke'); see bigjax.cli.resolve_config.
  metrics: names read from each run's results.json: 'accuracy' is results['eval']['accuracy'] (the
  final eval), 'train/accuracy' results['train']['accuracy'] (the train metrics of the last log
  interval), 'best/accuracy' results['best']['eval']['accuracy'] (early stopping's best state).
  derived: {name: fn(metrics dict) -> float}, computed per run after `metrics` and reported like
  them, e.g. {'gap': lambda m: m['train/accuracy'] - m['accuracy']}.
  resources: what each run asks a cluster for under --launcher=slurm|ray, e.g. {'gpus_per_task': 1,
  'time_min': 240} (fields and defaults: bigjax.cluster.resources.Resources; flags override them)."""

  config: str
  overrides: dict = dataclasses.field(default_factory=dict)
  settings: Grid | None = None
  seeds: Sequence[int] = (0,)
  folds: int = 0
  metrics: Sequence[str] = ('loss',)
  derived: dict = dataclasses.field(default_factory=dict)
  plot: Callable | None = None
  resources: dict = dataclasses.field(default_factory=dict)

  @property
  def reported(self) -> list[str]:
    """The metric names in the tables: `metrics`, then `derived`."""
    return [*self.metrics, *self.derived]

  @property
  def grid(self) -> Grid:
    """`settings`, or the single empty setting when the sweep varies only seeds or folds."""
    return self.settings or Grid.empty()


@dataclasses.dataclass
class Run:
  """One run of a sweep, and what became of it.

  status: 'pending' (to launch), 'done' (finished by this invocation), 'skipped' (finished before
  it), or 'failed' (`message` says why, with the end of its log). `metrics` maps each of the
  sweep's metrics to its value in results.json['eval'] (NaN when missing)."""

  setting: str  # the setting's name, e.g. 'dropout=0.5,lr=0.003'
  values: dict  # {field: value} of the setting
  seed: int | None
  fold: int | None
  workdir: str  # absolute
  args: list  # bigjax.train flags after --config and --workdir
  config: dict | None = None  # the config bigjax.train will run, as in its config.json
  status: str = 'pending'
  results: dict | None = None
  metrics: dict = dataclasses.field(default_factory=dict)
  message: str = ''
  spec: str = ''  # bigjax.train's --config: an absolute config file path[:args]

  @property
  def name(self) -> str:
    return f'{self.setting}/{self.replica}'

  @property
  def replica(self) -> str:
    return f'fold_{self.fold}' if self.fold is not None else f'seed_{self.seed}'

  @property
  def finished(self) -> bool:
    return self.status in ('done', 'skipped')


def load_sweep(path: str) -> Sweep:
  """Imports the sweep file at `path` and returns its get_sweep(), a Sweep; else UserError."""
  if not os.path.isfile(path):
    raise UserError(
      f'--sweep={path}: no such sweep file; sweeps live in experiments/<name>/sweep.py'
    )
  name = 'bigjax_sweep_' + re.sub(r'\W', '_', os.path.splitext(os.path.abspath(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None  # a .py path always gives both
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_sweep', None)):
    raise UserError(f'--sweep={path} defines no get_sweep(); it must return a bigjax.sweep.Sweep')
  result = module.get_sweep()
  if not isinstance(result, Sweep):
    raise UserError(
      f'--sweep={path}: get_sweep() returned a {type(result).__name__}, not a bigjax.sweep.Sweep'
    )
  return result


def _jsonable(value):
  return json.loads(
    json.dumps(value, default=lambda x: x.to_dict() if hasattr(x, 'to_dict') else to_builtin(x))
  )


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def resolve_spec(spec: str) -> str:
  """A sweep's config spec ('mnist_cnn:smoke', 'path/to/file.py:args') -> 'ABSOLUTE_FILE[:args]'
  (see bigjax.cli.resolve_config); UserError naming the spec when there is no such config."""
  try:
    path, colon, arg = cli.resolve_config(spec).partition(':')
  except UserError as e:
    raise UserError(
      f'sweep config {spec.partition(":")[0]!r}: no such config file or shipped '
      f'config ({" ".join(str(e).split())})'
    ) from None
  return os.path.abspath(path) + colon + arg


def check_field(config: Any, field: str, where: str) -> Any:
  """UserError naming `field` unless the dotted path exists in `config`; returns its value."""
  node, parts = config, field.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      parent = 'config' + ''.join(f'.{p}' for p in parts[:i])
      known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
      raise UserError(
        f'sweep {where} field {field!r}: {parent} has no field {part!r}; its fields: {known}'
      )
    node = node[part]
  return node


def _parse_like_train(spec, args):
  """The config `bigjax-train --config=spec <args>` runs: parsed by the same bigjax.cli flags."""
  parser = cli.Parser('bigjax-train', '', with_config=True)
  parser.string('workdir', None, 'Directory for checkpoints, logs and results.')
  return parser.parse(['bigjax-train', f'--config={spec}', *args]).config


def _check_sweep(sw):
  if not isinstance(sw.config, str) or not sw.config:
    raise UserError("Sweep.config must be a config spec like 'mnist_cnn:smoke'")
  if isinstance(sw.metrics, str) or not sw.metrics:
    raise UserError("Sweep.metrics must be a non-empty list of results.json['eval'] keys")
  seeds = list(sw.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
    raise UserError(f'Sweep.seeds={sw.seeds!r} must be distinct integers')
  if sw.folds and (sw.folds < 2 or len(seeds) != 1):
    raise UserError(f'Sweep.folds={sw.folds} needs folds >= 2 and a single seed (seeds={seeds})')


def plan(sw: Sweep, workdir: str) -> list[Run]:
  """The sweep's runs, each with its bigjax.train flags and the config they give; run workdirs
  are absolute (DIR/runs/<setting>/<replica>, `workdir` taken from the current directory).

  Raises UserError (naming the field, value or run) for anything bigjax.train would reject while
  parsing its flags, before anything is written."""
  _check_sweep(sw)
  seeds = list(sw.seeds)
  spec = resolve_spec(sw.config)
  base = config_lib.load_config_file(spec)
  grid = sw.grid
  set_by_sweep = ['seed'] + (['data.cv_folds', 'data.cv_fold'] if sw.folds else [])
  for where, checked in (('overrides', list(sw.overrides)), ('axis', [a.field for a in grid.axes])):
    for field in checked:
      check_field(base, field, where)
      if field in set_by_sweep or (where == 'overrides' and field in grid.settings[0]):
        raise UserError(
          f'sweep {where} field {field!r} is also set by '
          f'{"an axis" if field in grid.settings[0] else "the sweep seeds/folds"}'
        )
  for field in set_by_sweep:
    check_field(base, field, 'seeds/folds')
  names = short_names(grid.axes)
  replicas = [(seeds[0], i) for i in range(sw.folds)] if sw.folds else [(s, None) for s in seeds]
  runs: list[Run] = []
  seen: dict[str, dict] = {}
  for setting in grid.settings:
    name = setting_name(setting, names)
    if name in seen:
      raise UserError(
        f'sweep settings {seen[name]} and {setting} are both named {name!r}; give '
        'the axes labels or values that differ in their names'
      )
    seen[name] = setting
    for seed, fold in replicas:
      run = Run(name, dict(setting), seed, fold, '', [], spec=spec)
      run.workdir = os.path.abspath(os.path.join(workdir, 'runs', name, run.replica))
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
    if value is None and check_field(base, field, '') is None:
      continue  # already None; ml_collections cannot parse None from the command line
    args.append(f'--config.{field}={flag_value(value)}')
  try:
    config = _parse_like_train(spec, args)
  except Exception as e:  # absl/ml_collections errors: bad value for the field's type
    raise UserError(f'sweep run {run_name}: {str(e).strip().splitlines()[0]}') from None
  for field, value in fields.items():
    parsed = check_field(config, field, '')
    if _jsonable(parsed) != _jsonable(value):
      raise UserError(
        f'sweep run {run_name}: config.{field}={value!r} cannot be given to '
        f'bigjax.train (--config.{field}={flag_value(value)} reads as {parsed!r}); '
        'use a value of the type the field has'
      )
  return args, json.loads(config.to_json())


# ----------------------------------------------------------------------------------------------
# Finished runs
# ----------------------------------------------------------------------------------------------
def is_finished(run: Run) -> bool:
  """Whether `run.workdir` holds this run's final results (see `unfinished_reason`)."""
  return unfinished_reason(run) is None


def unfinished_reason(run: Run) -> str | None:
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
    # Fields present on one side only (added to or removed from bigjax since the run) do not
    # make a run unfinished; differing values of a field do.
    saved, wanted = config_lib.flat_fields(json.load(f)), config_lib.flat_fields(run.config or {})
  changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
  if changed:
    return f"its config.json differs from the config the sweep asks for in {', '.join(changed)}"
  return None
