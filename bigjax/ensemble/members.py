"""config.ensemble.members = N: N members trained in one jitted step (deep ensembles,
Lakshminarayanan et al. 2017).

The model becomes `Ensemble(member, N)`: the member module under `nn.vmap`, its parameters (and
batch statistics) stacked on a leading axis of size N with the logical name 'members' (which
config.ensemble.mesh_axis maps to a mesh axis, else it stays replicated), each member its own
initialisation and dropout rngs (split_rngs), every member seeing the same batch. Outputs (N, B,
...). The task becomes `EnsembleTask(task)`: the train loss is the SUM of the members' losses, so
each member's gradient is exactly its own (the members only meet in the global-norm clipping of
config.optim.clip_norm, when set); train metrics are the members' means. The eval averages the
members' probabilities and reports the task's metrics of that average plus NLL, Brier score, ECE
and predictive entropy (bigjax.ensemble.uncertainty). members = 1 leaves model and task unchanged.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.ensemble import uncertainty
from bigjax.errors import UserError
from bigjax.tasks import base as task_base

AXIS = 'members'  # the logical name of the stacked parameters' leading axis
FIELD = 'config.ensemble'


class Ensemble(nn.Module):
  """N copies of `member` under nn.vmap: inputs (B, ...) -> outputs (N, B, ...)."""

  member: nn.Module
  members: int

  @nn.compact
  def __call__(self, x, *, train=False, **kwargs):
    def run(member, x):
      return member(x, train=train, **kwargs)

    stacked = nn.vmap(
      run,
      variable_axes={'params': 0, 'batch_stats': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=None,
      out_axes=0,
      axis_size=self.members,
      metadata_params={nn.PARTITION_NAME: AXIS},
    )
    return stacked(self.member, x)


class EnsembleTask(task_base.Task):
  """The member task over (N, B, ...) outputs; see the module doc."""

  def __init__(self, task: task_base.Task, members: int):
    super().__init__(task.data)
    self.task, self.members = task, members
    self.writes_predictions = task.writes_predictions

  @property
  def output_size(self) -> int:
    return self.task.output_size

  def check_data(self, arrays, name, split):
    self.task.check_data(arrays, name, split)

  def prepare(self, batch, rng):
    return self.task.prepare(batch, rng)

  def loss_and_metrics(self, outputs, batch):
    """outputs (N, B, ...) -> (sum over members of the task loss, {metric: member mean})."""
    chex.assert_axis_dimension(outputs, 0, self.members)
    losses, metrics = jax.vmap(lambda out: self.task.loss_and_metrics(out, batch))(outputs)
    return losses.sum(), {k: v.mean() for k, v in metrics.items()}

  def eval_outputs(self, outputs, batch):
    """(N, B, ...) outputs -> (B, ...) the mean of the members' eval outputs (probabilities)."""
    return jax.vmap(lambda out: self.task.eval_outputs(out, batch))(outputs).mean(0)

  def eval_report(self, outputs, labels):
    report = self.task.eval_report(outputs, labels)
    return {**report, **uncertainty.report(outputs, labels)}

  @property
  def report_metrics(self) -> tuple[str, ...]:
    return (*self.task.report_metrics, 'nll', 'brier', 'ece', 'entropy')

  def prediction_scores(self, outputs):
    return self.task.prediction_scores(outputs)


def enabled(cfg) -> bool:
  return cfg.members > 1


def check(config) -> None:
  """UserError for config.ensemble: members < 1, an unknown mesh axis, or a combination that
  does not apply to stacked members (distillation, pruning, quantization, adversarial training or
  attacks, init_from)."""
  cfg = config.ensemble
  if cfg.members < 1:
    raise UserError(f'{FIELD}.members={cfg.members} must be >= 1 (1 = a single model)')
  if cfg.mesh_axis not in ('', 'data', 'fsdp', 'tensor'):
    raise UserError(
      f"{FIELD}.mesh_axis={cfg.mesh_axis!r} is unknown; use '' (replicated), 'data', 'fsdp' or "
      "'tensor'"
    )
  if not enabled(cfg):
    return
  others = {
    'config.distill.teacher': config.distill.teacher,
    'config.prune.method': config.prune.method,
    'config.quantize.mode': config.quantize.mode,
    'config.adversarial.method': config.adversarial.method,
    'config.eval_attacks.methods': tuple(config.eval_attacks.methods),
    'config.init_from.checkpoint': config.init_from.checkpoint,
    'config.init_from.hf': config.init_from.hf,
  }
  for field, value in others.items():
    if value:
      raise UserError(
        f'{FIELD}.members={cfg.members} does not combine with {field}={value!r}; unset one '
        '(or combine separately trained runs with bigjax-ensemble)'
      )


def wrap(config, model: nn.Module, task: task_base.Task) -> tuple[nn.Module, task_base.Task]:
  """(Ensemble(model, N), EnsembleTask(task, N)) for config.ensemble.members = N > 1, else the
  two unchanged; checked first (see check)."""
  check(config)
  n = config.ensemble.members
  if n == 1:
    return model, task
  return Ensemble(model, n), EnsembleTask(task, n)


def sharding_rules(config) -> tuple:
  """config.sharding_rules with ('members', config.ensemble.mesh_axis) first when set."""
  axis = config.ensemble.mesh_axis
  return ((AXIS, axis), *config.sharding_rules) if axis else tuple(config.sharding_rules)


def member_params(params: Any, i: int) -> Any:
  """Member i's parameters (the unstacked tree a single model has) of an Ensemble's params."""
  return jax.tree.map(lambda p: p[i], params['member'])


def stack(trees: list) -> dict:
  """N single-model variable trees -> the Ensemble's ({'member': stacked}) tree of the same kind."""
  return {'member': jax.tree.map(lambda *xs: jnp.stack([np.asarray(x) for x in xs]), *trees)}
