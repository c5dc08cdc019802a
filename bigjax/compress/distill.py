"""Knowledge distillation (Hinton, Vinyals & Dean 2015) from a frozen teacher (config.distill).

  loss = alpha * task loss + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

config.distill fields: teacher (a finished run's workdir: its config.json names the teacher's
model, its newest checkpoint holds the weights; or a HuggingFace `save_pretrained` directory of a
family bigjax imports (config.json with a model_type, safetensors weights); '' = off), temperature
T > 0, alpha in [0, 1], split.

split: '' = the KL term on the train batch, as above. Else a split of the same dataset (e.g.
unlabelled extra examples: 'train[4000:]', 'unlabeled'; its labels are never read) is the
transfer set of the soft term: each step also takes that split's batch of the step (batch size B,
its own seeded order, resumable like the train batches) and

  loss = alpha * task loss (train batch) + (1 - alpha) * T^2 * KL(teacher_T || student_T) (split batch)

so alpha = 0 is distillation from the unlabelled split alone. Both models see the split batch with
the step's augmentation; the student runs in train mode with its own dropout key, and the batch
statistics it would update there are not kept. In-memory image or feature data only (text views
and streamed splits are refused).
The teacher may be another model family than the student; it is built from its own config.model
with the student's data facts (classes, vocabulary), so its outputs must have the student's shape.
Its variables live in the train state (`state.teacher`: parameters and model state, no optimizer
state) with the shardings of their own logical axis names, and it runs inside the same jitted step
on the same (augmented) inputs, under stop_gradient. T^2 keeps the soft term's gradients on the
scale of the hard term's as T changes (Hinton et al., section 2).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigjax.errors import UserError

INPUTS = 'distill_inputs'  # the batch entry holding config.distill.split's inputs


def enabled(cfg) -> bool:
  """True when config.distill names a teacher."""
  return bool(cfg.teacher)


def kl_term(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last axis, averaged over the
  leading ones. student_logits, teacher_logits: (..., K) -> () float32."""
  t = jnp.asarray(temperature, jnp.float32)
  log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return t**2 * jnp.mean(kl)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its model, its variables (host arrays {'params': ..., other collections}),
  and the loss weights."""

  model: nn.Module
  variables: dict
  temperature: float
  alpha: float
  run_dir: str
  split: str = ''  # config.distill.split: the KL term's inputs are batch[INPUTS]

  def soft_batch(self, batch: dict) -> dict:
    """The batch the KL term is taken on with a split: {'inputs': batch[INPUTS]} (B, ...)."""
    return {'inputs': batch[INPUTS]}

  def loss(self, task_loss: jax.Array, metrics: dict, student_out, teacher_out):
    """-> (alpha * task_loss + (1 - alpha) * kl_term, metrics + 'task_loss', 'distill_kl')."""
    kl = kl_term(student_out, jax.lax.stop_gradient(teacher_out), self.temperature)
    loss = self.alpha * task_loss + (1.0 - self.alpha) * kl
    return loss, dict(metrics, task_loss=task_loss, distill_kl=kl)


def load(
  cfg, make_model: Callable[[Any, Any], nn.Module], sample: dict, student_out_shape
) -> Teacher:
  """config.distill -> Teacher, read and checked before anything is written.

  make_model: (config.model of the teacher, init_from.Architecture or None) -> module built with
  the student's data facts (and the architecture an HF checkpoint states);
  sample: a prepared batch of one; student_out_shape: the student's output shape on it.
  UserError: no run in config.distill.teacher, a checkpoint that does not fit the teacher's model
  (other classes or sizes), or teacher outputs whose shape is not the student's."""
  from bigjax import checkpoint, init_from, steps

  if not cfg.temperature > 0:
    raise UserError(f'config.distill.temperature={cfg.temperature} must be > 0 (e.g. 4.0)')
  path = os.path.expanduser(cfg.teacher)
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise UserError(
      f'config.distill.teacher={cfg.teacher!r} has no config.json; give the workdir of a '
      'finished bigjax run or a HuggingFace save_pretrained directory'
    )
  with open(config_path) as f:
    stated = json.load(f)
  if 'model_type' in stated:  # a HuggingFace checkpoint, not a bigjax run
    model, variables = _hf_teacher(cfg.teacher, path, stated, make_model, sample)
  else:
    model = make_model(ml_collections.ConfigDict(stated).model, None)
    _, state = checkpoint.load_latest(init_from.checkpoint_dir(path))
    variables = {'params': state['params'], **state.get('model_state', {})}
  boxed = jax.eval_shape(
    lambda: steps.apply_model(
      model, None, sample, train=False, init_rngs={'params': jax.random.key(0)}
    )
  )
  want = checkpoint.signature(nn.meta.unbox(boxed))
  have = checkpoint.signature(variables)
  if want != have:
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise UserError(
      f'config.distill.teacher={cfg.teacher!r}: its checkpoint does not fit its model on this '
      f"task's data ({bad[0]}: {have.get(bad[0], ('missing',))[0]} saved, "
      f"{want.get(bad[0], ('missing',))[0]} here); distill from a teacher trained on the same "
      'classes / vocabulary'
    )
  out = jax.eval_shape(lambda v: steps.apply_model(model, v, sample, train=False), variables)
  if getattr(out, 'shape', None) != tuple(student_out_shape):
    raise UserError(
      f'config.distill.teacher={cfg.teacher!r} outputs shape {getattr(out, "shape", out)} but '
      f'the student outputs {tuple(student_out_shape)}; use a teacher trained for this task'
    )
  return Teacher(
    model, jax.tree.map(np.asarray, variables), cfg.temperature, cfg.alpha, path, cfg.split
  )


def _hf_teacher(name: str, path: str, hf_config: dict, make_model, sample: dict):
  """(model, host variables) of the HuggingFace checkpoint in `path`: the family's bigjax model
  with the architecture its config.json states, every parameter read from its safetensors (the
  checks of config.init_from.hf). UserError if the checkpoint leaves a parameter uninitialised (a
  teacher must be complete, e.g. not a base model without the task's head)."""
  from bigjax import init_from, steps
  from bigjax.models import hf

  family = hf.family_of(hf_config, os.path.join(path, 'config.json'))
  where = os.path.join(path, 'config.json')
  try:
    stated = family.architecture(hf_config)
  except UserError as e:
    raise UserError(f'config.distill.teacher: {where}: {e}') from None
  arch = init_from.Architecture(stated, where, dict(family.HF_NAMES))
  model = make_model(ml_collections.ConfigDict(dict(name=family.MODEL, kwargs={})), arch)
  init = lambda: steps.apply_model(
    model, None, sample, train=False, init_rngs={'params': jax.random.key(0)}
  )
  abstract = nn.meta.unbox(jax.eval_shape(init))
  loaders, fresh = init_from.hf_plan(path, model, abstract['params'])
  if fresh:
    raise UserError(
      f'config.distill.teacher={name!r} has no tensors for {", ".join(fresh[:3])}; a teacher '
      "must be complete: give a checkpoint with this task's head (or fine-tune one first)"
    )
  flat = {k: np.asarray(load()) for k, load in loaders.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  others = {k: v for k, v in abstract.items() if k != 'params'}
  return model, {'params': params, **jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), others)}


def place(variables: dict, like: Any) -> Any:
  """The teacher's host variables put onto the devices with the shardings of `like` (the state's
  freshly initialised teacher tree of the same structure)."""
  return jax.tree.map(
    lambda v, x: jax.device_put(np.asarray(v, x.dtype), x.sharding), variables, like
  )


class SplitBatches:
  """The run's train batches with batch[INPUTS]: the same step's batch of config.distill.split
  (a pure function of the step too, so resume stays exact)."""

  def __init__(self, train, transfer):
    import grain

    self.train, self.transfer = train, transfer
    self.batch_size, self.steps_per_epoch = train.batch_size, train.steps_per_epoch
    self.dataset = grain.MapDataset.range(1 << 40).map(self.batch)  # lazy, like TrainBatches

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step `step`: the train batch plus INPUTS (B/P, ...)."""
    return {**self.train.batch(step), INPUTS: self.transfer.batch(step)['inputs']}

  def iterate(self, start: int, stop: int):
    """Steps start..stop-1 in order, read ahead as the train batches are."""
    from bigjax.data import loader

    return loader._iterate(self.dataset[start:stop], self.train.options)  # the loader's own


def with_split(config, batches):
  """build()'s hook: `batches`, or SplitBatches over config.distill.split's inputs when set;
  UserError for a split without a teacher, text views, standardized or streamed data (the split
  is read into memory as it is stored), DataError for a split the dataset does not have."""
  from bigjax.data import inputs as data_inputs
  from bigjax.data import loader, pipeline

  cfg, d = config.distill, config.data
  if not cfg.split:
    return batches
  if not enabled(cfg):
    raise UserError(
      f'config.distill.split={cfg.split!r} needs config.distill.teacher; set one or unset split'
    )
  for field, on in (('view', d.view), ('standardize', d.standardize), ('cv_folds', d.cv_folds)):
    if on:
      raise UserError(
        f'config.distill.split={cfg.split!r} reads image or feature records as stored, not with '
        f'config.data.{field}={on!r}; unset config.distill.split'
      )
  if data_inputs.streams(config):
    raise UserError(
      f'config.distill.split={cfg.split!r} reads that split into memory; set '
      "config.data.load='memory' (or unset config.distill.split)"
    )
  inputs = pipeline.load_split(d.name, cfg.split, d.data_dir)['inputs']
  transfer = loader.TrainBatches(
    {'inputs': inputs}, config.batch_size, config.seed, options=batches.options
  )
  return SplitBatches(batches, transfer)
