"""build(config) -> Experiment: every part of a run, built and validated, nothing written.

The order is the order of the facts: the mesh, the data (and its tokenizer), the facts derived from
the data (`DataInfo`: classes, vocabulary, special tokens), the task and the model built from those
facts, the optimizer, and the train state's abstract shapes and shardings. Any mistake is a
one-line `UserError` naming the config field, raised before the caller writes anything.
`Experiment.compile_train_step()` / `compile_eval_step()` compile ahead of time; `bigjax.train`,
`bigjax.compile`, `--dry_run` and the benchmarks all use this same path.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from bigjax import checkpoint as checkpoint_lib
from bigjax import config_lib, federated, init_from, optim, peft, registry, robust, steps
from bigjax import mesh as mesh_lib
from bigjax.compress import distill, prune, quantize
from bigjax.data import inputs as data_inputs
from bigjax.data import loader as data_loader
from bigjax.data import pipeline
from bigjax.ensemble import members as ensemble
from bigjax.errors import UserError
from bigjax.tasks import base as task_base

Arrays = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Data and the facts derived from it
# ----------------------------------------------------------------------------------------------
def tokenizer_for(config) -> Any:
  """The text dataset's tokenizer (config.data.tokenizer), or None for non-text data."""
  d = config.data
  if not d.view:
    return None
  from bigjax.data import text

  return text.dataset_tokenizer(
    d.name, d.tokenizer, d.vocab_size, d.data_dir, d.train_split, config.init_from.hf
  )


def load_data(config, tokenizer=None) -> tuple[Arrays, Arrays, str]:
  """(train, eval, eval split name): host arrays {'inputs', 'label', ...} of the configured splits.

  tokenizer: for text views, the dataset's tokenizer (default: tokenizer_for(config)).
  With config.data.cv_folds = K, both come from the train split: K-1 folds to train on and fold
  config.data.cv_fold to evaluate on (pipeline.cv_split); config.data.eval_split is not read.
  """
  d = config.data
  splits = (d.train_split,) if d.cv_folds else (d.train_split, d.eval_split)
  if d.view:
    from bigjax.data import text

    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(config)
    loaded = [
      text.load_text_split(
        d.name,
        split,
        d.view,
        d.seq_len,
        d.data_dir,
        config.seed,
        tokenizer=tokenizer,
        train_split=d.train_split,
      )
      for split in splits
    ]
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
    evals = {k: v[: d.eval_max_examples] for k, v in evals.items()}
  return train, evals, eval_name


def data_info(config, tokenizer=None, label_shape: tuple[int, ...] = ()) -> task_base.DataInfo:
  """The facts model and task are built from: classes from the dataset's info (or the text view),
  vocabulary and special ids from the tokenizer, seq_len from config.data."""
  d = config.data
  if d.view:
    from bigjax.data import text

    num_classes = text.label_count(d.name, d.view, d.data_dir)
  else:
    num_classes = pipeline.num_classes(d.name, d.data_dir)
  tok = {}
  if tokenizer is not None:
    tok = dict(
      vocab_size=tokenizer.vocab_size,
      num_regular_tokens=tokenizer.num_regular_tokens,
      pad_id=tokenizer.pad,
      cls_id=tokenizer.cls,
      sep_id=tokenizer.sep,
      mask_id=tokenizer.mask,
    )
  return task_base.DataInfo(
    num_classes=num_classes,
    label_shape=tuple(label_shape),
    seq_len=d.seq_len if d.view else None,
    **tok,
  )


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------
def make_task(cfg, data: task_base.DataInfo) -> task_base.Task:
  """config.task -> Task(data, **kwargs); bad kwargs or data that does not fit -> UserError."""
  cls = registry.TASKS.get(cfg.name)
  try:
    return cls(data, **cfg.kwargs.to_dict())
  except TypeError as e:
    raise UserError(
      f'config.task.kwargs does not fit {cfg.name!r} ({e}); fix or remove that field'
    ) from None
  except ValueError as e:
    raise UserError(
      f'config.task.name={cfg.name!r}: {e}; choose a task that fits config.data'
    ) from None


def model_kwargs(
  cfg,
  data: task_base.DataInfo,
  task: task_base.Task,
  pretrained: init_from.Architecture | None = None,
) -> dict[str, Any]:
  """config.model.kwargs plus the model's `data_fields` filled from the data and the task, plus
  the architecture a pretrained checkpoint states (config.init_from.hf). Each fact is stated
  once: a config field that contradicts the checkpoint, or data (the tokenizer's vocabulary) that
  contradict it, is a UserError naming both."""
  cls = registry.MODELS.get(cfg.name)
  kwargs = cfg.kwargs.to_dict()
  stated = dict(pretrained.kwargs) if pretrained else {}
  for field, value in stated.items():
    if field in kwargs and kwargs[field] != value:
      assert pretrained is not None
      raise UserError(
        f'config.model.kwargs.{field}={kwargs[field]!r} contradicts {pretrained.where} '
        f'({pretrained.name_of(field)} gives {field}={value!r}); the checkpoint states the '
        "architecture: start from the config's hf argument (--config=NAME:hf=DIR: gpt_shakespeare, "
        'llama_shakespeare, bert_shakespeare_mlm, bert_genre), which leaves it unset, or remove '
        f'config.model.kwargs.{field} in the config file'
      )
  kwargs.update(stated)
  facts = dict(dataclasses.asdict(data), output_size=task.output_size)
  for field, fact in cls.data_fields.items():
    if facts[fact] is None:
      continue
    if field in stated:
      assert pretrained is not None
      if stated[field] != facts[fact]:
        raise UserError(
          f'{pretrained.where} gives {field}={stated[field]!r} ({pretrained.name_of(field)}) but '
          f'the tokenizer (config.data.tokenizer) gives {fact}={facts[fact]!r}; use '
          "config.data.tokenizer='hf', the checkpoint's own tokenizer.json"
        )
      continue
    if field in kwargs:
      raise UserError(
        f'config.model.kwargs.{field}={kwargs[field]!r}: bigjax derives it from the '
        f'data ({fact} = {facts[fact]}); remove that field'
      )
    kwargs[field] = facts[fact]
  return kwargs


def make_model(
  cfg,
  data: task_base.DataInfo,
  task: task_base.Task,
  pretrained: init_from.Architecture | None = None,
) -> nn.Module:
  """config.model -> Model(**kwargs, **derived fields, **pretrained architecture); bad kwargs ->
  UserError."""
  cls = registry.MODELS.get(cfg.name)
  try:
    return cls(**model_kwargs(cfg, data, task, pretrained))
  except TypeError as e:
    raise UserError(
      f'config.model.kwargs does not fit {cfg.name!r} ({e}); fix or remove that field'
    ) from None


def model_error(model: nn.Module, error: ValueError) -> UserError:
  """A model's ValueError about its own field ('pool=...' / 'pool_after has ...') -> the
  config.model.kwargs.FIELD message; other ValueErrors are named as the model's."""
  text = ' '.join(str(error).split())
  first = text.replace('=', ' ').split(' ')[0]
  fields = {f.name for f in dataclasses.fields(model)}
  return UserError(
    f'config.model.kwargs.{text}'
    if first in fields
    else f'config.model ({type(model).__module__}): {text}'
  )


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
  """Everything built from a config before anything is written: the mesh, components, host data,
  derived data facts, optimizer and the train state's abstract shapes and shardings."""

  config: Any
  mesh: jax.sharding.Mesh
  data: task_base.DataInfo
  task: task_base.Task
  model: nn.Module
  train_arrays: Arrays
  eval_arrays: Arrays
  batches: pipeline.TrainBatches
  total_steps: int
  tx: optax.GradientTransformation
  sample: dict
  shardings: Any
  abstract: Any
  teacher: Any = None  # bigjax.compress.distill.Teacher with config.distill
  attack_eval: Any = None  # bigjax.robust.evaluate.RobustEval with config.eval_attacks
  adversarial: Any = None  # bigjax.robust.adversarial.Adversarial with config.adversarial
  peft: Any = None  # bigjax.peft.Plan with config.peft (frozen base, trainable adapter)
  eval_loader: Any = None  # bigjax.data.loader.EvalBatches of the eval split (grain)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return mesh_lib.batch_sharding(self.mesh)

  def to_global(self, batch: Arrays) -> dict[str, jax.Array]:
    """Process-local host batch -> global jax arrays split over the mesh's batch axes."""
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()
    }

  def _abstract_batch(self, batch: Arrays, size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {
      k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=self.batch_sharding)
      for k, v in batch.items()
    }

  def compile_train_step(self) -> Any:
    """AOT-compiles the jitted, donated train step (state, batch) -> (state, metrics) for this
    mesh; no data is moved."""
    c = self.config
    if federated.enabled(c):  # config.federated: the step is a FedAvg round (bigjax/federated)
      return federated.compile_round(self)
    step = steps.make_train_step(
      self.model,
      self.task,
      self.tx,
      seed=c.seed,
      augment_cfg=c.augment,
      nan_policy=c.nan_policy,
      grad_accum_steps=c.grad_accum_steps,
      log_grad_norms=c.log_grad_norms,
      distill=self.teacher,
      prune_cfg=c.prune if prune.enabled(c.prune) else None,
      adversarial=self.adversarial,
      peft=self.peft,
    )
    return (
      jax.jit(
        step,
        in_shardings=(self.shardings, self.batch_sharding),
        out_shardings=(self.shardings, mesh_lib.replicated(self.mesh)),
        donate_argnums=0,
      )
      .lower(self.abstract, self._abstract_batch(self.batches.batch(0), c.batch_size))
      .compile()
    )

  def create_state(self) -> steps.TrainState:
    """The initial train state in self.shardings (with config.distill, the teacher's variables
    in state.teacher)."""
    teacher_model = self.teacher.model if self.teacher else None
    state = steps.create_state(
      self.model, self.tx, self.sample, self.config.seed, self.shardings, teacher_model
    )
    if self.teacher:
      state = state.replace(teacher=distill.place(self.teacher.variables, state.teacher))
    return state

  def compile_eval_step(self) -> Any:
    """AOT-compiles eval_step(state, batch) -> the task's per-example eval outputs."""
    first = next(self.eval_batches())
    step = steps.make_eval_step(self.model, self.task, self.config.seed)
    return (
      jax.jit(
        step, in_shardings=(self.shardings, self.batch_sharding), out_shardings=self.batch_sharding
      )
      .lower(self.abstract, self._abstract_batch(first, self.config.eval_batch_size))
      .compile()
    )

  def eval_batches(self) -> Iterator[Arrays]:
    return iter(self.eval_loader)

  def eval_labels(self) -> np.ndarray | None:
    """The eval split's labels (N, ...) in order (None for unlabelled data)."""
    return self.eval_loader.labels()

  def device_batches(self, start: int) -> Iterator[dict[str, jax.Array]]:
    """Global train batches of steps start..total_steps-1, read ahead by grain and moved to the
    devices config.data.device_prefetch batches ahead of the running step."""
    return data_loader.device_iterator(
      self.batches.iterate(start, self.total_steps),
      self.to_global,
      self.config.data.device_prefetch,
    )

  def evaluate(self, eval_step, state, return_outputs: bool = False):
    """Runs the model over the whole eval split -> task.eval_report(outputs, labels) dict, and
    with return_outputs also the task's per-example eval outputs (N, ...) as host arrays."""
    outputs = []
    for batch in self.eval_batches():
      out = eval_step(state, self.to_global(batch))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
      outputs.append(jax.device_get(out))
    n = self.eval_loader.num_examples
    outputs = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
    report = self.task.eval_report(outputs, self.eval_labels())
    if self.attack_eval is not None:  # config.eval_attacks: robust_accuracy_* beside the rest
      report.update(self.attack_eval.report(self, state))
    return (report, outputs) if return_outputs else report


def build(config, devices=None) -> Experiment:
  """Builds and validates an Experiment from `config`; raises UserError, writes nothing.

  devices: the devices to build the mesh over (default: all)."""
  mesh_lib.initialize_distributed(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  config_lib.check_config(config, mesh_lib.data_parallel_size(mesh), jax.process_count())
  registry.TASKS.check(config.task.name)  # names first: a typo needs no data read
  registry.MODELS.check(config.model.name)
  pretrained = init_from.hf_architecture(config)  # before the data: a wrong directory is cheap
  tokenizer = tokenizer_for(config)
  # config.data.load: host arrays from load_data, or records streamed from the source (grain).
  splits = data_inputs.build(config, tokenizer, load_data)
  train_arrays, eval_arrays = splits.train_arrays, splits.eval_arrays
  data = data_info(config, tokenizer, splits.label_shape)
  task = make_task(config.task, data)
  model = make_model(config.model, data, task, pretrained)
  model, task = ensemble.wrap(config, model, task)  # config.ensemble.members > 1: stacked members
  es_metric = config.early_stopping.metric
  if es_metric and es_metric not in task.report_metrics:
    raise UserError(
      f'config.early_stopping.metric={es_metric!r} is not a scalar of the eval report; use one '
      f'of {", ".join(task.report_metrics)}'
    )
  if config.save_eval_predictions and not task.writes_predictions:
    raise UserError(
      f'config.save_eval_predictions=True needs a classification task, not '
      f'config.task.name={config.task.name!r}; set it to False'
    )
  task.check_data(splits.check_train, config.data.name, config.data.train_split)
  task.check_data(splits.check_eval, config.data.name, splits.eval_name)
  batches = splits.train
  total_steps = config.num_steps or config.num_epochs * batches.steps_per_epoch
  tx = optim.make_optimizer(config.optim, total_steps)
  batches, tx = federated.plan(config, splits.train_arrays, mesh, batches, tx)  # rounds
  batches = distill.with_split(config, batches)  # config.distill.split: its batch beside each
  sample = steps.sample_batch(task, splits.sample)
  model, tx, teacher = _compression(config, data, task, model, tx, sample)
  model, tx, adapter = peft.build(config, model, tx, sample)  # config.peft: bigjax/peft
  try:
    boxed = steps.abstract_state(model, tx, sample, config.seed, teacher.model if teacher else None)
  except ValueError as e:
    raise model_error(model, e) from None
  shardings = mesh_lib.tree_shardings(boxed, mesh, ensemble.sharding_rules(config))
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  attack_eval, adversarial = robust.from_config(
    config, model, task, splits.sample['inputs'].dtype, abstract.params
  )
  return Experiment(
    config,
    mesh,
    data,
    task,
    model,
    train_arrays,
    eval_arrays,
    batches,
    total_steps,
    tx,
    sample,
    shardings,
    abstract,
    teacher,
    attack_eval,
    adversarial,
    peft=adapter,
    eval_loader=splits.evals,
  )


def _compression(config, data, task, model, tx, sample):
  """config.quantize / prune / distill applied to the built parts -> (model, tx, teacher or None):
  QAT wraps the model, pruning wraps the optimizer, distillation loads the teacher; each checked
  first (UserError naming its field)."""
  if not (
    quantize.enabled(config.quantize)
    or prune.enabled(config.prune)
    or distill.enabled(config.distill)
  ):
    return model, tx, None
  x = steps.prepare_inputs(sample['inputs'], None, None)
  init = dict(train=False, init_rngs={'params': jax.random.key(0)})
  try:
    variables = jax.eval_shape(lambda: steps.apply_model(model, None, sample, **init))
  except ValueError as e:
    raise model_error(model, e) from None
  quantize.check(config.quantize, model, x)
  prune.check(config.prune, variables['params'])
  teacher = None
  if distill.enabled(config.distill):
    out = jax.eval_shape(
      lambda v: steps.apply_model(model, v, sample, train=False), nn.meta.unbox(variables)
    )
    teacher = distill.load(
      config.distill, lambda cfg, arch: make_model(cfg, data, task, arch), sample, out.shape
    )
  if config.quantize.mode == 'qat':
    model = quantize.qat_model(model, config.quantize)
  if prune.enabled(config.prune):
    tx = prune.wrap(tx, config.prune, variables['params'])  # names give N:M groups their axes
  return model, tx, teacher


def load_run(workdir: str, what: str = 'a bigjax run') -> tuple[Any, Any, nn.Module, Any]:
  """(config, tokenizer, model, params as host arrays) of the newest checkpoint in `workdir`, the
  model rebuilt as bigjax-train built it; UserError (naming `what` a workdir must be) without a
  config.json or a checkpoint."""

  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'--workdir={workdir} holds no config.json; give the workdir of {what}')
  config = config_lib.saved_config(path)
  tokenizer = tokenizer_for(config)
  data = data_info(config, tokenizer)
  task = make_task(config.task, data)
  model = make_model(config.model, data, task, init_from.hf_architecture(config))
  try:
    _, state = checkpoint_lib.load_latest(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    raise UserError(
      f'{workdir} holds no checkpoint yet; train it first (or wait for its first checkpoint)'
    ) from None
  model, params = peft.run_params(config, model, state['params'])  # a config.peft adapter's run
  return config, tokenizer, model, params
