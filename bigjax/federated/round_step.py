"""One jitted FedAvg round: the selected clients train in parallel, the server averages them.

round_step(state, data) -> (state, metrics). `data` is a RoundData batch (bigjax/federated/
rounds.py): per client m, S local steps of B rows. jax.vmap runs the clients side by side; their
axis is split over the mesh's batch axes (data x fsdp), so each device trains its own clients and
the weighted average sum_k (n_k / n) w_k is one all-reduce. Each client starts from the round's
global parameters and a fresh state of the client optimizer, and takes its S local steps under
lax.scan; a step whose rows all weigh 0 changes nothing. The local loss is the weighted mean of
the task's per-example losses over the step's real rows, plus (mu / 2) ||w - w_round||^2 with
FedProx. Randomness (dropout, augmentation, task preparation) comes from
fold_in(fold_in(fold_in(key(seed), round), client), local step): a round depends only on (state,
data), as a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from bigjax import steps
from bigjax.federated.rounds import CLIENT, EXAMPLES, WEIGHT


def per_example_losses(task, outputs: Any, batch: dict) -> tuple[jax.Array, dict]:
  """The task's loss and metrics of each row alone: outputs/batch (B, ...) -> ((B,), {name: (B,)})."""
  one = lambda tree: jax.tree.map(lambda x: x[None], tree)
  return jax.vmap(lambda o, b: task.loss_and_metrics(one(o), one(b)))(outputs, batch)


def make_round_step(
  model,
  task,
  client_tx: optax.GradientTransformation,
  lr_at: Callable[[jax.Array], jax.Array],
  *,
  seed: int,
  client_sharding: jax.sharding.Sharding,
  augment_cfg=None,
  prox_mu: float = 0.0,
  nan_policy: str = 'raise',
  unroll: int | bool = 1,
) -> Callable:
  """Returns round_step(state, data) -> (state, metrics).

  client_tx: the client optimizer at learning rate 1; its updates are scaled by lr_at(round) (all
  of bigjax's optimizers are linear in the learning rate, so this is the optimizer at that rate).
  client_sharding: how the client axis (M, ...) of the clients' parameters is laid out.
  unroll: lax.scan's unroll of the local steps (XLA:CPU runs a conv's kernel gradient ~20x
  slower inside a while loop than unrolled, measured, so the caller unrolls them on CPU).
  metrics: 'loss' and the task's metrics averaged over every real row of every local step of the
  round, 'update_norm' (L2 norm of new - old global parameters) and 'finite' (1.0 when loss and
  update are finite; under nan_policy='skip' a non-finite round leaves the state as it was).
  """

  def local_steps(global_params, model_state, data_k, lr, client_key):
    batch_k, weight_k = data_k
    mutable = list(model_state) or False

    def one_step(carry, xs):
      params, opt_state, state_k = carry
      batch, weight, i = xs
      k_augment, k_dropout, k_task = jax.random.split(jax.random.fold_in(client_key, i), 3)
      batch = task.prepare(batch, k_task)
      count = weight.sum()

      def loss_fn(p):
        out = steps.apply_model(
          model,
          {'params': p, **state_k},
          batch,
          train=True,
          rngs={'dropout': k_dropout},
          mutable=mutable,
          augment=(k_augment, augment_cfg),
        )
        outputs, new_state = out if mutable else (out, state_k)
        losses, metrics = per_example_losses(task, outputs, batch)
        mean = lambda v: (v * weight).sum() / jnp.maximum(count, 1.0)
        return mean(losses), (jax.tree.map(mean, metrics), dict(new_state))

      (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      if prox_mu:
        grads = jax.tree.map(lambda g, p, p0: g + prox_mu * (p - p0), grads, params, global_params)
      updates, new_opt = client_tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
      keep = count > 0  # an all-padding step (the client has run out of batches) changes nothing
      carry = jax.tree.map(
        lambda a, b: jnp.where(keep, a, b),
        (new_params, new_opt, new_state),
        (params, opt_state, state_k),
      )
      sums = {'loss': loss * count, **{k: v * count for k, v in metrics.items()}, 'rows': count}
      return carry, sums

    start = (global_params, client_tx.init(global_params), model_state)
    xs = (batch_k, weight_k, jnp.arange(weight_k.shape[0]))
    (params, _, state_k), sums = jax.lax.scan(one_step, start, xs, unroll=unroll)
    return params, state_k, jax.tree.map(jnp.sum, sums)

  def round_step(state, data):
    data = dict(data)
    weight, examples, client = data.pop(WEIGHT), data.pop(EXAMPLES), data.pop(CLIENT)
    chex.assert_rank(weight, 3)
    chex.assert_equal_shape_prefix([weight, *data.values()], 3)
    chex.assert_shape([examples, client], (weight.shape[0],))
    round_key = jax.random.fold_in(jax.random.key(seed), state.step)
    lr = lr_at(state.step)

    def client_update(batch_k, weight_k, client_k):
      return local_steps(
        state.params,
        state.model_state,
        (batch_k, weight_k),
        lr,
        jax.random.fold_in(round_key, client_k),
      )

    params_k, model_state_k, sums = jax.vmap(client_update)(data, weight, client)
    params_k = jax.lax.with_sharding_constraint(params_k, client_sharding)
    share = examples / examples.sum()  # n_k / n over this round's clients; padding weighs 0
    average = lambda tree: jax.tree.map(
      lambda x: jnp.tensordot(share, x, axes=1).astype(x.dtype), tree
    )
    new = state.replace(
      step=state.step + 1, params=average(params_k), model_state=average(model_state_k)
    )
    rows = jnp.maximum(sums.pop('rows').sum(), 1.0)
    metrics = {k: v.sum() / rows for k, v in sums.items()}
    update_norm = optax.tree.norm(jax.tree.map(jnp.subtract, new.params, state.params))
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(update_norm)
    if nan_policy == 'skip':
      kept = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
    metrics.update(update_norm=update_norm, finite=finite.astype(jnp.float32))
    return new, metrics

  return round_step
