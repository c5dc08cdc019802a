"""Train and evaluate any experiment from its config.

  bigjax-train --config=mnist_cnn[:arg=value,...] --workdir=runs/mnist_cnn [--config.optim.lr=3e-4 ...]
  bigjax-train --config=configs/mnist_cnn.py --dry_run      (resolved config, parameters, memory)

(`python -m bigjax.train` is the same command.) Re-running the same command on the same workdir
resumes from its newest good checkpoint. From a colab: `bigjax.train.train_and_evaluate(config,
workdir)` returns the final results dict.

The workdir receives config.json, sharding.txt, checkpoints/, tensorboard/, history.jsonl (the
learning curve, kept across restarts), with config.early_stopping best/ and best.json, and at the
end results.json (and eval_predictions.npz with config.save_eval_predictions, reliability.png
with config.ensemble.members > 1). Invalid input (unknown field, wrong type, bad mesh or batch
size, unknown component, missing dataset) is reported on one line with exit status 2 before
anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from bigjax import checkpoint as checkpoint_lib
from bigjax import cli, experiment, federated, flops, history, init_from, optim, peft, reporting
from bigjax import compile as compile_lib
from bigjax import mesh as mesh_lib
from bigjax import workdir as workdir_lib
from bigjax.errors import NonFiniteError, Preempted, UserError
from bigjax.preemption import PeerWatch, Preemption


def save_eval_predictions(path: str, task, outputs, labels) -> None:
  """Writes `path` (.npz) with labels (N,) and the task's prediction scores (binary: (N,)
  P(label=1); else (N, K) class probabilities)."""
  import io

  buffer = io.BytesIO()
  np.savez(buffer, labels=np.asarray(labels), scores=task.prediction_scores(outputs))
  reporting.write_atomic(path, buffer.getvalue())


def _scalars(report: dict) -> dict:
  return {k: v for k, v in report.items() if np.ndim(v) == 0}


@dataclasses.dataclass
class Loop:
  """What the training loop carries between steps."""

  step: int
  last_saved: int | None
  pending: list = dataclasses.field(default_factory=list)  # per-step device metrics not yet read
  train_metrics: dict = dataclasses.field(default_factory=dict)
  skipped: int = 0
  last_eval: tuple = (None, None)  # (step, report) of the newest eval
  t_train: float | None = None  # time after the first (warm-up) step
  first_timed_step: int = 0
  data_wait_s: float = 0.0  # time the timed steps spent blocked on the next batch


# Steps dispatched ahead of the host. Bounded because XLA:CPU can deadlock once more computations
# than its per-device in-flight limit (32) queue on several devices that share collectives: seen
# with 60 steps dispatched back to back on a 2x2x2 mesh of fake CPU devices (every device thread
# idle at an all-reduce or all-gather, one launch waiting on that limit's semaphore; stop 24's CI
# run and again on 2026-12-07). 8 queued steps should keep an accelerator busy (not yet measured on
# a GPU).
MAX_STEPS_IN_FLIGHT = 8


def _is_time(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def train_and_evaluate(
  config, workdir: str, devices=None, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns results.json's dict.

  devices: the devices to build the mesh over (default: all). results['history'] lists the train
  metrics at every log step and the eval metrics at every eval, as {'step', 'split', ...} dicts,
  over the whole run (kept in workdir/history.jsonl across restarts). With config.early_stopping,
  results['best'] is best.json's {'step', 'metric', 'value', 'eval'} and results['stopped_early']
  says whether patience ran out; re-running a run that stopped early only redoes the final results.

  Resuming with a changed config: a change of the train state's structure (optimizer, model, data
  shapes) is refused and the checkpoints stay as they are; a change of the trajectory (lr, schedule,
  batch size, seed, num_steps, ...) is refused unless `allow_config_change`, and then recorded in
  workdir/config_changes.jsonl (config.json keeps the config the run started with); changes of
  execution only (mesh, logging and checkpoint cadence, ...) are accepted and recorded. Only one
  process at a time may run in a workdir (workdir/.lock).

  Raises UserError for invalid input before anything is written, NonFiniteError when the loss or
  gradient norm becomes NaN/Inf under nan_policy='raise', Preempted after saving on SIGTERM/SIGINT.
  """
  t_start = time.time()
  # -- 1. Build and validate everything; nothing is written until this section has passed.
  workdir = workdir_lib.resolve(workdir)
  exp = experiment.build(config, devices)
  saved = workdir_lib.read_saved_config(workdir)
  workdir_lib.check_same_components(workdir, saved, config)
  # config.init_from (a run's checkpoint or a HuggingFace directory): read and checked before
  # anything is written; `loaded` puts its parameters into the fresh state.
  loaded = init_from.prepare(config, exp.model, exp.abstract.params)
  chief = jax.process_index() == 0
  if chief:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise UserError(
        f'--workdir={workdir} cannot be created ({e.strerror}); choose another'
      ) from None
  with workdir_lib.Lock(workdir, enabled=chief):  # one writer at a time, from here to the end
    return _train(config, exp, workdir, saved, loaded, allow_config_change, t_start)


def _train(config, exp, workdir, saved, loaded, allow_config_change, t_start) -> dict[str, Any]:
  """Sections 2-5 of train_and_evaluate, inside the workdir lock."""
  # -- 2. Workdir: config, checkpoints, restore or initialise.
  chief = jax.process_index() == 0
  sharding_lines, state_bytes = mesh_lib.describe(exp.abstract, exp.shardings)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  ckpt = peft.checkpointer(config, exp, ckpt, loaded)  # config.peft.save='trainable': adapter only
  try:
    changes = workdir_lib.resume_changes(config, exp.abstract, ckpt, saved, allow_config_change)
  except UserError:
    ckpt.close()
    raise
  if chief:
    if saved is None or not ckpt.all_steps():  # config.json describes the run's checkpoints
      reporting.write_json_atomic(
        os.path.join(workdir, 'config.json'), json.loads(config.to_json())
      )
    reporting.write_atomic(os.path.join(workdir, 'sharding.txt'), '\n'.join(sharding_lines) + '\n')
  state, step = ckpt.restore_latest(exp.abstract)
  if changes and chief:
    workdir_lib.record_changes(workdir, step or 0, changes)
  if state is None:
    state, step = exp.create_state(), 0
    if loaded is not None:
      state = state.replace(params=loaded(state.params))
  loop = Loop(step=step, last_saved=step or None)

  # -- 3. Compile the steps ahead of time (compile time is reported apart from training).
  t0 = time.time()
  train_step = exp.compile_train_step()
  compile_s = time.time() - t0
  eval_step = exp.compile_eval_step()

  # -- 4. Train.
  reporter = reporting.Reporter(
    workdir, step, exp.total_steps, wandb=config.wandb, run_config=config.to_dict()
  )
  lr_at = optim.learning_rate_schedule(config.optim, exp.total_steps)  # lr of update `count`
  unit = federated.unit(config)  # 'round' with config.federated, else 'step'
  profile = reporting.Profile(os.path.join(workdir, 'profile'), config.profile_steps, chief)
  reporter.print(
    f'bigjax: {config.model.name} on {config.data.name}, {exp.total_steps} {unit}s, '
    f'mesh ({mesh_lib.layout(exp.mesh)}), {exp.mesh.size} '
    f'{jax.devices()[0].platform} devices, {state_bytes / 2**20:.1f} MiB of train '
    'state per device (per-parameter sharding in sharding.txt)'
    + (f', resuming at step {step}' if step else '')
  )
  if exp.peft is not None:  # config.peft: trainable / total parameters
    reporter.print(exp.peft.describe())
  if changes:
    reporter.print(
      f'bigjax: resuming with config changes (in config_changes.jsonl): '
      f'{workdir_lib.describe(changes)}'
    )
  hist = history.History(os.path.join(workdir, 'history.jsonl'), step)
  early = history.EarlyStopping(config.early_stopping, workdir, hist.entries)
  if early.stopped:
    reporter.print(f'bigjax: this run stopped early at step {step}; redoing the final results')
  first_step = step

  def log_train():
    """Averages the pending per-step metrics into the history entry of `loop.step`; raises
    NonFiniteError on NaN/Inf under nan_policy='raise'."""
    fetched = jax.device_get(loop.pending)
    finite = np.array([m['finite'] for m in fetched])
    loop.train_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    loop.pending = []
    if config.nan_policy == 'raise' and not finite.all():
      bad = loop.step - len(finite) + int(np.argmin(finite)) + 1
      where = f'step {loop.last_saved} in {ckpt.directory}' if loop.last_saved else 'none saved yet'
      raise NonFiniteError(
        f'loss or gradient norm is NaN/Inf at step {bad}; last good '
        f'checkpoint: {where}. Lower config.optim.lr, set '
        'config.optim.clip_norm, or use config.nan_policy=skip'
      )
    loop.skipped += int((1 - finite).sum())
    reporter.scalars(
      loop.step,
      'train',
      dict(
        loop.train_metrics,
        skipped_steps=loop.skipped,
        lr=float(lr_at(loop.step - 1)),  # the step just taken applied update number step - 1
        steps_per_s=reporter.steps_per_s(loop.step),
      ),
    )
    hist.append({'step': loop.step, 'split': 'train', **loop.train_metrics})

  def periodic_eval():
    report = exp.evaluate(eval_step, state)
    early.update(loop.step, report, state)  # saves the best state
    reporter.scalars(loop.step, 'eval', report)
    hist.append({'step': loop.step, 'split': 'eval', **_scalars(report)})
    loop.last_eval = (loop.step, report)
    reporter.print(
      f'{unit} {loop.step}: eval '
      + ', '.join(f'{k}={v:.4g}' for k, v in _scalars(report).items())
      + f' (lr {float(lr_at(loop.step - 1)):.3g})'
    )
    if early.stopped:
      reporter.print(
        f'early stopping at step {loop.step}: {config.early_stopping.metric} has '
        f'not improved for {early.bad_evals} evals (best {early.best_value:.4g} at '
        f'step {early.best_step})'
      )

  def last_saved() -> str:  # read as the process ends: a save still in flight never commits
    step = ckpt.newest_committed_step()
    return f'{step} in {ckpt.directory}' if step is not None else 'none'

  try:
    with (
      Preemption(config.log_every) as preemption,
      PeerWatch(config.distributed.peer_timeout_s, last_saved, config.distributed.timeout_s),
    ):
      batches = exp.device_batches(loop.step)  # grain, read ahead and moved to the devices ahead
      while loop.step < exp.total_steps and not early.stopped:
        profile.before(loop.step)
        t_wait = time.time()
        batch = next(batches)
        if loop.t_train is not None:  # counted over the timed steps, as train_s is
          loop.data_wait_s += time.time() - t_wait
        state, metrics = train_step(state, batch)
        if loop.t_train is None:  # throughput counts the steps after the first (warm-up) one
          jax.block_until_ready(metrics)
          loop.t_train, loop.first_timed_step = time.time(), loop.step + 1
        loop.step += 1
        profile.after(loop.step, state)
        loop.pending.append(metrics)
        if len(loop.pending) > MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(loop.pending[-MAX_STEPS_IN_FLIGHT - 1])
        reporter.step()
        done = loop.step == exp.total_steps
        stop = preemption.stop_requested(loop.step)  # read once: a signal may arrive at any time
        save = done or _is_time(loop.step, config.checkpoint_every) or bool(stop)
        if save or _is_time(loop.step, config.log_every):
          log_train()
        if _is_time(loop.step, config.eval_every) and not done:
          periodic_eval()
          if early.stopped:  # history, then the checkpoint, hold this step
            if loop.pending:
              log_train()
            save = True
        if save:
          ckpt.save(loop.step, state)
          loop.last_saved = loop.step
        if stop and not done:
          raise Preempted(
            f'{stop} received: saved step {loop.step} in {ckpt.directory}; '
            'run the same command again to resume'
          )
    jax.block_until_ready(state)
    step = loop.step
    train_s = time.time() - loop.t_train if loop.t_train else 0.0
    timed_steps = step - loop.first_timed_step if loop.t_train else 0

    # -- 5. Final evaluation and results (an eval already in the history is not counted twice).
    diagram = config.ensemble.members > 1  # an in-step ensemble draws its reliability diagram
    if loop.last_eval[0] == step and not (config.save_eval_predictions or diagram):
      eval_report = loop.last_eval[1]
    else:
      eval_report, outputs = exp.evaluate(eval_step, state, return_outputs=True)
      if config.save_eval_predictions and chief:
        save_eval_predictions(
          os.path.join(workdir, 'eval_predictions.npz'), exp.task, outputs, exp.eval_labels()
        )
      if diagram and chief:
        from bigjax.ensemble import uncertainty

        uncertainty.reliability_diagram(
          outputs,
          exp.eval_labels(),
          os.path.join(workdir, 'reliability.png'),
          f'{config.ensemble.members} members',
        )
    if not hist.has(step, 'eval'):
      reporter.scalars(step, 'eval', eval_report)
      hist.append({'step': step, 'split': 'eval', **_scalars(eval_report)})
      early.update(step, eval_report, state)
    if config.quantize.mode:  # the quantized model's eval, size and speed (quant_*, *_bytes, *_ms)
      from bigjax.compress import quantize

      eval_report = {**eval_report, **quantize.report(exp, state)}
    reporter.print(
      'final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in _scalars(eval_report).items())
    )
    reporter.hparams(config.to_dict(), {f'eval/{k}': v for k, v in _scalars(eval_report).items()})
    throughput = flops.throughput_report(exp, train_step, train_s, timed_steps) if chief else None
    if throughput:  # blocked on next(batches): an upper bound on the device's wait for data
      throughput['data_wait_s'] = loop.data_wait_s
      throughput['data_wait_fraction'] = loop.data_wait_s / train_s if train_s > 0 else None
    if throughput and throughput['mfu'] is not None:
      rate = (
        f"{throughput['tokens_per_s']:,.0f} tokens/s"
        if throughput['tokens_per_s']
        else f"{throughput['examples_per_s']:,.0f} examples/s"
      )
      reporter.print(
        f"throughput: {throughput['step_time_s'] * 1e3:.1f} ms/step, {rate}, "
        f"MFU {throughput['mfu']:.1%} of {throughput['peak_source']}"
        + (
          f", waiting for data {throughput['data_wait_fraction']:.1%}"
          if throughput['data_wait_fraction'] is not None
          else ''
        )
      )
  finally:
    profile.close()
    ckpt.close()  # waits for in-flight saves: nothing already written is lost
    early.close()
    hist.close()
    reporter.close()
  results = {
    'step': step,
    'eval': eval_report,
    'train': loop.train_metrics,
    'skipped_steps': loop.skipped,
    'steps_this_run': step - first_step,
    'compile_s': compile_s,
    'wall_time_s': time.time() - t_start,
    'train_examples_per_s': timed_steps * config.batch_size / train_s if train_s > 0 else None,
    'num_params': int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))),
    # config.peft: the parameters that train (the adapter, config.peft.trainable_base)
    'num_trainable': exp.peft.num_trainable if exp.peft is not None else None,
    # per-device bytes of the compiled train step (XLA's memory analysis; bigjax/compile.py)
    'train_step_memory': compile_lib.memory_report(train_step),
    'devices': exp.mesh.size,
    'platform': jax.devices()[0].platform,
    'throughput': throughput,
    'history': hist.entries,
    'best': early.best(),
    'stopped_early': early.stopped,
  }
  if chief:
    reporting.write_json_atomic(os.path.join(workdir, 'results.json'), results)
  return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def make_parser() -> cli.Parser:
  parser = cli.Parser('bigjax-train', __doc__, with_config=True)
  parser.string(
    'workdir', None, 'Directory for checkpoints, logs and results (not needed with --dry_run).'
  )
  parser.boolean(
    'allow_config_change',
    False,
    'Resume a run with a config whose changes alter its trajectory (lr, schedule, batch size, '
    'seed, num_steps, ...); each change is recorded in WORKDIR/config_changes.jsonl.',
  )
  parser.boolean(
    'dry_run',
    False,
    'Print the resolved config, the parameter table, the mesh and '
    'the per-device memory of the compiled train step, then exit without writing.',
  )
  return parser


def parse_flags(argv: Sequence[str]) -> tuple[Any, str | None]:
  """argv -> (config, workdir) as bigjax-train reads them. Every mistake raises UserError with a
  one-line message; a missing --workdir is an error (use make_parser() for --dry_run)."""
  fv = make_parser().parse(argv)
  if not fv.workdir:
    raise UserError(
      'both --config=NAME[:args] and --workdir=DIR are required; see bigjax-train --help'
    )
  return fv.config, fv.workdir


def _main(argv: Sequence[str]) -> int:
  fv = make_parser().parse(argv)
  if fv.dry_run:
    from bigjax import dry_run

    dry_run.run(fv.config)
    return 0
  if not fv.workdir:
    raise UserError(
      'both --config=NAME[:args] and --workdir=DIR are required; see bigjax-train --help'
    )
  train_and_evaluate(fv.config, fv.workdir, allow_config_change=fv.allow_config_change)
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2; NaN/Inf exits 1; SIGTERM/SIGINT saves a
  checkpoint and exits 143."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
