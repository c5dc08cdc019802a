"""Federated learning, simulated on one mesh: FedAvg (McMahan et al. 2017), FedSGD and FedProx.

config.federated.clients = K > 0 turns it on (fields in config_lib.base_config). The run is then
an ordinary bigjax run whose step is a round: bigjax.train's loop runs it unchanged, so rounds are
the unit of config.num_steps, log_every, eval_every (test accuracy of the global model) and
checkpoint_every, of history.jsonl and of the checkpoints, and a run killed at any point resumes
bitwise, as any bigjax run does. The modules, one job each:
  splits.py      which examples each client holds (iid | shards | dirichlet)
  rounds.py      the data of round r: the selected clients and their local batches, from (seed, r)
  round_step.py  the jitted round: clients vmapped (split over the mesh), weighted average
Here: `plan` (build()'s hook: the rounds' data and the server state), `compile_round`
(Experiment.compile_train_step's hook) and the checks of what does not combine with rounds.

The global train state is a TrainState whose opt_state is the server's (optax.identity(): the
server takes the average as it is); the client optimizer is config.optim, started fresh in every
round, with its learning-rate schedule over rounds.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from bigjax import mesh as mesh_lib
from bigjax import optim
from bigjax.errors import UserError
from bigjax.federated import round_step, rounds


def enabled(config) -> bool:
  return config.federated.clients > 0


def unit(config) -> str:
  """What one step of the run is called in its console lines: 'round' or 'step'."""
  return 'round' if enabled(config) else 'step'


def check(config) -> None:
  """UserError for the settings a federated run cannot honour (each names its field)."""
  if not config.num_steps:
    raise UserError(
      'config.federated.clients > 0 trains in rounds: set config.num_steps to the number of '
      'rounds (config.num_epochs is not read)'
    )
  others = (
    ('distill.teacher', config.distill.teacher),
    ('prune.method', config.prune.method),
    ('quantize.mode', config.quantize.mode),
    ('adversarial.method', config.adversarial.method),
    ('peft.method', config.peft.method),
    ('ensemble.members', config.ensemble.members > 1 and config.ensemble.members),
    ('grad_accum_steps', config.grad_accum_steps > 1 and config.grad_accum_steps),
    ('log_grad_norms', config.log_grad_norms),
  )
  for field, value in others:
    if value:
      raise UserError(
        f'config.{field}={value!r} does not combine with config.federated (a round has no '
        'central train step to apply it to); turn one of them off'
      )


def plan(config, train_arrays: Any, mesh, batches: Any, tx: optax.GradientTransformation):
  """build()'s hook -> (train batches, the train state's optimizer): unchanged when not
  federated; else RoundData over the train split and the server's optax.identity()."""
  if not enabled(config):
    return batches, tx
  check(config)
  data = rounds.RoundData(
    train_arrays, config.federated, config.seed, mesh_lib.data_parallel_size(mesh)
  )
  return data, optax.identity()


def client_optimizer(cfg) -> optax.GradientTransformation:
  """config.optim at learning rate 1 and no schedule (the round scales its updates by the
  schedule's rate for that round)."""
  unit_rate = cfg.copy_and_resolve_references()
  unit_rate.update(lr=1.0, schedule='constant', warmup_steps=0)
  return optim.make_optimizer(unit_rate, 1)


def compile_round(exp) -> Any:
  """AOT-compiles the jitted, donated round (state, round data) -> (state, metrics) for exp's
  mesh: the client axis split over the batch axes, the state in exp.shardings."""
  c, data = exp.config, exp.batches
  client_sharding = mesh_lib.batch_sharding(exp.mesh)
  on_cpu = next(iter(exp.mesh.devices.flat)).platform == 'cpu'
  step = round_step.make_round_step(
    exp.model,
    exp.task,
    client_optimizer(c.optim),
    optim.learning_rate_schedule(c.optim, exp.total_steps),
    seed=c.seed,
    client_sharding=client_sharding,
    augment_cfg=c.augment,
    prox_mu=c.federated.prox_mu,
    nan_policy=c.nan_policy,
    unroll=data.local_steps if on_cpu else 1,
  )
  abstract_data = {
    k: jax.ShapeDtypeStruct((data.padded, *v.shape[1:]), v.dtype, sharding=client_sharding)
    for k, v in data.batch(0).items()
  }
  return (
    jax.jit(
      step,
      in_shardings=(exp.shardings, client_sharding),
      out_shardings=(exp.shardings, mesh_lib.replicated(exp.mesh)),
      donate_argnums=0,
    )
    .lower(exp.abstract, abstract_data)
    .compile()
  )
