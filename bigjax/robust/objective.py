"""What an attack ascends: a model and a classification task as per-example functions of the
model's float inputs (the inputs after bigjax.steps.prepare_inputs: images in [0, 1])."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from bigjax import steps
from bigjax.tasks import base as task_base


def per_example(
  task: task_base.Task, outputs: jax.Array, batch: task_base.Batch
) -> tuple[jax.Array, jax.Array]:
  """(loss (B,), correct (B,) in {0., 1.}): the task's own loss and 'accuracy' metric of each
  example, from model outputs (B, ...) and the prepared batch (each entry (B, ...))."""

  def one(out, example):
    loss, metrics = task.loss_and_metrics(out[None], jax.tree.map(lambda v: v[None], example))
    return loss, metrics['accuracy']

  return jax.vmap(one)(outputs, batch)


def objective(
  model, task: task_base.Task, variables: dict, batch: task_base.Batch
) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """(loss_fn, score_fn) of float inputs x (B, ...) for bigjax.robust.attacks.perturb, with the
  model in eval mode (no dropout, batch-norm running statistics: examples stay independent).

  loss_fn(x) (B,): each example's task loss. score_fn(x) (B,): the loss, or +inf where the example
  is misclassified (a restart that fools the model beats one that only raises the loss)."""

  def run(x):
    outputs = steps.apply_model(model, variables, {**batch, 'inputs': x}, train=False)
    return per_example(task, outputs, {**batch, 'inputs': x})

  def score_fn(x):
    loss, correct = run(x)
    return jnp.where(correct > 0.5, loss, jnp.inf)

  return (lambda x: run(x)[0]), score_fn
