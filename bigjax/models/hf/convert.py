"""The HuggingFace <-> bigjax parameter mapping every family shares, in both directions.

A family module (`hf.gpt2`, `hf.bert`, `hf.llama`) describes its checkpoints once, as a `Mapping`:
a list of `Rule`s, each tying one HuggingFace tensor to one or more bigjax parameters, with the
function that turns the tensor into the parameters (import) and the one that turns them back
(export). Everything else is generic and lives here:

- `Source`: where HF tensors come from, read one at a time: `StateDictSource` (a PyTorch state dict
  or a dict of arrays; `hf.safetensors_io.SafetensorsSource` reads a `save_pretrained` directory).
- `plan(source, mapping, target)`: checks names and shapes against the model's parameter tree
  WITHOUT reading tensor data, and returns one loader per parameter (`() -> numpy array`), so a
  caller can build each parameter straight into its sharding (`safetensors_io.load_sharded`) or
  all at once on the host (`load_all`).
- `to_hf(params, mapping)`: bigjax parameters -> {HF name: array} for export.

Parameter paths are '/'-joined ('stack/layer_0/self_attention/query/kernel'); rules name the
unscanned per-layer paths and `plan` / `to_hf` stack or unstack them for models built with
scan=True ('stack/layers/...', a leading layer axis). Nothing here imports torch or transformers:
state-dict values may be torch tensors (any float dtype, any device), numpy or jax arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Mapping as MappingType
import dataclasses
import functools
import re
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError

Shape = tuple[int, ...]


def hf_field(hf_config, name, default=None):
  """`hf_config.<name>` of a transformers PretrainedConfig, or `hf_config[name]` of a dict."""
  if isinstance(hf_config, dict):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def model_kwargs(config, what):
  """A plain dict from a model-kwargs dict or ConfigDict; anything else -> UserError."""
  if hasattr(config, 'to_dict'):
    return dict(config.to_dict())
  if isinstance(config, dict):
    return dict(config)
  raise UserError(
    f'{what}: config must be the kwargs dict (or ConfigDict) that config_from_hf '
    f'returns, got {type(config).__name__}; pass config_from_hf(hf_model.config)'
  )


def build(model_cls, kwargs, what):
  """model_cls(**kwargs); unknown fields -> UserError."""
  try:
    return model_cls(**kwargs)
  except TypeError as e:
    raise UserError(
      f'{what}: config does not fit {model_cls.__module__}.Model ({e}); start from '
      'config_from_hf(hf_model.config)'
    ) from None


def require(model, fixed, what):
  """UserError unless every field in `fixed` ({name: value}) of `model` has that value."""
  for name, want in fixed.items():
    got = getattr(model, name)
    if got != want:
      raise UserError(
        f'{what}: config field {name}={got!r} does not match HuggingFace weights, '
        f'which need {name}={want!r}; start from config_from_hf(hf_model.config)'
      )


def to_numpy(value):
  """float32 numpy array from a torch tensor (numpy() cannot read bfloat16), numpy or jax array."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


# ----------------------------------------------------------------------------------------------
# Rules: one HF tensor <-> bigjax parameters.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  """One HuggingFace tensor and the bigjax parameters made from it.

  names: the tensor's name without the family prefix, then aliases accepted on import (original
  BERT conversions' gamma/beta). hf_shape: its shape. params: bigjax (unscanned) paths.
  to_params: hf array -> one array per param, in any shape of the param's size (the caller
  reshapes). to_hf: the params' arrays (their own shapes) -> the hf array. group: '' for tensors
  every checkpoint of the family has; else the optional part it belongs to ('MLM head'), loaded
  when the checkpoint has it and otherwise left to the model's fresh initialisation.
  """

  names: tuple[str, ...]
  hf_shape: Shape
  params: tuple[str, ...]
  to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  group: str = ''

  @property
  def name(self) -> str:
    return self.names[0]


def _names(name: str | Iterable[str]) -> tuple[str, ...]:
  return (name,) if isinstance(name, str) else tuple(name)


def copy(name, shape: Shape, param: str, group: str = '') -> Rule:
  """The tensor is the parameter (reshaped: a bias (N*H,) is the (N, H) param)."""
  shape = tuple(shape)
  return Rule(_names(name), shape, (param,), lambda a: (a,), lambda p: p.reshape(shape), group)


def linear(name, shape: Shape, param: str, group: str = '') -> Rule:
  """A torch nn.Linear weight (out, in) (y = x @ W.T): the kernel is W.T, reshaped to the param's
  shape ((in, out), or e.g. (D, N, H) for a query projection, (N, H, D) for an output one)."""
  out_features, in_features = shape
  return Rule(
    _names(name),
    (out_features, in_features),
    (param,),
    lambda w: (w.T,),
    lambda k: k.reshape(in_features, out_features).T,
    group,
  )


def split(name, shape: Shape, params: tuple[str, ...], axis: int, group: str = '') -> Rule:
  """The tensor is len(params) equal parts along `axis`, one per param (GPT-2's fused c_attn:
  [query | key | value] columns)."""
  shape, n = tuple(shape), len(params)
  part = list(shape)
  part[axis] //= n
  return Rule(
    _names(name),
    shape,
    tuple(params),
    lambda a: tuple(np.split(a, n, axis=axis)),
    lambda *ps: np.concatenate([p.reshape(part) for p in ps], axis=axis),
    group,
  )


@dataclasses.dataclass(frozen=True)
class Mapping:
  """A family's checkpoint layout for one model configuration.

  prefix: the base model's name prefix ('transformer.', 'bert.', 'model.'); names are matched with
  or without it, and export writes it to every name not starting with one of `unprefixed`
  ('lm_head.', 'cls.'). tied: (HF name, param) pairs of output layers that equal a parameter (tied
  embeddings): checked equal on import when present, not written on export (transformers ties them).
  fresh: regexes of the parameters no checkpoint of the family has (a bigjax classifier head):
  they keep the model's initialisation.
  """

  prefix: str
  rules: list[Rule]
  unprefixed: tuple[str, ...] = ()
  tied: tuple[tuple[str, str], ...] = ()
  fresh: tuple[str, ...] = ()

  def export_name(self, name: str) -> str:
    return name if name.startswith(self.unprefixed) else self.prefix + name


# ----------------------------------------------------------------------------------------------
# Sources of HF tensors.
# ----------------------------------------------------------------------------------------------
class Source(Protocol):
  """HF tensors by name (the family prefix stripped), read one at a time."""

  where: str  # what messages call it: 'state dict', '/path/model.safetensors'

  def names(self) -> set[str]: ...

  def shape(self, name: str) -> Shape: ...

  def read(self, name: str) -> np.ndarray:
    """(shape(name)) float32 host array."""
    ...

  def file_of(self, name: str) -> str:
    """Where the tensor lives, for messages."""
    ...


def strip_prefix(names: Iterable[str], prefix: str) -> dict[str, str]:
  """{name without prefix: stored name}: 'transformer.h.0.ln_1.weight' and 'h.0.ln_1.weight' are
  both found as 'h.0.ln_1.weight'; names outside the prefix ('lm_head.weight') are kept."""
  return {(n[len(prefix) :] if prefix and n.startswith(prefix) else n): n for n in names}


class StateDictSource:
  """A HuggingFace PyTorch state dict (or {name: numpy / jax array}) as a `Source`."""

  def __init__(self, state_dict: Any, prefix: str, what: str):
    if not hasattr(state_dict, 'items'):
      raise UserError(
        f'{what}: state_dict must map parameter names to arrays (e.g. '
        f'hf_model.state_dict()), got {type(state_dict).__name__}'
      )
    self._stored = strip_prefix(state_dict.keys(), prefix)
    self._values = state_dict
    self.where = 'state dict'
    self.prefix = prefix

  def names(self) -> set[str]:
    return set(self._stored)

  def shape(self, name: str) -> Shape:
    return tuple(self._values[self._stored[name]].shape)

  def read(self, name: str) -> np.ndarray:
    return to_numpy(self._values[self._stored[name]])

  def file_of(self, name: str) -> str:
    return 'state dict'


class _LastTensor:
  """Remembers the last tensor read: a fused tensor feeds several parameters in a row."""

  def __init__(self, source: Source):
    self.source = source
    self._name: str | None = None
    self._value: np.ndarray | None = None

  def read(self, name: str) -> np.ndarray:
    if name != self._name:
      self._name, self._value = name, self.source.read(name)
    assert self._value is not None
    return self._value


# ----------------------------------------------------------------------------------------------
# Import: a plan of per-parameter loaders.
# ----------------------------------------------------------------------------------------------
_SCANNED = re.compile(r'(^|/)layers/')


def unscanned_shapes(target: MappingType[str, Shape]) -> dict[str, tuple[str, int, Shape]]:
  """{per-layer path: (model path, layer index or -1, per-layer shape)} of a flat {path: shape}
  parameter tree; scanned params 'stack/layers/X' (L, ...) give 'stack/layer_i/X' for each i."""
  out = {}
  for path, shape in target.items():
    if _SCANNED.search(path):
      for i in range(shape[0]):
        out[_SCANNED.sub(rf'\1layer_{i}/', path, count=1)] = (path, i, tuple(shape[1:]))
    else:
      out[path] = (path, -1, tuple(shape))
  return out


@dataclasses.dataclass
class Plan:
  """What `plan` found: loaders {model param path: () -> float32 host array of its shape}, the
  optional groups the checkpoint lacks, and the params it leaves to the model's initialisation
  (those of absent groups and `Mapping.fresh`)."""

  loaders: dict[str, Callable[[], np.ndarray]]
  absent_groups: list[str]
  fresh: list[str]


def _tensor_name(source: Source, rule: Rule) -> str | None:
  names = source.names()
  return next((n for n in rule.names if n in names), None)


def plan(source: Source, mapping: Mapping, target: MappingType[str, Shape], what: str) -> Plan:
  """Checks `source` against `mapping` and the model's flat parameter shapes `target` ({path:
  shape}, scanned or not) and returns the loaders; reads no tensor data except tied outputs.

  UserError (naming the tensor, its file and the fix) for a missing tensor of a required rule or of
  a partly present optional group, a tensor of the wrong shape, a tied output that differs from
  its parameter, and a parameter the mapping does not cover (a config the converter cannot fill).
  """
  per_layer = unscanned_shapes(target)
  cached = _LastTensor(source)
  present: dict[str, list[bool]] = {}
  for rule in mapping.rules:
    present.setdefault(rule.group, []).append(_tensor_name(source, rule) is not None)
  absent = [g for g, hits in present.items() if g and not any(hits)]
  single: dict[str, Callable[[], np.ndarray]] = {}
  for rule in mapping.rules:
    if rule.group in absent:
      continue
    name = _tensor_name(source, rule)
    if name is None:
      raise UserError(
        f'{what}: {source.where} has no tensor {rule.name!r} (looked with and without the '
        f'{mapping.prefix!r} prefix); give the complete checkpoint of this architecture'
      )
    if source.shape(name) != rule.hf_shape:
      raise UserError(
        f'{what}: {source.file_of(name)} entry {name!r} has shape {source.shape(name)} but the '
        f'config expects {rule.hf_shape}; build the config from this checkpoint\'s config.json '
        '(config_from_hf) instead of restating it'
      )
    for i, param in enumerate(rule.params):
      if param not in per_layer:
        raise UserError(
          f'{what}: the model this config builds has no parameter {param} for HF tensor '
          f'{name!r}; start from config_from_hf(hf_config)'
        )
      shape = per_layer[param][2]
      single[param] = _loader(cached, rule, name, i, shape, what)
  for hf_name, param in mapping.tied:
    if hf_name in source.names() and param in single:
      out, emb = source.read(hf_name), single[param]()
      if out.shape != emb.shape or not np.array_equal(out, emb):
        raise UserError(
          f'{what}: {hf_name!r} in {source.file_of(hf_name)} differs from the token embedding '
          '(an untied output layer) but this config ties them; this checkpoint cannot be '
          'converted with a tied head'
        )
  fresh_res = [re.compile(p) for p in mapping.fresh]
  absent_params = {p for r in mapping.rules if r.group in absent for p in r.params}
  fresh = sorted(
    p
    for p in per_layer
    if p not in single and (p in absent_params or any(r.search(p) for r in fresh_res))
  )
  uncovered = sorted(set(per_layer) - set(single) - set(fresh))
  if uncovered:
    raise UserError(
      f'{what}: no HF tensor fills the parameters {uncovered[:4]} of the model this config '
      'builds; start from config_from_hf(hf_config)'
    )
  loaders: dict[str, Callable[[], np.ndarray]] = {}
  layered: dict[str, dict[int, Callable[[], np.ndarray]]] = {}
  for param, fn in single.items():
    path, index, _ = per_layer[param]
    if index < 0:
      loaders[path] = fn
    else:
      layered.setdefault(path, {})[index] = fn
  for path, fns in layered.items():
    if len(fns) != target[path][0]:  # part of a scanned param's layers from an absent group
      continue
    loaders[path] = functools.partial(_stacked, [fns[i] for i in range(len(fns))])
  return Plan(loaders, absent, sorted({per_layer[p][0] for p in fresh}))


def _stacked(per_layer: list[Callable[[], np.ndarray]]) -> np.ndarray:
  return np.stack([load() for load in per_layer])


def _loader(cached: _LastTensor, rule: Rule, name: str, i: int, shape: Shape, what: str):
  def load() -> np.ndarray:
    value = np.asarray(rule.to_params(cached.read(name))[i], np.float32)
    if value.size != int(np.prod(shape)):
      raise UserError(f'{what}: {name!r} does not convert to shape {shape}; a converter bug')
    return np.ascontiguousarray(value.reshape(shape))

  return load


def load_all(source: Source, mapping: Mapping, target: MappingType[str, Shape], what: str):
  """(flat {path: float32 numpy array} of the params the source fills, the Plan) on the host."""
  p = plan(source, mapping, target, what)
  return {path: fn() for path, fn in p.loaders.items()}, p


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------
def to_hf(params: Any, mapping: Mapping, what: str = 'export') -> dict[str, np.ndarray]:
  """bigjax params (a nested tree, scanned or not) -> {full HF name: float32 array} for every rule
  (tied outputs are not written). UserError naming a parameter a rule needs that `params` lacks."""
  flat = {
    k: np.asarray(v, np.float32)
    for k, v in flax.traverse_util.flatten_dict(params, sep='/').items()
  }
  per_layer = {}
  for path, value in flat.items():
    if _SCANNED.search(path):
      for i in range(value.shape[0]):
        per_layer[_SCANNED.sub(rf'\1layer_{i}/', path, count=1)] = value[i]
    else:
      per_layer[path] = value
  out = {}
  for rule in mapping.rules:
    missing = [p for p in rule.params if p not in per_layer]
    if missing:
      raise UserError(
        f'{what}: the parameters have no {missing[0]} (needed for HF tensor {rule.name!r}); '
        'export a run of this model family'
      )
    value = np.asarray(rule.to_hf(*(per_layer[p] for p in rule.params)), np.float32)
    if value.shape != rule.hf_shape:
      raise UserError(f'{what}: {rule.name!r} came out {value.shape}, not {rule.hf_shape}')
    out[mapping.export_name(rule.name)] = np.ascontiguousarray(value)
  return out


# ----------------------------------------------------------------------------------------------
# The model's side.
# ----------------------------------------------------------------------------------------------
def abstract_params(model, seq_len):
  """Unboxed ShapeDtypeStruct tree of model.init(...)['params']; nothing is computed."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))['params']


def flat_shapes(tree: Any) -> dict[str, Shape]:
  """{'a/b': shape} of a nested tree of arrays or ShapeDtypeStructs."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_tree(params, target, what):
  """params as contiguous float32 numpy arrays, after checking it has exactly target's paths and
  shapes (a converter bug or a config the converter does not cover) -> UserError otherwise."""
  got = flax.traverse_util.flatten_dict(params, sep='/')
  want = flax.traverse_util.flatten_dict(target, sep='/')
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = [
    f'{k} {got[k].shape} vs {want[k].shape}'
    for k in sorted(want)
    if k in got and got[k].shape != want[k].shape
  ]
  if missing or extra or bad:
    raise UserError(
      f'{what}: the converted parameters do not fit the model this config builds '
      f'(missing {missing[:4]}, unexpected {extra[:4]}, shapes {bad[:4]}); start '
      'from config_from_hf(hf_model.config)'
    )
  return flax.traverse_util.unflatten_dict(
    {k: np.ascontiguousarray(v, np.float32) for k, v in got.items()}, sep='/'
  )
