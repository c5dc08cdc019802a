"""A sweep's results: each run's metrics, results.csv, results.md and the plots."""

from __future__ import annotations

from collections.abc import Sequence
import csv
import io
import json
import math
import os
from typing import Any

import numpy as np

from bigjax.reporting import write_atomic
from bigjax.sweep.grid import Grid, fmt, short_names, show
from bigjax.sweep.plan import Run, Sweep


def metric_value(results: dict, name: str) -> float:
  """A metric of a results.json dict by name (see Sweep.metrics); NaN when absent."""
  section, _, key = name.rpartition('/')
  report = {
    '': results.get('eval'),
    'train': results.get('train'),
    'best': (results.get('best') or {}).get('eval'),
  }.get(section) or {}
  value = report.get(key)
  return float(value) if value is not None and np.ndim(value) == 0 else math.nan


def load_results(run: Run, sw: Sweep) -> None:
  """Reads the run's results.json into run.results and its metrics (then `derived`) into
  run.metrics."""
  with open(os.path.join(run.workdir, 'results.json')) as f:
    run.results = json.load(f)
  run.metrics = {m: metric_value(run.results, m) for m in sw.metrics}
  for name, fn in sw.derived.items():
    run.metrics[name] = float(fn(dict(run.metrics)))


def setting_stats(runs: Sequence[Run], metrics: Sequence[str]) -> dict[str, dict[str, tuple]]:
  """{setting name: {metric: (mean, std, n)}} over the finished runs of each setting; std has
  ddof=0 (population), n counts the finished seeds/folds with a finite value."""
  stats: dict[str, list] = {}
  for run in runs:
    stats.setdefault(run.setting, [])
    if run.finished:
      stats[run.setting].append(run)
  out: dict[str, dict] = {}
  for name, done in stats.items():
    out[name] = {}
    for m in metrics:
      values = np.array([r.metrics[m] for r in done], float)
      values = values[np.isfinite(values)]
      out[name][m] = (
        (float(values.mean()), float(values.std()), len(values))
        if len(values)
        else (math.nan, math.nan, 0)
      )
  return out


def write_reports(sw: Sweep, runs: Sequence[Run], outdir: str, sweep_path: str = '') -> None:
  """results.csv, results.md and the plots in `outdir`, then the sweep's plot(runs, outdir)."""
  grid = sw.grid
  names = short_names(grid.axes)
  metrics = sw.reported
  stats = setting_stats(runs, metrics)
  replica = 'fold' if sw.folds else 'seed'
  table = io.StringIO(newline='')
  writer = csv.writer(table)
  writer.writerow(
    ['setting', *(a.field for a in grid.axes), replica, *metrics, 'step', 'wall_time_s', 'status']
  )
  for r in runs:
    res = r.results or {}
    writer.writerow(
      [
        r.setting,
        *(show(r.values[a.field]) for a in grid.axes),
        r.fold if sw.folds else r.seed,
        *(repr(r.metrics[m]) if r.finished else '' for m in metrics),
        # wall time of the bigjax.train launch that finished the run
        res.get('step', ''),
        res.get('wall_time_s', ''),
        'finished' if r.finished else r.status,
      ]
    )
  write_atomic(os.path.join(outdir, 'results.csv'), table.getvalue())
  # One row per setting, in sweep order.
  lines = [
    f'| {" | ".join([*names, *metrics, "n"])} |',
    '|' + ' --- |' * (len(names) + len(metrics) + 1),
  ]
  settings = {r.setting: r.values for r in runs}
  for name, values in settings.items():
    cells = [show(values[a.field]) for a in grid.axes]
    cells += [
      f'{mean:.4g} ± {std:.4g}' if n else '—' for mean, std, n in (stats[name][m] for m in metrics)
    ]
    n_done = sum(r.finished for r in runs if r.setting == name)
    lines.append(f'| {" | ".join([*cells, str(n_done)])} |')
  failed = [r.name for r in runs if r.status == 'failed']
  lines += [
    '',
    f'mean ± std (population std, ddof=0) over {replica}s; n = finished {replica}s. '
    f'Config {sw.config}' + (f', sweep {sweep_path}' if sweep_path else '') + '.',
  ]
  if failed:
    lines.append(f'Failed runs (not in the table): {", ".join(failed)}.')
  write_atomic(os.path.join(outdir, 'results.md'), '\n'.join(lines) + '\n')
  plot_metric_vs_axes(grid, names, runs, stats, metrics[0], replica, outdir)
  plot_learning_curves(runs, metrics[0], outdir)
  if sw.plot is not None:
    sw.plot(runs, outdir)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_metric_vs_axes(
  grid: Grid,
  names: Sequence[str],
  runs: Sequence[Run],
  stats: dict[str, dict[str, tuple]],
  metric: str,
  replica: str,
  outdir: str,
) -> None:
  """metric_vs_<axis>.png for each axis with more than one value: the metric (mean, error bars =
  std over seeds/folds) against the axis, one line per combination of the axes not zipped with
  it."""
  settings = {r.setting: r.values for r in runs}
  for i, (ax, name) in enumerate(zip(grid.axes, names)):
    values = list({show(v): v for v in ax.values}.values())
    if len(values) < 2:
      continue
    locked = next(g for g in grid.groups if i in g)
    others = [j for j in range(len(grid.axes)) if j not in locked]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {show(v): (v if numeric else k) for k, v in enumerate(values)}
    lines: dict[str, list] = {}
    for setting, vals in settings.items():
      key = ', '.join(f'{names[j]}={show(vals[grid.axes[j].field])}' for j in others)
      mean, std, _ = stats[setting][metric]
      lines.setdefault(key, []).append((position[show(vals[ax.field])], mean, std))
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(6, 4))
    for key, points in lines.items():
      x, y, e = np.array(sorted(points)).T
      axes.errorbar(x, y, yerr=e, marker='o', capsize=3, label=key or None)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      axes.set_xscale('log')
    if not numeric:
      axes.set_xticks(range(len(values)), [show(v) for v in values])
    axes.set_xlabel(name)
    axes.set_ylabel(f'{metric} (mean ± std over {replica}s)')
    axes.set_title(f'{metric} vs {name}')
    if any(lines):
      axes.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, f'metric_vs_{fmt(name)}.png'), dpi=100)
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


def plot_learning_curves(runs: Sequence[Run], metric: str, outdir: str) -> None:
  """learning_curves.png: train loss against step per setting (mean over seeds/folds) and, when the
  history has eval entries, the eval `metric` against step."""
  done: dict[str, list[Any]] = {}
  for r in runs:
    if r.finished:
      done.setdefault(r.setting, []).append(r)
  curves = {
    name: (_curve(rs, 'train', 'loss'), _curve(rs, 'eval', metric)) for name, rs in done.items()
  }
  has_eval = any(ev[0] for _, ev in curves.values())
  plt = _pyplot()
  fig, axes = plt.subplots(
    1, 2 if has_eval else 1, figsize=(11 if has_eval else 6, 4), squeeze=False
  )
  for name, (train, ev) in curves.items():
    (line,) = axes[0, 0].plot(*train, label=name)
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
