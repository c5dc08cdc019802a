"""bigjax/steps.py on one batch: the jitted train step, called directly (no training loop)."""

import jax
import numpy as np
import pytest

from bigjax import experiment, steps

from conftest import load_config


def _one_step(config, devices):
  """(new params, metrics, compiled step text) of one train step from the seed's initial state on
  the first batch."""
  exp = experiment.build(config, devices)
  state = steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings)
  compiled = exp.compile_train_step()
  new, metrics = compiled(state, exp.to_global(exp.batches.batch(0)))
  return jax.device_get(new.params), jax.device_get(metrics), compiled.as_text()


@pytest.mark.parametrize(
  'name', ['mlp_breast_cancer', pytest.param('gpt_shakespeare', marks=pytest.mark.slow)]
)
def test_accumulated_step_equals_the_big_batch_step(name, one_device):
  config = load_config(name, 'smoke')
  # Plain SGD from step 0: the update is -lr * gradient, so the parameters compare the gradients
  # themselves (Adam's first step, ±lr per weight, would magnify rounding in near-zero gradients).
  config.optim.update(name='sgd', schedule='constant', warmup_steps=0, weight_decay=0.0)
  big_params, big_metrics, big_text = _one_step(config, one_device)
  config.grad_accum_steps = 4
  acc_params, acc_metrics, acc_text = _one_step(config, one_device)
  # The feature is on: the micro-batches run in a loop in the compiled program, and the big step
  # has no such loop.
  assert 'while' in acc_text and 'while' not in big_text
  np.testing.assert_allclose(acc_metrics['loss'], big_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(acc_metrics['grad_norm'], big_metrics['grad_norm'], rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_params, big_params
  )
  # ...and the step changed the parameters (an accumulation that dropped the gradient would not).
  exp = experiment.build(config, one_device)
  init = jax.device_get(
    steps.create_state(exp.model, exp.tx, exp.sample, config.seed, exp.shardings).params
  )
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), acc_params, init)
  assert max(jax.tree.leaves(moved)) > 1e-4
