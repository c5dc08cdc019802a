"""Putting an HF PEFT adapter onto the imported base: `config.peft.init_from=DIR` beside
`config.init_from.hf=BASE` (LoRA / DoRA here; prompt and prefix tuning in hf_virtual.py).

PEFT keeps LoRA's A (r, in) and B (out, r) in torch's nn.Linear layout whatever the base layer
(GPT-2's Conv1D included; fan_in_fan_out only changes how PEFT merges the base weight), so
bigjax's lora_a (in..., r) is A.T and lora_b (r, out...) is B.T. GPT-2's fused c_attn feeds the
query, key and value kernels: its A is every part's lora_a and B's rows split into three. A
per-layer scale (alpha_pattern, rank_pattern, use_rslora) that differs from the run's alpha / r is
folded into B. DoRA's magnitude m is stored in bigjax as the offset m - ||W_0||_c, computed from
the loaded base. Every name and shape is checked (a one-line UserError naming the file, tensor and
fix) before any tensor data is read.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError
from bigjax.peft import common, hf_names
from bigjax.peft.hf_directory import PREFIX, Adapter, read, settings

SUFFIXES = {
  'lora_a': '.lora_A.weight',
  'lora_b': '.lora_B.weight',
  'magnitude': '.lora_magnitude_vector',
  # A copy of the base layer's weight, which PEFT saves for vocabulary-sized layers (an adapted
  # lm_head: save_embedding_layers) and loads over the base's: checked equal to the base's.
  'base_weight': '.base_layer.weight',
}


def lora_modules(adapter: Adapter) -> dict[str, dict[str, str]]:
  """{HF module name ('model.layers.0.self_attn.q_proj'): {'lora_a' | 'lora_b' | 'magnitude' |
  'base_weight': tensor name}} of a LoRA adapter; UserError for a tensor that is none of them (a
  LoRA embedding, a bias, a modules_to_save copy)."""
  out: dict[str, dict[str, str]] = {}
  for name in adapter.shapes:
    kind = next((k for k, s in SUFFIXES.items() if name.endswith(s)), None)
    if kind is None:
      raise UserError(
        f'{adapter.weights_file}: tensor {PREFIX + name!r} is not the lora_A / lora_B weight or '
        'DoRA magnitude of a linear layer; bigjax imports LoRA adapters of linear layers only'
      )
    out.setdefault(name[: -len(SUFFIXES[kind])], {})[kind] = name
  return out


def _full_names(adapter: Adapter, model, modules) -> dict[str, dict[str, str]]:
  """lora_modules by full HF module name: an adapter of the headless base model ('layers.0...')
  gets the family's prefix ('model.layers.0...'); names the base does not have stay as saved."""
  base = common.base_model(model)
  prefix = hf_names.family(base).mapping(base).prefix
  full = lambda name: prefix + name if name not in modules and prefix + name in modules else name
  return {full(name): tensors for name, tensors in lora_modules(adapter).items()}


def _matched(adapter: Adapter, model) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
  """{full HF module name: (its adapter tensors, bigjax module paths)} of every module the
  adapter adapts; UserError for a module the base model does not have, or a tied output layer."""
  what = f'config.peft.init_from={adapter.directory!r}'
  modules = hf_names.hf_modules(model, what)
  found = {}
  for full, tensors in _full_names(adapter, model, modules).items():
    if full not in modules:
      if hf_names.tied_output(model, full, what):
        raise UserError(
          f'{adapter.weights_file} adapts {full!r}, which config.init_from.hf ties to its token '
          'embedding (tie_word_embeddings): bigjax computes that head as the embedding\'s '
          f'transpose, which LoRA does not adapt; save the adapter without {full!r} in '
          'target_modules'
        )
      raise UserError(
        f'{adapter.weights_file}: {PREFIX + full + SUFFIXES["lora_a"]!r} adapts {full!r}, a '
        'linear layer the base model (config.init_from.hf) does not have (they look like '
        f'{next(iter(modules))!r}); the adapter is for another base model'
      )
    missing = [k for k in ('lora_a', 'lora_b') if k not in tensors]
    if missing or ('magnitude' in tensors) != bool(adapter.config.get('use_dora')):
      raise UserError(
        f'{adapter.weights_file}: module {full!r} has tensors {sorted(tensors.values())}; a LoRA '
        'adapter needs lora_A and lora_B (and lora_magnitude_vector exactly when use_dora)'
      )
    found[full] = (tensors, modules[full])
  if not found:
    raise UserError(f'{adapter.weights_file} holds no LoRA tensors; give a saved LoRA adapter')
  return found


def _pattern_value(pattern: dict | None, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
  for key, value in (pattern or {}).items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def spec(cfg, dense: dict[str, str], model):
  """The lora.Spec of config.peft.init_from: its settings, the bigjax modules its tensors adapt,
  each module's rank from its lora_A."""
  from bigjax.peft import lora

  cfg = settings(cfg)
  adapter = read(cfg.init_from)
  ranks: dict[str, int] = {}
  for tensors, parts in _matched(adapter, model).values():
    for part in parts:
      module = hf_names.model_module(part, dense)
      if module is None:
        raise UserError(
          f'{adapter.weights_file}: the model has no Dense layer {part}; the adapter is for '
          'another base model'
        )
      rank = adapter.shapes[tensors['lora_a']][0]
      if ranks.setdefault(module, rank) != rank:
        raise UserError(
          f'{adapter.weights_file}: the layers of scanned {module} have different ranks; set '
          'config.model.kwargs.scan=False'
        )
  overrides = tuple(sorted((m, r) for m, r in ranks.items() if r != cfg.rank))
  return lora.Spec(frozenset(ranks), cfg.rank, cfg.alpha, cfg.dropout, cfg.dora, overrides)


# ----------------------------------------------------------------------------------------------
# Checks against the base
# ----------------------------------------------------------------------------------------------
def check_base(adapter: Adapter, base_dir: str) -> None:
  """UserError when adapter_config.json names a base of another family or architecture than
  config.init_from.hf (the tensor names and shapes are checked as well, when they are read)."""
  from bigjax.models import hf
  from bigjax.models.hf import safetensors_io

  ours = safetensors_io.read_config(base_dir)
  kind = str(ours.get('model_type', '')).replace('_', '').lower()
  cls = (adapter.config.get('auto_mapping') or {}).get('base_model_class') or ''
  stem = re.sub(r'(For[A-Za-z]+|LMHeadModel|Model)$', '', cls).lower()
  if stem and kind and stem != kind:
    raise UserError(
      f'{adapter.config_file}: the adapter was made for a {cls} base but config.init_from.hf='
      f'{base_dir!r} is a {ours.get("model_type")!r} model; give the adapter\'s base model'
    )
  named = adapter.config.get('base_model_name_or_path') or ''
  named_config = os.path.join(os.path.expanduser(named), safetensors_io.CONFIG) if named else ''
  if named_config and os.path.exists(named_config):
    theirs = safetensors_io.read_config(os.path.dirname(named_config), f'{adapter.config_file}')
    family = hf.family_of(ours, base_dir)
    try:
      same = family.architecture(theirs) == family.architecture(ours)
    except UserError:  # another family, or one bigjax does not reproduce
      same = False
    if not same:
      raise UserError(
        f'{adapter.config_file}: base_model_name_or_path={named!r} is another architecture than '
        f'config.init_from.hf={base_dir!r}; give the adapter\'s base model'
      )


def _check_base_copies(adapter: Adapter, model, base_dir: str) -> None:
  """UserError unless every base-layer copy the adapter carries equals the base's weight (a tied
  output layer, which has no weight of its own in the base, is refused before: _matched)."""
  from bigjax.models.hf import safetensors_io

  what = f'config.peft.init_from={adapter.directory!r}'
  modules = hf_names.hf_modules(model, what)
  copies = {
    full: t['base_weight']
    for full, t in _full_names(adapter, model, modules).items()
    if 'base_weight' in t
  }
  if not copies:
    return
  source = safetensors_io.SafetensorsSource(base_dir, '')
  for full, name in copies.items():
    theirs, weight = adapter.read(name), full + '.weight'
    ours = source.read(weight) if weight in source.names() else None
    if ours is None or ours.shape != theirs.shape or not np.array_equal(ours, theirs):
      raise UserError(
        f'{adapter.weights_file}: {PREFIX + name!r} (the weight of the layer the adapter was '
        f'made on) differs from {weight} of config.init_from.hf={base_dir!r}; the adapter '
        'is for another base model'
      )


# ----------------------------------------------------------------------------------------------
# Import: the adapter's tensors into the (sharded) params
# ----------------------------------------------------------------------------------------------
def loader(config, model, abstract_params) -> Callable[[Any], Any] | None:
  """The function that puts config.peft.init_from's tensors into a params tree whose base is
  loaded already (None without it). abstract_params: the adapted model's params (arrays or
  ShapeDtypeStructs). UserError (naming the file and tensor) for shapes another base would have,
  before anything is read."""
  cfg = config.get('peft')
  if not (common.enabled(cfg) and cfg.get('init_from')):
    return None
  cfg = settings(cfg)
  adapter = read(cfg.init_from)
  check_base(adapter, config.init_from.hf)
  if adapter.method != 'lora':
    from bigjax.peft import hf_virtual

    loaders = hf_virtual.loaders(adapter, abstract_params)
    return lambda params: _put(params, loaders)
  _check_base_copies(adapter, model, config.init_from.hf)
  return _lora_loader(cfg, adapter, _matched(adapter, model), abstract_params)


def _lora_loader(cfg, adapter: Adapter, matched, abstract_params) -> Callable[[Any], Any]:
  from bigjax.models.hf import convert

  shapes = convert.flat_shapes(abstract_params)
  per_layer = convert.unscanned_shapes(shapes)
  scale = cfg.alpha / cfg.rank
  loaders: dict[str, Callable[[], np.ndarray]] = {}
  for full, (tensors, parts) in matched.items():
    a_shape, b_shape = adapter.shapes[tensors['lora_a']], adapter.shapes[tensors['lora_b']]
    r = a_shape[0]
    alpha = _pattern_value(adapter.config.get('alpha_pattern'), full, cfg.alpha)
    theirs = alpha / (math.sqrt(r) if adapter.config.get('use_rslora') else r)
    for i, part in enumerate(parts):
      want_a = per_layer[f'{part}/lora_a'][2]
      want_b = per_layer[f'{part}/lora_b'][2]
      n_in, n_out = math.prod(want_a[:-1]), math.prod(want_b[1:])
      want = {'lora_a': (r, n_in), 'lora_b': (len(parts) * n_out, r)}
      for kind, got in (('lora_a', a_shape), ('lora_b', b_shape)):
        if tuple(got) != want[kind]:
          raise UserError(
            f'{adapter.weights_file}: {PREFIX + tensors[kind]!r} has shape {tuple(got)} but the '
            f'base model (config.init_from.hf) needs {want[kind]}; the adapter is for another base'
          )
      rows = slice(i * n_out, (i + 1) * n_out)
      loaders[f'{part}/lora_a'] = reader(adapter, tensors['lora_a'], lambda a: a.T, want_a)
      loaders[f'{part}/lora_b'] = reader(
        adapter,
        tensors['lora_b'],
        lambda b, rows=rows, k=theirs / scale: _times(b[rows].T, k),
        want_b,
      )
      if cfg.dora:
        loaders[f'{part}/magnitude_offset'] = reader(
          adapter, tensors['magnitude'], lambda m, rows=rows: m[rows], want_b[1:]
        )
  by_path = stack_layers(loaders, per_layer, shapes, adapter)

  def put(params):
    flat = common.flat(params)
    loaded = _build(by_path, flat)
    for path in [p for p in loaded if p.endswith('/magnitude_offset')]:
      module = path.rsplit('/', 1)[0]
      lead = 1 if '/layers/' in f'/{module}/' else 0
      n_in = flat[f'{module}/lora_a'].ndim - 1 - lead
      loaded[path] = _offset(flat[f'{module}/kernel'], loaded[path], lead, n_in)
    return common.unflat({**flat, **loaded})

  return put


def _put(params, loaders: dict[str, Callable[[], np.ndarray]]):
  flat = common.flat(params)
  return common.unflat({**flat, **_build(loaders, flat)})


def _times(x: np.ndarray, k: float) -> np.ndarray:
  return x if k == 1.0 else x * np.float32(k)


def reader(adapter: Adapter, name: str, fn, shape) -> Callable[[], np.ndarray]:
  """A loader: the adapter's tensor `name` through fn, reshaped to `shape`, float32."""
  return lambda: np.ascontiguousarray(fn(adapter.read(name)).reshape(shape), np.float32)


def stack_layers(loaders, per_layer, shapes, adapter) -> dict[str, Callable[[], np.ndarray]]:
  """{model param path: loader}: per-layer loaders, stacked for a scanned stack (which must be
  adapted in every layer)."""
  out: dict[str, Callable[[], np.ndarray]] = {}
  layered: dict[str, dict[int, Callable[[], np.ndarray]]] = {}
  for param, fn in loaders.items():
    path, index, _ = per_layer[param]
    if index < 0:
      out[path] = fn
    else:
      layered.setdefault(path, {})[index] = fn
  for path, fns in layered.items():
    if len(fns) != shapes[path][0]:
      raise UserError(
        f'{adapter.weights_file} adapts {path.rsplit("/", 2)[-2]} in {len(fns)} of the '
        f'{shapes[path][0]} layers of a scanned stack; set config.model.kwargs.scan=False'
      )
    out[path] = functools.partial(_stacked, [fns[i] for i in range(len(fns))])
  return out


def _stacked(loaders: list[Callable[[], np.ndarray]]) -> np.ndarray:
  return np.stack([load() for load in loaders])


def _build(loaders, flat: dict[str, Any]) -> dict[str, jax.Array]:
  from bigjax.models.hf import safetensors_io

  abstract = {k: flat[k] for k in loaders}
  shardings = {k: flat[k].sharding for k in loaders}
  return safetensors_io.load_sharded(loaders, abstract, shardings)


def column_norms(kernel, lead: int, n_in: int):
  """||W||_c: the L2 norm over a kernel's input axes (after `lead` leading layer axes) of each
  output unit -> (lead..., out...)."""
  axes = tuple(range(lead, lead + n_in))
  return jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel, jnp.float32)), axis=axes))


def _offset(kernel, magnitude, lead: int, n_in: int):
  """DoRA's m -> bigjax's magnitude_offset m - ||W_0||_c, sharded like m."""
  fn = lambda k, m: (m - column_norms(k, lead, n_in)).astype(m.dtype)
  return jax.jit(fn, out_shardings=magnitude.sharding)(kernel, magnitude)
