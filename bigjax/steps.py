"""Train state, its sharded initialisation, and the jitted train and eval steps.

Randomness inside a step (dropout, augmentation) comes from `fold_in(key(seed), step)`, so a step's
result depends only on (state, batch), which is what makes resumed training exact.
"""
import functools
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigjax.data import augment as augment_lib

NAN_POLICIES = ('raise', 'skip')


@flax.struct.dataclass
class TrainState:
  """step: () int32; params; model_state: non-trainable collections (e.g. batch_stats); opt_state."""
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def _init_state(model, tx, sample_inputs, rng):
  variables = model.init({'params': rng, 'dropout': rng}, sample_inputs, train=False)
  params = variables.pop('params')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
                    opt_state=tx.init(params))


def abstract_state(model, tx, sample_inputs, seed):
  """Shapes of the train state with logical-axis boxes, computed without allocating anything."""
  return jax.eval_shape(functools.partial(_init_state, model, tx, sample_inputs),
                        jax.random.key(seed))


def create_state(model, tx, sample_inputs, seed, shardings):
  """Initialises the train state directly into `shardings` (nothing is materialised unsharded)."""
  init = lambda rng: nn.meta.unbox(_init_state(model, tx, sample_inputs, rng))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))



def prepare_inputs(inputs, rng, augment_cfg):
  """Host batch inputs -> float model inputs: uint8 images to [0, 1], then augmentation if enabled."""
  x = augment_lib.to_float(inputs)
  if rng is not None and augment_cfg is not None and augment_cfg.get('enabled', False):
    x = augment_lib.augment(rng, x, crop_padding=augment_cfg.get('crop_padding', 0),
                            flip=augment_cfg.get('flip', False),
                            max_rotate_degrees=augment_cfg.get('max_rotate_degrees', 0.0),
                            max_scale=augment_cfg.get('max_scale', 0.0))
  return x


def make_train_step(model, task, tx, *, seed, augment_cfg=None, nan_policy='raise'):
  """Returns train_step(state, batch) -> (state, metrics).

  batch: {'inputs': (B, ...), 'label': (B,)} global arrays. metrics: scalars 'loss', 'grad_norm',
  'finite' (1.0 if loss and gradient norm are finite) plus the task's metrics. Under
  nan_policy='skip' a non-finite step leaves params, model and optimizer state unchanged (the step
  counter still advances).
  """
  def train_step(state, batch):
    chex.assert_rank(batch['label'], {1, 2})
    chex.assert_equal_shape_prefix([batch['inputs'], batch['label']], 1)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    k_augment, k_dropout = jax.random.split(rng)
    inputs = prepare_inputs(batch['inputs'], k_augment, augment_cfg)
    mutable = list(state.model_state) or False

    def loss_fn(params):
      out = model.apply({'params': params, **state.model_state}, inputs, train=True,
                        rngs={'dropout': k_dropout}, mutable=mutable)
      outputs, new_model_state = out if mutable else (out, state.model_state)
      loss, metrics = task.loss_and_metrics(outputs, batch)
      return loss, (metrics, new_model_state)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        model_state=dict(model_state), opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == 'skip':
      kept = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite.astype(jnp.float32), **metrics}
    return new, metrics

  return train_step


def make_eval_step(model, task):
  """Returns eval_step(state, inputs) -> task.eval_outputs(model outputs), e.g. (B, K) probabilities."""
  def eval_step(state, inputs):
    x = prepare_inputs(inputs, None, None)
    return task.eval_outputs(model.apply({'params': state.params, **state.model_state}, x,
                                         train=False))
  return eval_step
