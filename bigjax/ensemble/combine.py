"""Combine finished runs into an ensemble and report its uncertainty.

  bigjax-ensemble --workdirs=runs/s0,runs/s1,runs/s2 --outdir=runs/ens3 \
      [--calibration_split='train[3500:]'] [--ood=rotate90,noise]
      (runs trained with --config.data.train_split='train[:3500]')
  bigjax-ensemble --workdirs=runs/dropout --mc_dropout=20 --outdir=runs/mc20

Each run is rebuilt from its config.json on this machine's mesh and restored from its newest
checkpoint; its class probabilities on the eval split (the first run's config.data.eval_split)
are computed by one jitted step per batch and the members' probabilities are averaged
(Lakshminarayanan et al. 2017). --mc_dropout=T instead averages T forward passes with dropout on
(Gal & Ghahramani 2016; one run, whose model must have dropout and no batch norm).
--calibration_split: a split of the same dataset that shares no example with any run's train or
eval split (refused otherwise), on which a temperature is fitted (Guo et al. 2017) and applied to
the eval predictions. --ood: shifted eval inputs (bigjax.ensemble.shifts) whose predictive
entropy and confidence are reported. Runs that stream their data are refused (the eval split is
read into memory). Writes OUTDIR/report.json, OUTDIR/reliability.png
(and reliability_calibrated.png) and prints one line per section.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import checkpoint as checkpoint_lib
from bigjax import cli, config_lib, experiment, steps
from bigjax import mesh as mesh_lib
from bigjax.data import inputs as data_inputs
from bigjax.data import pipeline, sources
from bigjax.ensemble import shifts, uncertainty
from bigjax.errors import UserError
from bigjax.reporting import write_json_atomic


def build(workdir: str, devices=None) -> experiment.Experiment:
  """The Experiment of the run in `workdir`, rebuilt from its config.json; UserError without a
  config.json or for a run that streams its data (combining reads the eval split into memory)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'--workdirs: {workdir} holds no config.json; give finished bigjax runs')
  exp = experiment.build(config_lib.saved_config(path), devices)
  if isinstance(exp.eval_arrays, data_inputs.NotInMemory):
    raise UserError(
      f'--workdirs: {workdir} streams its data (config.data.load='
      f"{exp.config.data.load!r}) and bigjax-ensemble needs its eval split in memory; combine "
      "runs trained with config.data.load='memory', or train one run with "
      'config.ensemble.members=N (its eval streams)'
    )
  return exp


def restore(exp: experiment.Experiment, workdir: str) -> Any:
  """The newest checkpoint's train state of the run in `workdir`, on exp's mesh."""
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    state, _ = ckpt.restore_latest(exp.abstract)
  finally:
    ckpt.close()
  if state is None:
    raise UserError(f'--workdirs: {workdir} holds no checkpoint; train it first')
  return state


def load(workdir: str, devices=None) -> tuple[experiment.Experiment, Any]:
  """(Experiment rebuilt from workdir/config.json, its newest checkpoint's state on the mesh)."""
  exp = build(workdir, devices)
  return exp, restore(exp, workdir)


def _rows(name: str, split: str, data_dir) -> tuple[str, int, int]:
  """A split string ('train[3500:]', 'train[90%:]') -> (split name, first row, end row)."""
  base = split.split('[')[0]
  size = len(sources.open_split(name, base, data_dir))
  return sources._split_range(name, split, {base: size})  # the loaders' own slice rules


def check_calibration_split(exps: list[experiment.Experiment], workdirs, split: str) -> None:
  """UserError when `split` shares an example with a run's train split (or its eval split): a
  temperature fitted there would be fitted on what the runs trained (or are scored) on."""
  for exp, workdir in zip(exps, workdirs):
    d = exp.config.data
    if d.standardize:
      raise UserError('--calibration_split with config.data.standardize is not supported')
    name, lo, hi = _rows(d.name, split, d.data_dir)
    for field in ('train_split',) if d.cv_folds else ('train_split', 'eval_split'):
      used, start, stop = _rows(d.name, d[field], d.data_dir)
      if used == name and max(lo, start) < min(hi, stop):
        raise UserError(
          f'--calibration_split={split!r} overlaps config.data.{field}={d[field]!r} of '
          f'{workdir} (rows {max(lo, start)}-{min(hi, stop) - 1} of {name!r}); calibrate on '
          "examples the runs neither train nor are evaluated on (e.g. train the runs on "
          "'train[:3500]' and calibrate on 'train[3500:]')"
        )


def _predict_step(exp: experiment.Experiment, samples: int, seed: int):
  """(state, batch, index) -> (B, ...) eval outputs (probabilities): one eval-mode pass, or the
  mean of `samples` passes with dropout on (keys from (seed, batch index, sample))."""
  model, task = exp.model, exp.task

  def step(state, batch, index):
    batch = task.prepare(batch, jax.random.key(seed))
    variables = {'params': state.params, **state.model_state}
    if not samples:
      return task.eval_outputs(steps.apply_model(model, variables, batch, train=False), batch)
    key = jax.random.fold_in(jax.random.key(seed), index)

    def one(i):
      rngs = {'dropout': jax.random.fold_in(key, i)}
      out = steps.apply_model(model, variables, batch, train=True, rngs=rngs)
      return task.eval_outputs(out, batch)

    return jnp.mean(jax.lax.map(one, jnp.arange(samples)), axis=0)

  return jax.jit(
    step,
    in_shardings=(exp.shardings, exp.batch_sharding, mesh_lib.replicated(exp.mesh)),
    out_shardings=exp.batch_sharding,
  )


def predict(exp: experiment.Experiment, state, arrays: dict, samples: int = 0, seed: int = 0):
  """Host probabilities (N, K) (binary: (N, 1)) of `arrays` ({'inputs': (N, ...), ...}); see
  _predict_step."""
  step = _predict_step(exp, samples, seed)
  out = []
  for i, batch in enumerate(pipeline.eval_batches(arrays, exp.config.eval_batch_size)):
    probs = step(state, exp.to_global(batch), jnp.int32(i))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      probs = multihost_utils.process_allgather(probs, tiled=True)
    out.append(np.asarray(jax.device_get(probs)))
  return np.concatenate(out)[: len(arrays['inputs'])]


def check_mc_dropout(exp: experiment.Experiment, state, samples: int) -> None:
  """UserError when --mc_dropout cannot apply: samples < 0, a model without dropout, or one with
  batch statistics (train mode would use the batch's statistics)."""
  if samples < 0:
    raise UserError(f'--mc_dropout={samples} must be >= 0 (0 = off)')
  if not samples:
    return
  if not getattr(exp.model, 'dropout', 0.0):
    raise UserError(
      f'--mc_dropout={samples} needs a model trained with dropout (config.model.kwargs.dropout '
      '> 0); this run has none'
    )
  if jax.tree.leaves(state.model_state):
    raise UserError(
      f'--mc_dropout={samples}: the model has batch statistics ({", ".join(state.model_state)}), '
      'which train-mode passes would replace by the batch\'s; use a model without batch norm'
    )


def _same_data(exps: list[experiment.Experiment], workdirs: list[str]) -> None:
  first = exps[0]
  for exp, workdir in zip(exps[1:], workdirs[1:]):
    for field in ('name', 'eval_split'):
      if exp.config.data[field] != first.config.data[field]:
        raise UserError(
          f'--workdirs: {workdir} has config.data.{field}={exp.config.data[field]!r} but '
          f'{workdirs[0]} has {first.config.data[field]!r}; combine runs of the same data'
        )
    if exp.task.output_size != first.task.output_size:
      raise UserError(f'--workdirs: {workdir} predicts another number of classes; remove it')


def combine(
  workdirs: Sequence[str],
  *,
  mc_dropout: int = 0,
  calibration_split: str = '',
  ood: Sequence[str] = (),
  outdir: str | None = None,
  devices=None,
) -> dict[str, Any]:
  """The report bigjax-ensemble writes (see module doc) as a dict:
  {'members', 'mc_dropout', 'eval': {accuracy, nll, brier, ece, entropy},
   'calibrated': {..., 'temperature'} (with calibration_split), 'ood': {shift: {entropy,
   confidence}}}. With outdir, also writes report.json and the reliability diagrams there."""
  if not workdirs:
    raise UserError('--workdirs is empty; give one or more finished runs (comma-separated)')
  if mc_dropout and len(workdirs) != 1:
    raise UserError(f'--mc_dropout={mc_dropout} takes one run, not {len(workdirs)}')
  for name in ood:
    shifts.SHIFTS.check(name)
  exps = [build(w, devices) for w in workdirs]
  _same_data(exps, list(workdirs))
  if calibration_split:
    check_calibration_split(exps, workdirs, calibration_split)
  loaded = [(exp, restore(exp, w)) for exp, w in zip(exps, workdirs)]
  check_mc_dropout(exps[0], loaded[0][1], mc_dropout)
  seed = exps[0].config.seed

  def mean_probs(arrays):
    return np.mean([predict(exp, st, arrays, mc_dropout, seed) for exp, st in loaded], axis=0)

  evals = exps[0].eval_arrays
  labels = np.asarray(evals['label'])
  probs = mean_probs(evals)
  classes = uncertainty.as_classes(probs)
  accuracy = float(np.mean(classes.argmax(1) == labels))
  result: dict[str, Any] = {
    'members': list(workdirs),
    'mc_dropout': mc_dropout,
    'eval': {'accuracy': accuracy, **uncertainty.report(probs, labels)},
  }
  if calibration_split:
    d = exps[0].config.data
    held_out = pipeline.load_split(d.name, calibration_split, d.data_dir)
    t = uncertainty.fit_temperature(mean_probs(held_out), np.asarray(held_out['label']))
    calibrated = uncertainty.with_temperature(probs, t)
    result['calibrated'] = {
      'temperature': t,
      'accuracy': float(np.mean(calibrated.argmax(1) == labels)),
      **uncertainty.report(calibrated, labels),
    }
  result['ood'] = {}
  for name in ood:
    shifted = uncertainty.as_classes(mean_probs(shifts.shifted(name, evals)))
    result['ood'][name] = {
      'entropy': uncertainty.entropy(shifted),
      'confidence': float(shifted.max(1).mean()),
    }
  if outdir:
    os.makedirs(outdir, exist_ok=True)
    write_json_atomic(os.path.join(outdir, 'report.json'), result)
    what = f'MC dropout x{mc_dropout}' if mc_dropout else f'{len(workdirs)} member(s)'
    uncertainty.reliability_diagram(probs, labels, os.path.join(outdir, 'reliability.png'), what)
    if calibration_split:
      uncertainty.reliability_diagram(
        uncertainty.with_temperature(probs, result['calibrated']['temperature']),
        labels,
        os.path.join(outdir, 'reliability_calibrated.png'),
        f'{what}, T={result["calibrated"]["temperature"]:.2f}',
      )
  return result


def _main(argv: Sequence[str]) -> int:
  parser = cli.Parser('bigjax-ensemble', __doc__)
  parser.string('workdirs', None, 'Finished runs, comma-separated.', required=True)
  parser.string('outdir', None, 'Where report.json and the diagrams go.', required=True)
  parser.integer('mc_dropout', 0, 'Dropout samples averaged per example (one run); 0 = off.')
  parser.string('calibration_split', '', 'Held-out split to fit a temperature on ("" = none).')
  parser.string('ood', '', f'Comma-separated input shifts: {", ".join(shifts.SHIFTS.names())}.')
  fv = parser.parse(argv)
  result = combine(
    [w.strip() for w in fv.workdirs.split(',') if w.strip()],
    mc_dropout=fv.mc_dropout,
    calibration_split=fv.calibration_split,
    ood=[s.strip() for s in fv.ood.split(',') if s.strip()],
    outdir=fv.outdir,
  )
  for section in ('eval', 'calibrated'):
    if section in result:
      print(f'{section}: ' + ', '.join(f'{k}={v:.4f}' for k, v in result[section].items()))
  for name, values in result['ood'].items():
    print(f'ood {name}: ' + ', '.join(f'{k}={v:.4f}' for k, v in values.items()))
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
