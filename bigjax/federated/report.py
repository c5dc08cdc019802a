"""Rounds to a target accuracy, McMahan et al. 2017's measure, from runs' histories.

`first_reached` reads one run's results['history']; `rounds_to_target` writes a sweep's table of
it (markdown + csv) and `plot_accuracy_vs_rounds` its curves: a sweep file's plot(runs, outdir)
hook calls them (experiments/fedavg/).
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import io
import os

import numpy as np

from bigjax.reporting import write_atomic


def first_reached(history: Sequence[dict], target: float, metric: str = 'accuracy') -> int | None:
  """The first step (round) whose eval `metric` is >= target, or None if no eval reached it."""
  for entry in history:
    if entry.get('split') == 'eval' and entry.get(metric, -np.inf) >= target:
      return int(entry['step'])
  return None


def rounds_to_target(
  runs: Sequence, targets: Sequence[float], outdir: str, name: str = 'rounds_to_target'
) -> list[dict]:
  """Writes outdir/<name>.md and .csv: per finished run, its setting, the last step (round) and
  its accuracy, the best eval accuracy and the first step reaching each target ('not reached in
  R' when none did). Returns the rows."""
  rows = []
  for run in runs:
    if not run.finished:
      continue
    history = run.results['history']
    evals = [h['accuracy'] for h in history if h.get('split') == 'eval']
    row = {
      'setting': run.setting,
      'seed': run.seed,
      'rounds': run.results['step'],
      'final_accuracy': run.results['eval']['accuracy'],
      'best_accuracy': max(evals),
    }
    for target in targets:
      reached = first_reached(history, target)
      row[f'to_{target:g}'] = reached if reached is not None else f'not reached in {row["rounds"]}'
    rows.append(row)
  if not rows:
    return rows
  keys = list(rows[0])
  text = io.StringIO()
  writer = csv.DictWriter(text, keys)
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(os.path.join(outdir, f'{name}.csv'), text.getvalue())
  cell = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + ' --- |' * len(keys)]
  lines += ['| ' + ' | '.join(cell(r[k]) for k in keys) + ' |' for r in rows]
  write_atomic(os.path.join(outdir, f'{name}.md'), '\n'.join(lines) + '\n')
  return rows


def plot_accuracy_vs_rounds(
  runs: Sequence, outdir: str, targets: Sequence[float] = (), xlabel: str = 'round'
) -> None:
  """outdir/accuracy_vs_rounds.png: each finished run's eval accuracy against its step (round),
  with the targets as dashed lines."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for run in runs:
    if run.finished:
      points = [(h['step'], h['accuracy']) for h in run.results['history'] if h['split'] == 'eval']
      ax.plot(*zip(*points), marker='.', label=run.setting)
  for target in targets:
    ax.axhline(target, color='grey', linestyle='--', linewidth=0.8)
  ax.set(xlabel=xlabel, ylabel='test accuracy (global model)', xscale='log')
  ax.legend(fontsize='x-small')
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'accuracy_vs_rounds.png'), dpi=100)
  plt.close(fig)
