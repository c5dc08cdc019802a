"""Start a run from another run's parameters or a HuggingFace checkpoint (pretrain -> fine-tune).

config.init_from.checkpoint: a workdir (its checkpoints/ is used) or a checkpoints directory; its
newest step is read. config.init_from.hf: a HuggingFace save_pretrained directory (config.json +
model.safetensors or a sharded model.safetensors.index.json) of a GPT-2, BERT or Llama-family
model; its config.json states the model's architecture (`hf_architecture`, merged into the model
kwargs by `experiment.make_model`) and its tensors are read with safetensors straight into the
parameters' shardings (`hf_params`). config.init_from.load: comma-separated regular expressions
over parameter paths ('stack/layer_0/mlp/wi/kernel'); matching parameters are copied, the rest
(new heads) keep their fresh initialisation. Applied only when a run starts; a resumed run restores
its own checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import re
from types import ModuleType
from typing import Any

import flax
import jax
import numpy as np

from bigjax import checkpoint
from bigjax.errors import UserError


def checkpoint_dir(path):
  """The checkpoints directory named by config.init_from.checkpoint; UserError if it has none."""
  path = os.path.expanduser(path)
  for candidate in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
      return candidate
  raise UserError(
    f'config.init_from.checkpoint={path!r} holds no checkpoint; give a workdir of a '
    'finished run (or its checkpoints/ directory)'
  )


def load_matching(params, path, load):
  """Reads the checkpoint at `path` and returns {'a/b/c': numpy array} for every leaf of `params`
  (arrays or ShapeDtypeStructs) whose path matches a regex in `load`. Raises UserError for missing
  leaves, shape mismatches, or patterns that match nothing -- call it before writing anything."""
  _, source = checkpoint.load_latest(checkpoint_dir(path))
  source = flax.traverse_util.flatten_dict(source['params'], sep='/')
  patterns = [re.compile(p.strip()) for p in load.split(',') if p.strip()]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  chosen, used = {}, set()
  for name, value in flat.items():
    hits = [p for p in patterns if p.search(name)]
    if not hits:
      continue
    used.update(p.pattern for p in hits)
    if name not in source:
      raise UserError(
        f'config.init_from: parameter {name} matches {hits[0].pattern!r} but the '
        f'checkpoint in {path} has no such parameter; narrow config.init_from.load'
      )
    if source[name].shape != value.shape:
      raise UserError(
        f'config.init_from: parameter {name} has shape {value.shape} here but '
        f'{source[name].shape} in {path}; the model configs differ'
      )
    chosen[name] = np.asarray(source[name], value.dtype)
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    raise UserError(
      f'config.init_from.load pattern(s) {unused} match no parameter; parameters '
      f'look like {next(iter(flat))}'
    )
  return chosen


def merge(params, chosen):
  """`params` with the leaves named in `chosen` (from load_matching) replaced, keeping shardings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  for name, value in chosen.items():
    flat[name] = jax.device_put(value, flat[name].sharding)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------------------------
# HuggingFace checkpoints (config.init_from.hf)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
  """The model kwargs a pretrained checkpoint states. kwargs: {field: value}; where: the file
  that states them; hf_names: {field: the HF config.json field}, for messages."""

  kwargs: dict[str, Any]
  where: str
  hf_names: dict[str, str]

  def name_of(self, field: str) -> str:
    return self.hf_names.get(field, field)


def hf_family(config) -> tuple[ModuleType, dict] | None:
  """(family module, config.json dict) of config.init_from.hf, or None when it is unset.
  UserError if the directory is not an HF checkpoint, its model_type is unsupported, or
  config.model.name is not that family's model."""
  from bigjax.models import hf
  from bigjax.models.hf import safetensors_io

  directory = config.init_from.hf
  if not directory:
    return None
  hf_config = safetensors_io.read_config(directory)
  family = hf.family_of(hf_config, os.path.join(directory, safetensors_io.CONFIG))
  if config.model.name != family.MODEL:
    raise UserError(
      f'config.init_from.hf={directory!r} holds a {hf_config.get("model_type")!r} checkpoint, '
      f'a bigjax {family.MODEL!r} model, but config.model.name={config.model.name!r}; set '
      f'config.model.name={family.MODEL!r}'
    )
  return family, hf_config


def hf_architecture(config) -> Architecture | None:
  """The model kwargs config.init_from.hf's config.json states (None without init_from.hf);
  UserError for a checkpoint bigjax cannot reproduce (naming the HF field)."""
  found = hf_family(config)
  if found is None:
    return None
  family, hf_config = found
  where = os.path.join(config.init_from.hf, 'config.json')
  try:
    kwargs = family.architecture(hf_config)
  except UserError as e:
    raise UserError(f'{where}: {e}') from None
  return Architecture(kwargs, where, dict(family.HF_NAMES))


def hf_params(
  directory: str, model: Any, abstract_params: Any, shardings: Any, load: str = '.*'
) -> tuple[dict[str, jax.Array], list[str]]:
  """Reads the HF checkpoint in `directory` into `model`'s parameters, each built straight into
  its sharding (every device receives only its slice; see safetensors_io.load_sharded).

  abstract_params / shardings: the model's params tree (ShapeDtypeStructs or arrays) and the
  matching tree of NamedShardings. load: the config.init_from.load regexes selecting which of the
  checkpoint's parameters are used. Returns ({'a/b/c': jax.Array} of the loaded parameters, the
  paths the checkpoint does not provide, which keep their initialisation). Checks every name and
  shape (UserError naming the tensor, its file and the fix) before reading any tensor data.
  """
  loaders, fresh = hf_plan(directory, model, abstract_params, load)
  return _build_sharded(loaders, abstract_params, shardings), fresh


def hf_plan(
  directory: str, model: Any, abstract_params: Any, load: str = '.*'
) -> tuple[dict[str, Callable[[], np.ndarray]], list[str]]:
  """({path: loader} of the checkpoint's parameters selected by `load`, params it leaves fresh):
  the checks of `hf_params`, without reading tensor data (but tied output layers)."""
  from bigjax.models import hf
  from bigjax.models.hf import convert, safetensors_io

  what = f'config.init_from.hf={directory!r}'
  hf_config = safetensors_io.read_config(directory)
  family = hf.family_of(hf_config, os.path.join(directory, safetensors_io.CONFIG))
  mapping = family.mapping(model, what)
  source = safetensors_io.SafetensorsSource(directory, mapping.prefix)
  plan = convert.plan(source, mapping, convert.flat_shapes(abstract_params), what)
  patterns = [re.compile(p.strip()) for p in load.split(',') if p.strip()]
  chosen = {k: f for k, f in plan.loaders.items() if any(p.search(k) for p in patterns)}
  used = {p.pattern for p in patterns for k in plan.loaders if p.search(k)}
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    raise UserError(
      f'config.init_from.load pattern(s) {unused} match no parameter of {directory}; '
      f'parameters look like {next(iter(plan.loaders))}'
    )
  return chosen, plan.fresh + sorted(set(plan.loaders) - set(chosen))


def _build_sharded(loaders, abstract_params, shardings) -> dict[str, jax.Array]:
  from bigjax.models.hf import safetensors_io

  flat = lambda tree: flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
  return safetensors_io.load_sharded(loaders, flat(abstract_params), flat(shardings))


# ----------------------------------------------------------------------------------------------
# Either source, as bigjax.train uses it
# ----------------------------------------------------------------------------------------------
def prepare(config, model: Any, abstract_params: Any) -> Callable[[Any], Any] | None:
  """Reads and checks config.init_from before anything is written; returns the function that
  puts the chosen parameters into a freshly initialised (sharded) params tree, or None when the
  run starts from scratch. With config.peft the base is loaded; the adapter keeps its init, or
  (config.peft.init_from) is read from a PEFT adapter directory after the base."""
  from bigjax.peft import hf_import

  base = _prepare_base(config, model, abstract_params)
  adapter = hf_import.loader(config, model, abstract_params)
  if adapter is None or base is None:
    return base
  return lambda params: adapter(base(params))


def _prepare_base(config, model: Any, abstract_params: Any) -> Callable[[Any], Any] | None:
  from bigjax import peft
  from bigjax.peft import qlora

  adapted = peft.common.flat(abstract_params)  # QLoRA: float tensors are quantized as read
  model, abstract_params = peft.common.without_adapter(config, model, abstract_params)
  init = config.init_from
  if init.checkpoint:
    chosen = load_matching(abstract_params, init.checkpoint, init.load)
    chosen = qlora.quantize_arrays(adapted, chosen)
    return lambda params: merge(params, chosen)
  if init.hf:
    loaders, _ = hf_plan(init.hf, model, abstract_params, init.load)
    loaders = qlora.quantize_loaders(adapted, loaders)

    def put(params):
      shardings = jax.tree.map(lambda x: x.sharding, params)
      flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
      flat.update(_build_sharded(loaders, params, shardings))
      return flax.traverse_util.unflatten_dict(flat, sep='/')

    return put
  return None
