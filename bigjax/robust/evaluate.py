"""config.eval_attacks: robust accuracy under each attack and radius, beside the clean eval report.

Every eval of a run with `config.eval_attacks.methods` set (the periodic ones and the final one)
adds `robust_accuracy_<method>_<norm>_<eps>` (e.g. `robust_accuracy_pgd_linf_0.1`) to the eval
report, so they reach history.jsonl, TensorBoard, results.json and the sweep tables like the other
eval metrics. The attacks run in one jitted step over the eval batches, with the run's mesh and
shardings; their random starts come from (config.seed, batch index), so an eval is reproducible.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import mesh as mesh_lib
from bigjax import steps
from bigjax.errors import UserError
from bigjax.robust import attacks, objective
from bigjax.tasks import base as task_base

FIELD = 'config.eval_attacks'


def enabled(cfg) -> bool:
  """True when config.eval_attacks names at least one method."""
  return bool(cfg.methods)


def attack_list(cfg) -> list[attacks.Attack]:
  """config.eval_attacks -> one Attack per (method, eps), methods outermost."""
  return [
    attacks.Attack(
      method, cfg.norm, float(eps), cfg.steps, cfg.step_size, cfg.random_start, cfg.restarts
    )
    for method in cfg.methods
    for eps in cfg.eps
  ]


def check_inputs(field: str, task: task_base.Task, inputs_dtype) -> None:
  """UserError naming `field` when the task reports no accuracy or the inputs are token ids."""
  if 'accuracy' not in task.report_metrics:
    raise UserError(
      f'{field} needs a classification task (one whose eval reports accuracy), not '
      f'{type(task).__module__}; unset {field}'
    )
  dtype = np.dtype(inputs_dtype)
  if np.issubdtype(dtype, np.integer) and dtype != np.uint8:
    raise UserError(
      f'{field} perturbs float or image inputs, and these are token ids ({dtype}); unset {field}'
    )


def check(cfg, task: task_base.Task, inputs_dtype) -> None:
  """UserError naming the config.eval_attacks field that cannot run (see attacks.check), eps
  missing, max_examples < 0, or a task/input that attacks do not apply to."""
  if not enabled(cfg):
    if cfg.eps:
      raise UserError(
        f'{FIELD}.eps={tuple(cfg.eps)} is set but {FIELD}.methods is empty; set '
        f"{FIELD}.methods=('pgd',) (or 'fgsm')"
      )
    return
  if not cfg.eps:
    raise UserError(f'{FIELD}.methods={tuple(cfg.methods)} needs {FIELD}.eps, e.g. (0.1, 0.3)')
  for attack in attack_list(cfg):
    attacks.check(attack, FIELD, method_field='methods')
  if cfg.max_examples < 0:
    raise UserError(f'{FIELD}.max_examples={cfg.max_examples} must be >= 0 (0 = all)')
  check_inputs(FIELD, task, inputs_dtype)


def make_attack_step(model, task: task_base.Task, attack_seq: list[attacks.Attack], seed: int):
  """attack_step(state, batch, index) -> {attack name: (B,) 1.0 where the attacked example is
  still classified correctly}; index: () int32, the eval batch's position (folded into the random
  starts' key)."""

  def attack_step(state, batch, index):
    batch = task.prepare(batch, jax.random.key(seed))
    variables = {'params': state.params, **state.model_state}
    bounds = attacks.input_bounds(batch['inputs'].dtype)
    x = steps.prepare_inputs(batch['inputs'], None, None)
    loss_fn, score_fn = objective.objective(model, task, variables, batch)
    rng = jax.random.fold_in(jax.random.key(seed), index)
    out = {}
    for i, attack in enumerate(attack_seq):
      x_adv = attacks.perturb(loss_fn, x, jax.random.fold_in(rng, i), attack, bounds, score_fn)
      logits = steps.apply_model(model, variables, {**batch, 'inputs': x_adv}, train=False)
      out[attack.name] = objective.per_example(task, logits, {**batch, 'inputs': x_adv})[1]
    return out

  return attack_step


class RobustEval:
  """The compiled attack step of an Experiment and the report it adds (see module doc)."""

  def __init__(self, cfg, model, task: task_base.Task, seed: int):
    self.cfg = cfg
    self.attacks = attack_list(cfg)
    self._step = make_attack_step(model, task, self.attacks, seed)
    self._compiled: Any = None

  def report(self, exp, state) -> dict[str, float]:
    """{'robust_accuracy_<attack name>': fraction of the (first max_examples) eval examples still
    classified correctly under that attack}. Reads the eval split through exp.eval_batches(), so
    in-memory and streamed data (config.data.load) are attacked alike."""
    if self._compiled is None:
      self._compiled = jax.jit(
        self._step,
        in_shardings=(exp.shardings, exp.batch_sharding, mesh_lib.replicated(exp.mesh)),
        out_shardings=exp.batch_sharding,
      )
    n = exp.eval_loader.num_examples
    if self.cfg.max_examples:
      n = min(n, self.cfg.max_examples)
    batches = itertools.islice(exp.eval_batches(), math.ceil(n / exp.config.eval_batch_size))
    correct = []
    for i, batch in enumerate(batches):
      out = self._compiled(state, exp.to_global(batch), jnp.int32(i))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
      correct.append(jax.device_get(out))
    return {
      f'robust_accuracy_{a.name}': float(np.concatenate([c[a.name] for c in correct])[:n].mean())
      for a in self.attacks
    }


def from_config(config, model, task: task_base.Task, inputs_dtype) -> RobustEval | None:
  """config.eval_attacks -> RobustEval (checked; UserError naming the field), or None when off."""
  check(config.eval_attacks, task, inputs_dtype)
  if not enabled(config.eval_attacks):
    return None
  return RobustEval(config.eval_attacks, model, task, config.seed)
