"""Adapter-only checkpoints (config.peft.save='trainable') and loading a finished adapter run.

With save='trainable' a checkpoint holds the train state with only the trainable parameters
(the adapter) in `params`, beside the step, model state and optimizer state (which covers the
adapter only anyway): a few MiB for a model of GiBs. A resume rebuilds the frozen base exactly as
the run started it (the init at config.seed, then config.init_from's parameters), so it is bitwise
the run that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import mesh as mesh_lib
from bigjax.errors import UserError
from bigjax.peft import common


class TrainableOnly:
  """A bigjax.checkpoint.Checkpointer that saves, checks and restores the adapter only.

  fresh_params() -> the full params tree a new run starts from (base + fresh adapter), called on
  restore to supply the frozen base. Every other method is the wrapped Checkpointer's."""

  def __init__(self, inner, plan: common.Plan, fresh_params: Callable[[], Any]):
    self.inner, self.plan, self.fresh_params = inner, plan, fresh_params

  def __getattr__(self, name: str) -> Any:
    return getattr(self.inner, name)

  def _small(self, state):
    trainable, _ = self.plan.split(state.params)
    return state.replace(params=common.unflat(trainable))

  def save(self, step, state) -> None:
    self.inner.save(step, self._small(state))

  def mismatch(self, abstract_state) -> str | None:
    return self.inner.mismatch(self._small(abstract_state))

  def restore_latest(self, abstract_state):
    state, step = self.inner.restore_latest(self._small(abstract_state))
    if state is None:
      return None, None
    full = {**common.flat(self.fresh_params()), **common.flat(state.params)}
    return state.replace(params=common.unflat(full)), step


def checkpointer(config, exp, ckpt, loaded: Callable[[Any], Any] | None):
  """`ckpt` as bigjax-train uses it: wrapped in TrainableOnly under config.peft.save='trainable'.
  loaded: config.init_from's params -> params function (bigjax.init_from.prepare), or None."""
  if exp.peft is None or config.peft.save != 'trainable':
    return ckpt

  def fresh_params():
    params = exp.create_state().params
    return loaded(params) if loaded is not None else params

  return TrainableOnly(ckpt, exp.peft, fresh_params)


def run_params(config, model: nn.Module, params) -> tuple[nn.Module, Any]:
  """(model, params) of a finished run as bigjax-sample / bigjax-export use them: with
  config.peft, the adapted model, and for save='trainable' the frozen base rebuilt around the saved
  adapter (see base_params). Without config.peft (or a run from before it) both as given."""
  cfg = config.get('peft')
  if not common.enabled(cfg):
    return model, params
  if cfg.save == 'trainable':
    params = common.unflat({**common.flat(base_params(config, model)), **common.flat(params)})
  adapted, _ = common.plan_from_params(cfg, model, params)
  return adapted, params


def base_params(config, model: nn.Module) -> Any:
  """The frozen base a run started from, as host arrays: the model's init at config.seed (on
  tokens of config.data.seq_len: the text models HF checkpoints hold), then config.init_from's
  parameters put in. Both are built into the run's shardings (config.mesh over this process's
  devices, or all of them on 'fsdp' when it does not fit them), so no device holds the whole
  base; only the host copy returned is whole."""
  from bigjax import init_from

  x = jnp.zeros((1, config.data.seq_len), jnp.int32)
  key = jax.random.key(config.seed)
  init = lambda: model.init({'params': key, 'dropout': key}, x, train=False)['params']
  shardings = mesh_lib.tree_shardings(
    jax.eval_shape(init), _mesh(config), tuple(config.sharding_rules)
  )
  params = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
  put = init_from.prepare(config, model, params)
  return jax.device_get(put(params) if put is not None else params)


def _mesh(config) -> jax.sharding.Mesh:
  """config.mesh over the local devices, or one 'fsdp' axis over them when it does not fit
  (a run trained on more devices than this process has)."""
  try:
    return mesh_lib.make_mesh(config.mesh, jax.local_devices())
  except UserError:
    fsdp = config.mesh.copy_and_resolve_references()
    fsdp.update(data=1, fsdp=-1, tensor=1)
    fsdp.update({k: 1 for k in fsdp if k.startswith('dcn_')})
    return mesh_lib.make_mesh(fsdp, jax.local_devices())
