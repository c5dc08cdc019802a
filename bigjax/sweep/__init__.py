"""Sweeps: one config over a grid of overrides and seeds (or CV folds), ending in a table and plots.

  bigjax-sweep --sweep=experiments/<name>/sweep.py --workdir=DIR [--jobs=N]
      [--launcher=local|slurm|ray] [--gpus_per_task=G --time_min=T --partition=P ...]
  (or python -m bigjax.sweep ...; from any directory)

A sweep file defines `get_sweep()` returning a `Sweep`:

  from bigjax import sweep

  def get_sweep():
    return sweep.Sweep(
        config='mnist_cnn:smoke',                  # as --config takes it: a name or a file path
        overrides={'num_epochs': 2},               # every run
        settings=sweep.product(sweep.axis('batch_size', [32, 64]),
                               sweep.zip_axes(sweep.axis('optim.lr', [1e-3, 3e-3]),
                                              sweep.axis('optim.warmup_steps', [0, 100]))),
        seeds=[0, 1],                              # or folds=K: K-fold cross-validation
        metrics=['accuracy', 'loss'])              # keys of results.json['eval']; first = main

Every run is a plain `python -m bigjax.train` subprocess (in the sweep's working directory, with
absolute paths) in its own workdir DIR/runs/<setting>/seed_<s> (or fold_<i>), its output appended
to log.txt there, so every run resumes on its own: re-running the sweep skips finished runs and
re-launches the others. Before anything runs, every run's config is built exactly as bigjax.train
will parse it, so an unknown field or a bad value is one line (UserError, exit 2). At the end DIR
gets results.csv (one row per run), results.md (one row per setting: mean ± std over seeds or
folds), metric_vs_<axis>.png for each axis with several values, learning_curves.png, and whatever
the sweep's plot(runs, DIR) draws.

--launcher=slurm submits the runs as one SLURM job array through submitit, --launcher=ray as one
Ray task each (bigjax/sweep/launchers/); what a run asks for comes from `Sweep(resources={...})`
and the resource flags (bigjax.cluster.resources). Planning, skipping and resuming are the same.
"""

# Modules: grid (axes, products, zips; names of settings and values), plan (Sweep, Run, planning,
# finished runs), launch (run_sweep: the runs through a launcher, progress), launchers/ (local,
# slurm, ray), report (results.csv/.md, plots), __main__ (the command line).
from __future__ import annotations

from collections.abc import Sequence

from bigjax.sweep.grid import (
  Axis,
  Grid,
  axis,
  flag_value,
  product,
  setting_name,
  short_names,
  to_builtin,
  zip_axes,
)
from bigjax.sweep.launch import run_sweep
from bigjax.sweep.plan import Run, Sweep, is_finished, load_sweep, unfinished_reason
from bigjax.sweep.report import metric_value, setting_stats, write_reports

# `bigjax.sweep.plan` stays the module; its planning function is `bigjax.sweep.plan.plan`.
__all__ = [
  'Axis',
  'Grid',
  'Run',
  'Sweep',
  'axis',
  'flag_value',
  'is_finished',
  'load_sweep',
  'main',
  'metric_value',
  'product',
  'run_sweep',
  'setting_name',
  'setting_stats',
  'short_names',
  'to_builtin',
  'unfinished_reason',
  'write_reports',
  'zip_axes',
]


def main(argv: Sequence[str] | None = None) -> None:
  """The bigjax-sweep command (see bigjax.sweep.__main__.main); argv[0] is the program name."""
  # Imported here, not at the top: `python -m bigjax.sweep` must find bigjax.sweep.__main__ not yet
  # imported when it runs that file as __main__.
  from bigjax.sweep.__main__ import main as cli_main

  cli_main(argv)
