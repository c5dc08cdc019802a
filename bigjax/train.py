"""Train and evaluate any experiment from its config file.

  python -m bigjax.train --config=configs/mnist_cnn.py[:arg=value,...] --workdir=runs/mnist_cnn \
      [--config.optim.lr=3e-4 ...]

Re-running the same command on the same workdir resumes from its newest good checkpoint. From a
colab: `bigjax.train.train_and_evaluate(config, workdir)` returns the final results dict.

The workdir receives config.json, checkpoints/, tensorboard/, history.jsonl (the learning curve,
kept across restarts), with config.early_stopping best/ and best.json, and at the end results.json
(and eval_predictions.npz with config.save_eval_predictions). Invalid
input (unknown field, wrong type, bad mesh or batch size, unknown component, missing dataset) is
reported on one line with exit status 2 before anything is written.
"""
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bigjax import checkpoint as checkpoint_lib
from bigjax import flops
from bigjax import init_from
from bigjax import mesh as mesh_lib
from bigjax import optim
from bigjax import registry
from bigjax import reporting
from bigjax import steps
from bigjax.data import pipeline
from bigjax.errors import NonFiniteError, UserError
from bigjax.tasks import classification


# ----------------------------------------------------------------------------------------------
# Building the parts (pure: reads the config and data, writes nothing)
# ----------------------------------------------------------------------------------------------
def build_component(kind, cfg):
  """Instantiates `bigjax.<kind>.<cfg.name>`'s Model/Task with cfg.kwargs; bad kwargs -> UserError."""
  cls = registry.load(kind, cfg.name)
  kwargs = cfg.kwargs.to_dict() if hasattr(cfg.kwargs, 'to_dict') else dict(cfg.kwargs)
  field = f'config.{"model" if kind == "models" else "task"}.kwargs'
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise UserError(f'{field} does not fit {cfg.name!r} ({e}); fix or remove that field') from None


def load_data(config, task):
  """Train and eval splits as host arrays {'inputs', 'label'}, checked against the task.

  With config.data.cv_folds = K, both come from the train split: K-1 folds to train on and fold
  config.data.cv_fold to evaluate on (pipeline.cv_split); config.data.eval_split is not read.
  """
  d = config.data
  splits = (d.train_split,) if d.cv_folds else (d.train_split, d.eval_split)
  if d.view:
    from bigjax.data import text
    loaded = [text.load_text_split(d.name, split, d.view, d.seq_len, d.data_dir, config.seed,
                                   tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                                   train_split=d.train_split)
              for split in splits]
  else:
    loaded = [pipeline.load_split(d.name, split, d.data_dir) for split in splits]
  if d.cv_folds:
    train, evals = pipeline.cv_split(loaded[0], d.cv_folds, d.cv_fold)
    eval_name = f'{d.train_split} (cv fold {d.cv_fold} of {d.cv_folds})'
  else:
    (train, evals), eval_name = loaded, d.eval_split
  if d.standardize:
    train, evals = pipeline.standardize(train, evals)
  if d.eval_max_examples:
    evals = {k: v[:d.eval_max_examples] for k, v in evals.items()}
  task.check_data(train, d.name, d.train_split)
  task.check_data(evals, d.name, eval_name)
  return train, evals


def check_config(config, mesh):
  """Validates the fields that no component checks by itself."""
  dp = mesh_lib.data_parallel_size(mesh)
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value <= 0 or value % dp or value % jax.process_count():
      raise UserError(f'config.{field}={value} is not divisible by the data-parallel size {dp} '
                      f'(mesh data x fsdp) and {jax.process_count()} processes; use a multiple')
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % dp:
    raise UserError(f'config.grad_accum_steps={accum} must divide config.batch_size='
                    f'{config.batch_size} into micro-batches divisible by the data-parallel size '
                    f'{dp}')
  for field in ('log_every', 'checkpoint_every'):
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]} must be positive')
  if config.nan_policy not in steps.NAN_POLICIES:
    raise UserError(f'config.nan_policy={config.nan_policy!r} is unknown; use one of '
                    f'{", ".join(steps.NAN_POLICIES)}')
  folds, fold = config.data.cv_folds, config.data.cv_fold
  if folds and (folds < 2 or not 0 <= fold < folds):
    raise UserError(f'config.data.cv_folds={folds}, cv_fold={fold}: need cv_folds >= 2 and '
                    f'0 <= cv_fold < cv_folds (or cv_folds=0 for no cross-validation)')
  if not folds and fold:
    raise UserError(f'config.data.cv_fold={fold} needs config.data.cv_folds >= 2; set both')
  es = config.early_stopping
  if es.metric:
    if config.eval_every <= 0:
      raise UserError(f'config.early_stopping.metric={es.metric!r} needs periodic evals; set '
                      'config.eval_every > 0')
    if es.mode not in ('max', 'min'):
      raise UserError(f"config.early_stopping.mode={es.mode!r} is unknown; use 'max' or 'min'")
    if es.patience < 0 or es.min_delta < 0:
      raise UserError(f'config.early_stopping.patience={es.patience} and min_delta={es.min_delta} '
                      'must be >= 0')


def check_output_size(model, task, boxed_state, sample):
  """Raises UserError when the model's output size differs from what the task needs."""
  variables = nn.meta.unbox({'params': boxed_state.params, **boxed_state.model_state})
  outputs = jax.eval_shape(lambda v: steps.apply_model(model, v, sample, train=False), variables)
  if isinstance(outputs, dict):
    outputs = next(iter(outputs.values()))
  needed = getattr(task, 'num_outputs', None) or getattr(task, 'vocab_size', None)
  if needed and outputs.shape[-1] != needed:
    raise UserError(f'config.model outputs {outputs.shape[-1]} values per example but the task '
                    f'needs {needed}; make config.model.kwargs (num_classes, num_outputs or '
                    'vocab_size) and config.task.kwargs agree')


def check_workdir_matches(workdir, config):
  """Refuses a workdir whose saved run has a different model or task than `config`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  for part in ('model', 'task'):
    if saved.get(part) != json.loads(config[part].to_json()):
      raise UserError(f'{workdir} holds a run with a different config.{part}; use a new --workdir, '
                      'or delete that workdir to start over')


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit).

  With several processes, `stop_requested` agrees across all of them (any process signalled), but
  only at log steps, so a collective runs every config.log_every steps rather than every step.
  """

  def __init__(self, log_every):
    self.requested = False
    self.log_every = log_every
    self._previous = {}

  def __enter__(self):
    if _in_main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def stop_requested(self, step):
    """The signal name (or 'preemption of a peer process') when training must stop after `step`."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.log_every:
      return False
    from jax.experimental import multihost_utils
    anyone = multihost_utils.process_allgather(np.array(bool(self.requested))).any()
    return (self.requested or 'preemption of a peer process') if anyone else False

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _in_main_thread():
  import threading
  return threading.current_thread() is threading.main_thread()


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""


def to_global(batch, sharding):
  """Process-local host batch -> global jax arrays split over the mesh's batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_step, state, arrays, config, sharding, task, return_outputs=False):
  """Runs the model over the whole eval split -> task.eval_report(outputs, labels) dict, and with
  return_outputs also the task's per-example eval outputs (N, ...) as host arrays."""
  outputs = []
  for batch in pipeline.eval_batches(arrays, config.eval_batch_size):
    out = eval_step(state, to_global(batch, sharding))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    outputs.append(jax.device_get(out))
  n = len(arrays['inputs'])
  outputs = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
  report = task.eval_report(outputs, arrays.get('label'))
  return (report, outputs) if return_outputs else report


def save_eval_predictions(path, task, probs, labels):
  """Writes `path` (.npz) with labels (N,) and scores: (N,) P(label=1) for a binary classification
  task, else (N, K) class probabilities; probs is the task's eval output, (N, 1) or (N, K)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, labels=np.asarray(labels), scores=probs[:, 0] if task.binary else probs)
  os.replace(tmp, path)


def _mean_metrics(pending):
  """List of per-step device metric dicts -> {name: mean over steps} on the host, plus the per-step
  'finite' flags."""
  fetched = jax.device_get(pending)
  finite = np.array([m['finite'] for m in fetched])
  means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  return means, finite


def _scalars(report):
  return {k: v for k, v in report.items() if np.ndim(v) == 0}


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before anything is written: the mesh, components, host data,
  optimizer and the train state's abstract shapes and shardings."""
  config: Any
  mesh: Any
  task: Any
  model: Any
  train_arrays: dict
  eval_arrays: dict
  batches: pipeline.TrainBatches
  total_steps: int
  tx: Any
  sample: dict
  shardings: Any
  abstract: Any

  @property
  def batch_sharding(self):
    return mesh_lib.batch_sharding(self.mesh)

  def compile_train_step(self):
    """AOT-compiles the jitted, donated train step for this mesh (no data is moved)."""
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.config.batch_size, *x.shape[1:]),
                                                        x.dtype, sharding=self.batch_sharding),
                         self.batches.batch(0))
    c = self.config
    return jax.jit(
        steps.make_train_step(self.model, self.task, self.tx, seed=c.seed, augment_cfg=c.augment,
                              nan_policy=c.nan_policy, grad_accum_steps=c.grad_accum_steps,
                              log_grad_norms=c.log_grad_norms),
        in_shardings=(self.shardings, self.batch_sharding),
        out_shardings=(self.shardings, mesh_lib.replicated(self.mesh)),
        donate_argnums=0).lower(self.abstract, batch).compile()


def build(config, devices=None):
  """Builds and validates an Experiment from `config`; raises UserError, writes nothing.

  devices: the devices to build the mesh over (default: all)."""
  mesh_lib.initialize_distributed(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  task = build_component('tasks', config.task)
  model = build_component('models', config.model)
  if config.save_eval_predictions and not isinstance(task, classification.Task):
    raise UserError(f'config.save_eval_predictions=True needs a classification task, not '
                    f'config.task.name={config.task.name!r}; set it to False')
  train_arrays, eval_arrays = load_data(config, task)
  batches = pipeline.TrainBatches(train_arrays, config.batch_size, config.seed)
  total_steps = config.num_steps or config.num_epochs * batches.steps_per_epoch
  tx = optim.make_optimizer(config.optim, total_steps)
  sample = steps.sample_batch(task, train_arrays)
  boxed = steps.abstract_state(model, tx, sample, config.seed)
  check_output_size(model, task, boxed, sample)
  shardings = mesh_lib.tree_shardings(boxed, mesh, config.sharding_rules)
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  return Experiment(config, mesh, task, model, train_arrays, eval_arrays, batches, total_steps, tx,
                    sample, shardings, abstract)


def train_and_evaluate(config, workdir, devices=None):
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns results.json's dict.

  devices: the devices to build the mesh over (default: all). results['history'] lists the train
  metrics at every log step and the eval metrics at every eval, as {'step', 'split', ...} dicts,
  over the whole run (kept in workdir/history.jsonl across restarts). With config.early_stopping,
  results['best'] is best.json's {'step', 'metric', 'value', 'eval'} and results['stopped_early']
  says whether patience ran out; re-running a run that stopped early only redoes the final results.

  Raises UserError for invalid input before anything is written, NonFiniteError when the loss or
  gradient norm becomes NaN/Inf under nan_policy='raise', Preempted after saving on SIGTERM/SIGINT.
  """
  t_start = time.time()
  # -- 1. Build and validate everything; nothing is written until this section has passed.
  exp = build(config, devices)
  mesh, task, model, tx = exp.mesh, exp.task, exp.model, exp.tx
  eval_arrays, batches, total_steps = exp.eval_arrays, exp.batches, exp.total_steps
  shardings, abstract = exp.shardings, exp.abstract
  check_workdir_matches(workdir, config)
  loaded = {}
  if config.init_from.checkpoint:  # read and checked before anything is written
    loaded = init_from.load_matching(abstract.params, config.init_from.checkpoint,
                                     config.init_from.load)

  # -- 2. Workdir: config, checkpoints, restore or initialise.
  chief = jax.process_index() == 0
  sharding_lines, state_bytes = mesh_lib.describe(abstract, shardings)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    reporting.write_json_atomic(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))
    with open(os.path.join(workdir, 'sharding.txt'), 'w') as f:
      f.write('\n'.join(sharding_lines) + '\n')
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state, step = ckpt.restore_latest(abstract)
  if state is None:
    state, step = steps.create_state(model, tx, exp.sample, config.seed, shardings), 0
    if loaded:
      state = state.replace(params=init_from.merge(state.params, loaded))
  last_saved = step if step else None

  # -- 3. Compile the steps ahead of time (compile time is reported apart from training).
  batch_sharding = exp.batch_sharding
  t0 = time.time()
  train_step = exp.compile_train_step()
  compile_s = time.time() - t0
  eval_step = jax.jit(steps.make_eval_step(model, task, config.seed),
                      in_shardings=(shardings, batch_sharding), out_shardings=batch_sharding)

  # -- 4. Train.
  reporter = reporting.Reporter(workdir, step, total_steps)
  reporter.print(f'bigjax: {config.model.name} on {config.data.name}, {total_steps} steps, mesh '
                 f'({mesh_lib.layout(mesh)}), {mesh.size} {jax.devices()[0].platform} devices, '
                 f'{state_bytes / 2**20:.1f} MiB of train state per device (per-parameter sharding '
                 'in sharding.txt)' + (f', resuming at step {step}' if step else ''))
  history = checkpoint_lib.History(os.path.join(workdir, 'history.jsonl'), step)
  early = checkpoint_lib.EarlyStopping(config.early_stopping, workdir, history.entries)
  if early.stopped:
    reporter.print(f'bigjax: this run stopped early at step {step}; redoing the final results')
  pending, train_metrics, skipped, last_eval = [], {}, 0, (None, None)
  first_step, t_train = step, None

  def log_train():
    """Averages the pending per-step metrics into the history entry of `step`; raises
    NonFiniteError on NaN/Inf under nan_policy='raise'."""
    nonlocal pending, train_metrics, skipped
    train_metrics, finite = _mean_metrics(pending)
    pending = []
    if config.nan_policy == 'raise' and not finite.all():
      bad = step - len(finite) + int(np.argmin(finite)) + 1
      where = f'step {last_saved} in {ckpt.directory}' if last_saved else 'none saved yet'
      raise NonFiniteError(f'loss or gradient norm is NaN/Inf at step {bad}; last good '
                           f'checkpoint: {where}. Lower config.optim.lr, set '
                           'config.optim.clip_norm, or use config.nan_policy=skip')
    skipped += int((1 - finite).sum())
    reporter.scalars(step, 'train', dict(train_metrics, skipped_steps=skipped))
    history.append({'step': step, 'split': 'train', **train_metrics})

  try:
    with _Preemption(config.log_every) as preemption:
      while step < total_steps and not early.stopped:
        state, metrics = train_step(state, to_global(batches.batch(step), batch_sharding))
        if t_train is None:  # throughput counts the steps after the first (warm-up) one
          jax.block_until_ready(metrics)
          t_train, first_timed_step = time.time(), step + 1
        step += 1
        pending.append(metrics)
        reporter.step()
        done = step == total_steps
        stop = preemption.stop_requested(step)  # read once: a signal may arrive at any time
        save = done or step % config.checkpoint_every == 0 or bool(stop)
        if save or step % config.log_every == 0:
          log_train()
        if config.eval_every and step % config.eval_every == 0 and not done:
          report = evaluate(eval_step, state, eval_arrays, config, batch_sharding, task)
          early.update(step, report, state)  # saves the best state
          reporter.scalars(step, 'eval', report)
          history.append({'step': step, 'split': 'eval', **_scalars(report)})
          last_eval = (step, report)
          if early.stopped:  # history, then the checkpoint, hold this step
            reporter.print(f'early stopping at step {step}: {config.early_stopping.metric} has '
                           f'not improved for {early.bad_evals} evals (best '
                           f'{early.best_value:.4g} at step {early.best_step})')
            if pending:
              log_train()
            save = True
        if save:
          ckpt.save(step, state)
          last_saved = step
        if stop and not done:
          raise Preempted(f'{stop} received: saved step {step} in {ckpt.directory}; '
                          'run the same command again to resume')
    jax.block_until_ready(state)
    train_s = time.time() - t_train if t_train else 0.0
    timed_steps = step - first_timed_step if t_train else 0

    # -- 5. Final evaluation and results (an eval already in the history is not counted twice).
    if last_eval[0] == step and not config.save_eval_predictions:
      eval_report = last_eval[1]
    else:
      eval_report, outputs = evaluate(eval_step, state, eval_arrays, config, batch_sharding, task,
                                      return_outputs=True)
      if config.save_eval_predictions and chief:
        save_eval_predictions(os.path.join(workdir, 'eval_predictions.npz'), task, outputs,
                              eval_arrays['label'])
    if not history.has(step, 'eval'):
      reporter.scalars(step, 'eval', eval_report)
      history.append({'step': step, 'split': 'eval', **_scalars(eval_report)})
      early.update(step, eval_report, state)
    reporter.print('final eval: ' + ', '.join(f'{k}={v:.4f}'
                                              for k, v in _scalars(eval_report).items()))
    throughput = flops.throughput_report(exp, train_step, train_s, timed_steps) if chief else None
    if throughput and throughput['mfu'] is not None:
      rate = (f"{throughput['tokens_per_s']:,.0f} tokens/s" if throughput['tokens_per_s']
              else f"{throughput['examples_per_s']:,.0f} examples/s")
      reporter.print(f"throughput: {throughput['step_time_s'] * 1e3:.1f} ms/step, {rate}, "
                     f"MFU {throughput['mfu']:.1%} of {throughput['peak_source']}")
  finally:
    ckpt.close()  # waits for in-flight saves: nothing already written is lost
    early.close()
    history.close()
    reporter.close()
  results = {
      'step': step, 'eval': eval_report, 'train': train_metrics, 'skipped_steps': skipped,
      'steps_this_run': step - first_step, 'compile_s': compile_s, 'wall_time_s': time.time() - t_start,
      'train_examples_per_s': timed_steps * config.batch_size / train_s if train_s > 0 else None,
      'num_params': int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))),
      'devices': mesh.size, 'platform': jax.devices()[0].platform, 'throughput': throughput,
      'history': history.entries, 'best': early.best(), 'stopped_early': early.stopped,
  }
  if chief:
    reporting.write_json_atomic(os.path.join(workdir, 'results.json'), results)
  return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_flags(argv):
  """argv -> (config, workdir). Every mistake raises UserError with a one-line message."""
  from absl import flags
  from ml_collections import config_flags
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file[:args].',
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.',
                      flag_values=flag_values)
  try:
    for arg in argv[1:]:
      path = arg.split('=', 1)[1].split(':')[0] if arg.startswith('--config=') else None
      if path and not os.path.exists(path):
        raise UserError(f'--config={path}: no such config file; configs live in configs/<name>.py')
    flag_values(argv)
    config = flag_values.config
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except UserError:
    raise
  except flags.IllegalFlagValueError as e:
    raise UserError(f'{str(e).splitlines()[0]}; give a value of that field\'s type') from None
  except flags.UnrecognizedFlagError as e:
    raise UserError(f'{e}; see --helpfull') from None
  except (AttributeError, KeyError) as e:  # an override names a field the config does not have
    raise UserError(_explain_unknown_field(argv, e)) from None
  if config is None or not flag_values.workdir:
    raise UserError('both --config=configs/<name>.py[:args] and --workdir=DIR are required')
  return config, flag_values.workdir


def _explain_unknown_field(argv, error):
  """Names the first `--config.a.b` override whose path the loaded config lacks, with its siblings."""
  from bigjax.config_lib import load_config_file
  spec = next(a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config='))
  config = load_config_file(spec)
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      node, parts = config, path.split('.')
      for i, part in enumerate(parts):
        if not hasattr(node, 'keys') or part not in node:
          parent = 'config' + ''.join(f'.{p}' for p in parts[:i])
          known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
          return f'--config.{path}: {parent} has no field {part!r}; its fields: {known}'
        node = node[part]
  return ' '.join(str(error).split())


def main(argv=None):
  """CLI entry: parses flags, trains. User errors print one line and exit with status 2;
  NaN/Inf exits 1; SIGTERM/SIGINT saves a checkpoint and exits 143."""
  try:
    config, workdir = parse_flags(sys.argv if argv is None else argv)
    train_and_evaluate(config, workdir)
  except UserError as e:
    _exit(str(e), 2)
  except (NonFiniteError, Preempted) as e:
    _exit(str(e), 1 if isinstance(e, NonFiniteError) else 143)


def _exit(message, status):
  print(f'bigjax: error: {message}' if status == 2 else f'bigjax: {message}', file=sys.stderr)
  sys.exit(status)


if __name__ == '__main__':
  main()
