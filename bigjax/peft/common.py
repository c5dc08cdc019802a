"""What the PEFT methods share: target selection, the model wrapper, the trainable mask, the
optimizer and the trainable-only gradient.

A method (one module each, registered in METHODS) is an object with
  PARAMS             the names of the parameters it adds to a module ('lora_a', ...);
  make_spec(cfg, dense, model)   config.peft, {module path: 'Dense' | 'DenseGeneral'} of the base
                     model and the model itself -> a hashable spec (UserError for a bad field);
  spec_from_params(cfg, flat_params) -> the spec of a params tree that already holds the method's
                     parameters (a finished run, for bigjax-sample / bigjax-export);
and the spec has `interceptor(train)` (an `nn.intercept_methods` interceptor), `describe()` and,
where the method has one, `merge(flat_params)` (fold the adapter into the base weights),
`optimizer(tx, total_steps)` (AdaLoRA's pruning) and `virtual_tokens` (the positions prompt and
prefix tuning put in front of the tokens: an adapted model's `virtual_tokens`, 0 otherwise).

Why our own transform and not Qwix's `LoraProvider` (evaluated first; qwix 0.1.8): its LoRA
dropout is applied whatever the model's `train` flag (an eval needs a 'dropout' rng and its logits
change with it, checked), and it has no DoRA, IA3, adapters or prefix/prompt tuning; the base model
must also stay exactly the base at step 0 and after a merge. Its mechanism is the one used here:
intercept the base model's Dense / DenseGeneral calls and create the new parameters in the
intercepted module's scope, so they sit beside the kernels they adapt
('stack/layer_0/self_attention/query/lora_a'), inherit the kernels' logical axis names (and so
their shardings) and are created by the same jitted, sharded init as the base.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax import registry
from bigjax.errors import UserError

METHODS = registry.Registry('PEFT methods', 'config.peft.method')
DENSE_TYPES = (nn.Dense, nn.DenseGeneral)
FROZEN, TRAINABLE = 'frozen', 'trainable'


def enabled(cfg) -> bool:
  """Whether config.peft asks for a method ('' = off; None: a run saved before config.peft)."""
  return cfg is not None and bool(cfg.method)


def _key(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', k)))


def path_of(keypath) -> str:
  """A jax key path -> 'a/b/c' (dict keys only; a box's `.value` attribute is not part of it)."""
  return '/'.join(_key(k) for k in keypath if not isinstance(k, jax.tree_util.GetAttrKey))


def flat(tree) -> dict[str, Any]:
  """{'a/b/c': leaf} of a params tree (boxed leaves stay boxed)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def unflat(flat_tree: dict[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(flat_tree, sep='/')


def boxed(init, names):
  """`init` with logical axis names (None: a module built without them, e.g. at apply)."""
  return init if names is None else nn.with_logical_partitioning(init, names)


def targeted(spec: Any, context) -> str | None:
  """The module path of an intercepted Dense / DenseGeneral __call__ whose module is one of
  spec.targets, else None."""
  module = context.module
  if context.method_name != '__call__' or not isinstance(module, DENSE_TYPES):
    return None
  path = '/'.join(module.path)
  return path if path in spec.targets else None


def refuse_dropout(cfg, what: str) -> None:
  """UserError for config.peft.dropout > 0 beside a method that has no dropout."""
  if cfg.dropout:
    raise UserError(
      f'config.peft.dropout={cfg.dropout} is not applied by {what}; set config.peft.dropout=0'
    )


# ----------------------------------------------------------------------------------------------
# Which modules a target regex selects
# ----------------------------------------------------------------------------------------------
def dense_modules(model: nn.Module, init: Callable[[nn.Module], Any]) -> dict[str, str]:
  """{module path: 'Dense' | 'DenseGeneral'} of every Dense layer `init(model)` calls (run
  abstractly, nothing allocated)."""
  found: dict[str, str] = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, DENSE_TYPES) and context.method_name == '__call__':
      found['/'.join(context.module.path)] = type(context.module).__name__
    return next_fun(*args, **kwargs)

  def run():
    with nn.intercept_methods(record):
      return init(model)

  jax.eval_shape(run)
  return found


def select_kernels(cfg, dense: dict[str, str]) -> frozenset[str]:
  """The module paths whose kernel path ('<module>/kernel') config.peft.target matches
  (re.search); UserError for a bad regex or one that matches nothing."""
  try:
    regex = re.compile(cfg.target)
  except re.error as e:
    raise UserError(
      f'config.peft.target={cfg.target!r} is not a regular expression ({e})'
    ) from None
  kernels = [f'{m}/kernel' for m in dense]
  chosen = frozenset(k.rsplit('/', 1)[0] for k in kernels if regex.search(k))
  if not chosen:
    raise UserError(
      f'config.peft.target={cfg.target!r} matches no Dense kernel; kernel paths look like '
      f'{", ".join(kernels[:4])}'
    )
  return chosen


# ----------------------------------------------------------------------------------------------
# The adapted model: the base model's class with __call__ run under the method's interceptor
# ----------------------------------------------------------------------------------------------
@functools.cache
def _adapted_class(base_cls: type, spec: Any) -> type:
  """A subclass of `base_cls` whose __call__ runs the base's under spec.interceptor(train); one
  class per (class, spec), so equal specs give equal (hashable, jit-cacheable) models."""
  inner: Any = base_cls.__call__
  wrapped = False
  while hasattr(inner, 'method_handler_wrapped'):  # flax's method wrapper; re-applied below
    inner, wrapped = inner.__wrapped__, True

  @functools.wraps(inner)
  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(spec.interceptor(bool(kwargs.get('train', False)))):
      return inner(self, *args, **kwargs)

  call = nn.module.wrap_method_once(__call__) if wrapped else __call__
  fields = {
    '__call__': call,
    '__module__': base_cls.__module__,
    'peft_base_class': base_cls,
    'virtual_tokens': getattr(spec, 'virtual_tokens', 0),
  }
  return type(base_cls.__name__, (base_cls,), fields)


def adapt(model: nn.Module, spec: Any) -> nn.Module:
  """A copy of `model` (same fields, same parameter paths) adapted by `spec`."""
  base_cls: type = getattr(type(model), 'peft_base_class', type(model))
  adapted = model.copy()
  object.__setattr__(adapted, '__class__', _adapted_class(base_cls, spec))
  return adapted


def base_model(model: nn.Module) -> nn.Module:
  """The unadapted model of an `adapt`ed one (the model itself otherwise)."""
  base_cls = getattr(type(model), 'peft_base_class', None)
  if base_cls is None:
    return model
  base = model.copy()
  object.__setattr__(base, '__class__', base_cls)
  return base


# ----------------------------------------------------------------------------------------------
# The plan: spec, trainable mask, optimizer, gradients
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
  """A built adaptation. trainable: the '/'-paths of the parameters that train (the method's);
  every other parameter is frozen. num_trainable / num_total: parameter counts."""

  method: str
  spec: Any
  trainable: frozenset[str]
  num_trainable: int
  num_total: int

  def is_trainable(self, path: str) -> bool:
    return path in self.trainable

  def labels(self, params) -> Any:
    """A tree like `params` of 'trainable' / 'frozen' (multi_transform labels). A boxed leaf
    (nn.LogicallyPartitioned) gets one label for the whole box, so a frozen leaf's optimizer state
    is a bare optax MaskedNode, not a box around one."""
    return jax.tree_util.tree_map_with_path(
      lambda p, _: TRAINABLE if path_of(p) in self.trainable else FROZEN,
      params,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )

  def optimizer(self, tx: optax.GradientTransformation, total_steps: int = 0):
    """`tx` on the trainable parameters, zero updates and no state for the frozen ones; a method
    whose spec has `optimizer(tx, total_steps)` (AdaLoRA's pruning) wraps `tx` first."""
    wrap = getattr(self.spec, 'optimizer', None)
    inner = wrap(tx, total_steps) if wrap is not None else tx
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, self.labels)

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen) flat {'a/b': leaf} dicts of a params tree."""
    f = flat(params)
    trainable = {k: v for k, v in f.items() if k in self.trainable}
    return trainable, {k: v for k, v in f.items() if k not in self.trainable}

  def value_and_grad(self, loss_fn: Callable[[Any], tuple[jax.Array, Any]], has_aux: bool = True):
    """Like jax.value_and_grad(loss_fn, has_aux), differentiating the trainable parameters
    only (no weight gradients of the frozen base are computed); the frozen parameters' entries of
    the returned gradient tree are zeros."""

    def value_and_grad(params):
      trainable, frozen = self.split(params)
      joined = lambda t: unflat({**frozen, **t})
      out, grads = jax.value_and_grad(lambda t: loss_fn(joined(t)), has_aux=has_aux)(trainable)
      return out, unflat({**jax.tree.map(jnp.zeros_like, frozen), **grads})

    return value_and_grad

  def keep_frozen(self, new_params, old_params):
    """`new_params` with every frozen leaf taken from `old_params` (bitwise; p + 0 would turn a
    -0.0 into +0.0)."""
    new, old = flat(new_params), flat(old_params)
    return unflat({k: v if k in self.trainable else old[k] for k, v in new.items()})

  def describe(self) -> str:
    share = self.num_trainable / max(self.num_total, 1)
    return (
      f'bigjax: peft {self.spec.describe()}: {self.num_trainable:,} trainable of '
      f'{self.num_total:,} parameters ({share:.2%})'
    )


def _count(flat_tree: dict[str, Any]) -> int:
  return int(sum(np.prod(nn.meta.unbox(v).shape) for v in flat_tree.values()))


def build(config, model: nn.Module, tx, sample: dict):
  """config.peft applied to a built model and optimizer -> (adapted model, optimizer, Plan), or
  the inputs and None when config.peft.method is ''. sample: a prepared batch of one
  (steps.sample_batch; the model is only run abstractly on it). UserError for an unknown method,
  a bad field, or config.prune / config.quantize (which act on the base weights the adapter leaves
  frozen) set as well."""
  cfg = config.peft
  if not enabled(cfg):
    return model, tx, None
  for other, on in (('prune.method', config.prune.method), ('quantize.mode', config.quantize.mode)):
    if on:
      raise UserError(
        f'config.peft.method={cfg.method!r} and config.{other}={on!r} are both set; the adapter '
        f'leaves the base weights frozen, so set config.{other}=\'\' (or run them one after '
        'the other)'
      )
  if cfg.get('quantize') and cfg.method != 'lora':
    raise UserError(
      f"config.peft.quantize={cfg.quantize!r} (QLoRA) needs config.peft.method='lora', not "
      f"{cfg.method!r}; set config.peft.quantize=''"
    )
  from bigjax import steps

  def init(m):
    return steps.apply_model(m, None, sample, train=False, init_rngs={'params': jax.random.key(0)})

  method = METHODS.get(cfg.method)
  spec = method.make_spec(cfg, dense_modules(model, init), model)
  adapted = adapt(model, spec)
  base = flat(jax.eval_shape(lambda: init(model))['params'])
  try:
    full = flat(jax.eval_shape(lambda: init(adapted))['params'])
  except ValueError as e:  # a model field the adapter does not fit (virtual tokens vs max_len)
    from bigjax import experiment

    raise experiment.model_error(model, e) from None
  # the method's new parameters (not the frozen ones it adds: QLoRA's kernel scales)
  trainable = frozenset(k for k in set(full) - set(base) if k.rsplit('/', 1)[-1] in method.PARAMS)
  if not trainable:  # e.g. prompt tuning of a model without the virtual-token hook
    raise UserError(
      f'config.peft.method={cfg.method!r} adds no parameter to config.model.name='
      f'{config.model.name!r}; use a model it applies to or another method'
    )
  trainable |= trainable_base(cfg, base)
  plan = Plan(cfg.method, spec, trainable, _count({k: full[k] for k in trainable}), _count(full))
  return adapted, plan.optimizer(tx, config.num_steps), plan


def trainable_base(cfg, base_params: dict[str, Any]) -> frozenset[str]:
  """The base parameters config.peft.trainable_base (a regex searched in their paths) selects to
  train fully beside the adapter (HF PEFT's modules_to_save: a classifier head the base does not
  have); UserError for a bad regex or one that matches nothing."""
  pattern = cfg.get('trainable_base', '')
  if not pattern:
    return frozenset()
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(
      f'config.peft.trainable_base={pattern!r} is not a regular expression ({e})'
    ) from None
  chosen = frozenset(k for k in base_params if regex.search(k))
  if not chosen:
    raise UserError(
      f'config.peft.trainable_base={pattern!r} matches no parameter; they look like '
      f'{", ".join(list(base_params)[:3])}'
    )
  return chosen


def plan_from_params(cfg, model: nn.Module, params) -> tuple[nn.Module, Plan | None]:
  """(adapted model, Plan) of a params tree that holds config.peft's adapter (a saved run), or
  (model, None) without config.peft.method (cfg None: a run from before config.peft)."""
  if not enabled(cfg):
    return model, None
  method = METHODS.get(cfg.method)
  f = flat(params)
  spec = method.spec_from_params(cfg, f)
  adapter = {k for k in f if k.rsplit('/', 1)[-1] in method.PARAMS}
  base = {k: v for k, v in f.items() if k not in adapter}
  trainable = frozenset(adapter) | trainable_base(cfg, base)
  plan = Plan(cfg.method, spec, trainable, _count({k: f[k] for k in trainable}), _count(f))
  return adapt(model, spec), plan


def merged_params(cfg, params) -> dict:
  """A saved run's params (config.peft's adapter inside) -> the base model's, adapter folded in."""
  method = METHODS.get(cfg.method)
  spec = method.spec_from_params(cfg, flat(params))
  merge = getattr(spec, 'merge', None)
  if merge is None:
    raise UserError(
      f'config.peft.method={cfg.method!r} adds computation that cannot be folded into the base '
      'weights; it has no merged form'
    )
  return unflat(merge(flat(params)))


def without_adapter(config, model: nn.Module, params) -> tuple[nn.Module, Any]:
  """(base model, params tree without config.peft's adapter parameters): what config.init_from
  fills (the adapter is never in the checkpoint a run starts from), QLoRA's quantized kernels as
  the float ones a checkpoint holds. As given without config.peft."""
  from bigjax.peft import qlora

  cfg = config.get('peft')
  if not enabled(cfg):
    return model, params
  names = METHODS.get(cfg.method).PARAMS
  kept = {k: v for k, v in flat(params).items() if k.rsplit('/', 1)[-1] not in names}
  return base_model(model), unflat(qlora.float_view(kept))
