"""Adversarial robustness, one module per job, each a config section of base_config.

- attacks.py      FGSM and PGD (L-infinity and L2; steps, step size, random start, restarts) as
                  pure jax functions of a loss.
- objective.py    a model and a classification task as per-example losses of float inputs.
- evaluate.py     config.eval_attacks: robust accuracy at each attack and eps in the eval report.
- adversarial.py  config.adversarial: adversarial training inside the jitted train step (inputs,
                  or token embeddings for text models).
"""

from __future__ import annotations

from typing import Any


def from_config(config, model, task, inputs_dtype, params) -> tuple[Any, Any]:
  """(RobustEval or None, Adversarial or None) for config.eval_attacks and config.adversarial,
  both checked (UserError naming the field). inputs_dtype: the train split's stored inputs dtype;
  params: the abstract parameter tree."""
  from bigjax.robust import adversarial, evaluate

  return (
    evaluate.from_config(config, model, task, inputs_dtype),
    adversarial.from_config(config.adversarial, task, inputs_dtype, params),
  )
