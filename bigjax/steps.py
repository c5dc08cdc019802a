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


@flax.struct.dataclass
class TrainState:
  """step: () int32; params; model_state: non-trainable collections (e.g. batch_stats); opt_state;
  teacher: a frozen distillation teacher's variables (config.distill; None = no teacher, and then
  the state's tree is the same as without the field)."""

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  teacher: Any = None


def sample_batch(task, arrays):
  """The first example of a host split as a batch of one, prepared as the task feeds the model."""
  batch = {k: jnp.asarray(v[:1]) for k, v in arrays.items()}
  return task.prepare(batch, jax.random.key(0))


def _init_state(model, tx, sample, rng, teacher_model=None):
  variables = apply_model(
    model, None, sample, train=False, init_rngs={'params': rng, 'dropout': rng}
  )
  params = variables.pop('params')
  teacher = None
  if teacher_model is not None:  # placeholder values; the caller puts the teacher's own there
    teacher = apply_model(teacher_model, None, sample, train=False, init_rngs={'params': rng})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=dict(variables),
    opt_state=tx.init(params),
    teacher=teacher,
  )


def abstract_state(model, tx, sample, seed, teacher_model=None):
  """Shapes of the train state with logical-axis boxes, computed without allocating anything.

  sample: a prepared batch of one (see sample_batch). teacher_model: config.distill's teacher,
  whose variables (with their logical axes) become state.teacher."""
  init = functools.partial(_init_state, model, tx, sample, teacher_model=teacher_model)
  return jax.eval_shape(init, jax.random.key(seed))


def create_state(model, tx, sample, seed, shardings, teacher_model=None):
  """Initialises the train state directly into `shardings` (nothing is materialised unsharded).
  With a teacher_model, state.teacher holds freshly initialised variables to be replaced by the
  teacher's own (bigjax.compress.distill.place)."""
  init = lambda rng: nn.meta.unbox(_init_state(model, tx, sample, rng, teacher_model=teacher_model))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def prepare_inputs(inputs, rng, augment_cfg):
  """Batch inputs -> model inputs: uint8 images to float [0, 1] then augmentation if enabled; token
  ids (other integer types) and float features pass through."""
  x = augment_lib.to_float(inputs) if inputs.dtype == jnp.uint8 else inputs
  if rng is not None and augment_cfg is not None and augment_cfg.enabled:
    x = augment_lib.augment(
      rng,
      x,
      crop_padding=augment_cfg.crop_padding,
      flip=augment_cfg.flip,
      max_rotate_degrees=augment_cfg.max_rotate_degrees,
      max_scale=augment_cfg.max_scale,
    )
  return x


# batch entries passed to the model as keyword arguments ('positions': packed LM windows)
MODEL_KWARG_KEYS = ('segment_ids', 'positions')


def apply_model(
  model, variables, batch, *, train, rngs=None, mutable=False, augment=None, init_rngs=None
):
  """model.apply on a prepared batch: batch['inputs'] (images made float, augmented when `augment`
  = (rng, config.augment)) plus any MODEL_KWARG_KEYS present in the batch. With `init_rngs`,
  model.init instead (returns the variables)."""
  x = prepare_inputs(batch['inputs'], *(augment or (None, None)))
  kwargs = {k: batch[k] for k in MODEL_KWARG_KEYS if k in batch}
  if init_rngs is not None:
    return model.init(init_rngs, x, train=train, **kwargs)
  return model.apply(variables, x, train=train, rngs=rngs, mutable=mutable, **kwargs)


def make_train_step(
  model,
  task,
  tx,
  *,
  seed,
  augment_cfg=None,
  nan_policy='raise',
  grad_accum_steps=1,
  log_grad_norms=False,
  distill=None,
  prune_cfg=None,
  adversarial=None,
  peft=None,
):
  """Returns train_step(state, batch) -> (state, metrics).

  batch: global arrays {'inputs': (B, ...), ...} holding what the task needs (e.g. 'label').
  The task's `prepare(batch, rng)` (language modelling: targets, masking) transforms the batch on
  device first. grad_accum_steps A > 1 splits the batch into A micro-batches of B/A
  (rows i, i+A, i+2A, ... so each stays split over the data axes), runs them one after another
  under lax.scan and applies one update with the mean gradient: the same step as the whole batch at
  1/A of the activation memory. metrics: scalars 'loss', 'grad_norm', 'finite' (1.0 if loss and
  gradient norm are finite) plus the task's metrics. Under nan_policy='skip' a non-finite step
  leaves params, model and optimizer state unchanged (the step counter still advances).
  log_grad_norms: metrics also hold 'grad_norm/<name>', the L2 norm of the gradients of each
  top-level parameter module (e.g. hidden_0 ... output for the MLP).
  distill: a bigjax.compress.distill.Teacher: its model runs on the same inputs with
  state.teacher and the loss becomes Teacher.loss (metrics add 'task_loss', 'distill_kl'); with
  Teacher.split, student and teacher run on the batch's distill split inputs for the KL term.
  prune_cfg: config.prune when pruning: metrics add 'sparsity' and 'sparsity/<layer>' (exact zeros
  of the new parameters).
  adversarial: a bigjax.robust.adversarial.Adversarial (config.adversarial): part of each batch
  is replaced by attacks on the current parameters before the loss.
  peft: a bigjax.peft.Plan (config.peft): only its trainable parameters are differentiated, and
  the frozen ones are carried over bitwise.
  """

  def loss_and_grads(params, model_state, batch, k_augment, k_dropout, teacher=None, step=None):
    mutable = list(model_state) or False
    student, augment = model, (k_augment, augment_cfg)
    if adversarial is not None:  # attacked inputs (or shifted embeddings): bigjax/robust
      variables = {'params': params, **model_state}
      student, batch, augment = adversarial.perturb(
        model, variables, batch, augment, k_dropout, step
      )

    def loss_fn(params):
      out = apply_model(
        student,
        {'params': params, **model_state},
        batch,
        train=True,
        rngs={'dropout': k_dropout},
        mutable=mutable,
        augment=augment,
      )
      outputs, new_model_state = out if mutable else (out, model_state)
      loss, metrics = task.loss_and_metrics(outputs, batch)
      if distill is not None:
        soft_out, soft_batch = outputs, batch
        if distill.split:  # config.distill.split: the soft term on that split's batch instead
          soft_batch = distill.soft_batch(batch)
          out = apply_model(
            student,
            {'params': params, **model_state},
            soft_batch,
            train=True,
            rngs={'dropout': jax.random.fold_in(k_dropout, 1)},
            mutable=mutable,
            augment=augment,
          )
          soft_out = out[0] if mutable else out  # its batch statistics are not kept
        teacher_out = apply_model(distill.model, teacher, soft_batch, train=False, augment=augment)
        loss, metrics = distill.loss(loss, metrics, soft_out, teacher_out)
      return loss, (metrics, dict(new_model_state))

    grad_fn = jax.value_and_grad if peft is None else peft.value_and_grad  # bigjax/peft
    (loss, (metrics, model_state)), grads = grad_fn(loss_fn, has_aux=True)(params)
    return grads, model_state, dict(metrics, loss=loss)

  def accumulated(params, model_state, batch, k_augment, k_dropout, teacher=None, step=None):
    a = grad_accum_steps
    micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1), batch
    )

    def body(carry, xs):
      grads_sum, model_state, metrics_sum = carry
      i, mb = xs
      grads, model_state, metrics = loss_and_grads(
        params,
        model_state,
        mb,
        jax.random.fold_in(k_augment, i),
        jax.random.fold_in(k_dropout, i),
        teacher,
        step,
      )
      add = lambda x, y: jax.tree.map(jnp.add, x, y)
      return (add(grads_sum, grads), model_state, add(metrics_sum, metrics)), None

    shapes = jax.eval_shape(
      loss_and_grads,
      params,
      model_state,
      jax.tree.map(lambda x: x[0], micro),
      k_augment,
      k_dropout,
      teacher,
      step,
    )
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    (grads, model_state, metrics), _ = jax.lax.scan(
      body, (zeros(shapes[0]), model_state, zeros(shapes[2])), (jnp.arange(a), micro)
    )
    mean = lambda tree: jax.tree.map(lambda x: x / a, tree)
    return mean(grads), model_state, mean(metrics)

  def train_step(state, batch):
    chex.assert_equal_shape_prefix(list(batch.values()), 1)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    k_augment, k_dropout, k_task = jax.random.split(rng, 3)
    batch = task.prepare(batch, k_task)
    compute = loss_and_grads if grad_accum_steps == 1 else accumulated
    grads, model_state, metrics = compute(
      state.params, state.model_state, batch, k_augment, k_dropout, state.teacher, state.step
    )
    loss = metrics.pop('loss')
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if peft is not None:  # the frozen parameters stay bitwise as they were (bigjax/peft)
      params = peft.keep_frozen(params, state.params)
    new = state.replace(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == 'skip':
      kept = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
    metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'finite': finite.astype(jnp.float32),
      **metrics,
    }
    if log_grad_norms:
      metrics.update({f'grad_norm/{name}': optax.tree.norm(g) for name, g in grads.items()})
    if prune_cfg is not None:
      from bigjax.compress import prune

      metrics.update(prune.sparsity_metrics(new.params, prune_cfg))
    return new, metrics

  return train_step


def make_eval_step(model, task, seed=0):
  """Returns eval_step(state, batch) -> task.eval_outputs(model outputs, batch): per-example arrays
  (B, ...), or a dict of them. Task preparation (e.g. MLM masking) uses a fixed rng."""

  def eval_step(state, batch):
    batch = task.prepare(batch, jax.random.key(seed))
    outputs = apply_model(model, {'params': state.params, **state.model_state}, batch, train=False)
    return task.eval_outputs(outputs, batch)

  return eval_step
