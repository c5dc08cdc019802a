"""HF PEFT LoRA adapters in and out: `config.peft.init_from=DIR` puts a PEFT `save_pretrained`
adapter (adapter_config.json + adapter_model.safetensors) onto the config.init_from.hf base, and
`bigjax-export --adapter` writes a run's LoRA in that format, which `peft` loads.

One fact stated once: the adapter directory states the rank (r), alpha (lora_alpha), DoRA
(use_dora) and which layers are adapted (its tensors; target_modules selects the same ones), so
config.peft.rank / alpha / dora / target are not set beside it (a value that contradicts the
adapter is refused). config.peft.dropout stays the run's training choice.

The layers are matched through the family's HF tensor mapping (bigjax.models.hf): a rule that
turns the HF weight '<module>.weight' into bigjax kernels names the HF module and the bigjax
modules it fills. PEFT keeps A (r, in) and B (out, r) in torch's nn.Linear layout whatever the base
layer (GPT-2's Conv1D included; fan_in_fan_out only changes how PEFT merges the base weight), so
bigjax's lora_a (in..., r) is A.T and lora_b (r, out...) is B.T. GPT-2's fused c_attn feeds the
query, key and value kernels: on import its A is every part's lora_a and B's rows split into
three; on export the parts' As are stacked (rank k r for k adapted parts) with a block-diagonal B
and alpha k * alpha in rank_pattern / alpha_pattern, so PEFT's scale alpha / r is unchanged and the
logits are those of the bigjax model. A per-layer scale (alpha_pattern, rank_pattern, use_rslora)
that differs from the run's alpha / r is folded into B on import. DoRA's magnitude m is stored in
bigjax as the offset m - ||W_0||_c, computed from the loaded base.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import reporting
from bigjax.errors import UserError
from bigjax.peft import common

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'  # PeftModel's name of the wrapped transformers model
SUFFIXES = {
  'lora_a': '.lora_A.weight',
  'lora_b': '.lora_B.weight',
  'magnitude': '.lora_magnitude_vector',
  # A copy of the base layer's weight, which PEFT saves for vocabulary-sized layers (an adapted
  # lm_head: save_embedding_layers) and loads over the base's: checked equal to the base's.
  'base_weight': '.base_layer.weight',
}
# config.peft field -> the adapter_config.json field that states it
STATED = {'rank': 'r', 'alpha': 'lora_alpha', 'dora': 'use_dora'}
# adapter_config.json options that change the computation beyond LoRA / DoRA on linear layers
UNSUPPORTED = (
  'lora_bias',
  'modules_to_save',
  'target_parameters',
  'trainable_token_indices',
  'layer_replication',
  'use_qalora',
  'alora_invocation_tokens',
  'use_bdlora',
)
# Families whose HF layers are Conv1D ((in, out) weights): PEFT's fan_in_fan_out=True for them.
FAN_IN_FAN_OUT = {'gpt': True}
TASK_TYPES = {'gpt': 'CAUSAL_LM', 'llama': 'CAUSAL_LM'}  # adapter_config.json task_type on export
_SCANNED = re.compile(r'(^|/)layer_\d+/')


# ----------------------------------------------------------------------------------------------
# The adapter directory
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Adapter:
  """An opened PEFT adapter directory: config (adapter_config.json), shapes {tensor name without
  PREFIX: shape} from the safetensors header, read(name) -> float32 numpy array."""

  directory: str
  config: dict
  shapes: dict[str, tuple[int, ...]]

  @property
  def config_file(self) -> str:
    return os.path.join(self.directory, CONFIG)

  @property
  def weights_file(self) -> str:
    return os.path.join(self.directory, WEIGHTS)

  def read(self, name: str) -> np.ndarray:
    import safetensors

    # The 'flax' framework reads bfloat16 too (safetensors' numpy one cannot).
    with safetensors.safe_open(self.weights_file, framework='flax') as f:
      stored = name if name in f.keys() else PREFIX + name  # noqa: SIM118 (a safe_open handle)
      return np.asarray(f.get_tensor(stored), np.float32)

  def modules(self) -> dict[str, dict[str, str]]:
    """{HF module name ('model.layers.0.self_attn.q_proj'): {'lora_a' | 'lora_b' | 'magnitude' |
    'base_weight': tensor name}}; UserError for a tensor that is none of them (a LoRA embedding, a bias, a
    modules_to_save copy)."""
    out: dict[str, dict[str, str]] = {}
    for name in self.shapes:
      kind = next((k for k, s in SUFFIXES.items() if name.endswith(s)), None)
      if kind is None:
        raise UserError(
          f'{self.weights_file}: tensor {PREFIX + name!r} is not the lora_A / lora_B weight or '
          'DoRA magnitude of a linear layer; bigjax imports LoRA adapters of linear layers only'
        )
      out.setdefault(name[: -len(SUFFIXES[kind])], {})[kind] = name
    return out


def read(directory: str, field: str = 'config.peft.init_from') -> Adapter:
  """The adapter in `directory`; UserError (naming `field` or the file, and the fix) for a path
  that is not a PEFT LoRA adapter or uses options bigjax does not reproduce."""
  import safetensors

  path = os.path.expanduser(directory)
  fix = 'give a directory written by a PEFT model\'s save_pretrained(dir)'
  if not os.path.isdir(path):
    raise UserError(f'{field}={directory!r} is not a directory; {fix}')
  config_file, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
  if not os.path.exists(config_file):
    raise UserError(f'{field}={directory!r} has no {CONFIG}: not a PEFT adapter; {fix}')
  if not os.path.exists(weights):
    raise UserError(
      f'{field}={directory!r} has no {WEIGHTS}; save the adapter with '
      'save_pretrained(dir, safe_serialization=True)'
    )
  try:
    with open(config_file) as f:
      config = json.load(f)
    assert isinstance(config, dict)
  except (OSError, ValueError, AssertionError) as e:
    raise UserError(f'{config_file} is not a JSON object ({e}); {fix}') from None
  kind = config.get('peft_type')
  if kind != 'LORA':
    raise UserError(
      f'{config_file}: peft_type={kind!r}; bigjax imports LoRA adapters (peft_type LORA)'
    )
  for option in UNSUPPORTED:
    if config.get(option):
      raise UserError(
        f'{config_file}: {option}={config[option]!r} is not supported (bigjax imports LoRA / '
        f'DoRA on linear layers); save the adapter without {option}'
      )
  try:
    with safetensors.safe_open(weights, framework='flax') as f:
      shapes = {
        k.removeprefix(PREFIX): tuple(f.get_slice(k).get_shape())
        for k in f.keys()  # noqa: SIM118 (a safe_open handle, not a dict)
      }
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise UserError(f'{weights} cannot be read as safetensors ({e}); re-save the adapter') from None
  return Adapter(path, config, shapes)


def settings(cfg) -> Any:
  """config.peft with the adapter's r, lora_alpha and use_dora as rank, alpha and dora (a copy;
  as given without config.peft.init_from). UserError for a field set to something else."""
  if not cfg.get('init_from'):
    return cfg
  from bigjax import config_lib

  adapter = read(cfg.init_from)
  defaults = config_lib.base_config().peft
  stated = {
    'rank': int(adapter.config.get('r', 8)),
    'alpha': float(adapter.config.get('lora_alpha', 8)),
    'dora': bool(adapter.config.get('use_dora', False)),
  }
  for field, value in stated.items():
    if cfg[field] != defaults[field] and cfg[field] != value:
      raise UserError(
        f'config.peft.{field}={cfg[field]!r} contradicts {adapter.config_file} '
        f'({STATED[field]}={value!r}); remove config.peft.{field} (the adapter states it)'
      )
  if cfg.target != defaults.target:
    raise UserError(
      f'config.peft.target={cfg.target!r}: with config.peft.init_from the layers are those '
      f'{adapter.weights_file} adapts; remove config.peft.target'
    )
  resolved = cfg.copy_and_resolve_references()
  resolved.update(stated)
  return resolved


# ----------------------------------------------------------------------------------------------
# HF module names <-> bigjax modules (from the family's tensor mapping)
# ----------------------------------------------------------------------------------------------
def _family(model):
  from bigjax.models import hf

  # A registry model's module is named after it (bigjax.models.llama -> 'llama').
  return hf.family_for_model(type(model).__module__.rsplit('.', 1)[-1])


def hf_modules(model, what: str) -> dict[str, tuple[str, ...]]:
  """{full HF module name ('model.layers.0.self_attn.q_proj', 'lm_head'): the (unscanned) bigjax
  module paths its weight fills, in order (GPT-2's c_attn: query, key, value)} of a base model."""
  mapping = _family(model).mapping(model, what)
  return {
    mapping.export_name(rule.name).removesuffix('.weight'): tuple(
      p.removesuffix('/kernel') for p in rule.params
    )
    for rule in mapping.rules
    if rule.name.endswith('.weight') and all(p.endswith('/kernel') for p in rule.params)
  }


def _matched(adapter: Adapter, model) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
  """{full HF module name: (its adapter tensors, bigjax module paths)} of every module the
  adapter adapts; UserError for a module the base model does not have."""
  base = common.base_model(model)
  modules = hf_modules(base, f'config.peft.init_from={adapter.directory!r}')
  prefix = _family(base).mapping(base).prefix
  found = {}
  for name, tensors in adapter.modules().items():
    full = name if name in modules else prefix + name  # an adapter of the headless base model
    if full not in modules:
      raise UserError(
        f'{adapter.weights_file}: {PREFIX + name + SUFFIXES["lora_a"]!r} adapts {name!r}, a '
        'linear layer the base model (config.init_from.hf) does not have (they look like '
        f'{next(iter(modules))!r}); the adapter is for another base model'
      )
    missing = [k for k in ('lora_a', 'lora_b') if k not in tensors]
    if missing or ('magnitude' in tensors) != bool(adapter.config.get('use_dora')):
      raise UserError(
        f'{adapter.weights_file}: module {name!r} has tensors {sorted(tensors.values())}; a LoRA '
        'adapter needs lora_A and lora_B (and lora_magnitude_vector exactly when use_dora)'
      )
    found[full] = (tensors, modules[full])
  if not found:
    raise UserError(f'{adapter.weights_file} holds no LoRA tensors; give a saved LoRA adapter')
  return found


def _model_module(path: str, dense: dict[str, str]) -> str | None:
  """The model's module for an unscanned path: itself, or 'stack/layers/...' in a scanned stack."""
  if path in dense:
    return path
  scanned = _SCANNED.sub(r'\1layers/', path, count=1)
  return scanned if scanned in dense else None


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
      module = _model_module(part, dense)
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
# Import: the adapter's tensors into the (sharded) params
# ----------------------------------------------------------------------------------------------
def _check_base(adapter: Adapter, base_dir: str) -> None:
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


def _check_base_copies(adapter: Adapter, matched, base_dir: str) -> None:
  """UserError unless every base-layer copy the adapter carries equals the base's weight."""
  from bigjax.models.hf import safetensors_io

  copies = {full: t['base_weight'] for full, (t, _) in matched.items() if 'base_weight' in t}
  if not copies:
    return
  source = safetensors_io.SafetensorsSource(base_dir, '')
  for full, name in copies.items():
    theirs = adapter.read(name)
    ours = source.read(full + '.weight') if full + '.weight' in source.names() else None
    if ours is None or ours.shape != theirs.shape or not np.array_equal(ours, theirs):
      raise UserError(
        f'{adapter.weights_file}: {PREFIX + name!r} (the weight of the layer the adapter was '
        f'made on) differs from {full}.weight of config.init_from.hf={base_dir!r}; the adapter '
        'is for another base model'
      )


def loader(config, model, abstract_params) -> Callable[[Any], Any] | None:
  """The function that puts config.peft.init_from's tensors into a params tree whose base is
  loaded already (None without it). abstract_params: the adapted model's params (arrays or
  ShapeDtypeStructs). UserError (naming the file and tensor) for shapes another base would have,
  before anything is read."""
  from bigjax.models.hf import convert

  cfg = config.get('peft')
  if not (common.enabled(cfg) and cfg.get('init_from')):
    return None
  cfg = settings(cfg)
  adapter = read(cfg.init_from)
  _check_base(adapter, config.init_from.hf)
  matched = _matched(adapter, model)
  _check_base_copies(adapter, matched, config.init_from.hf)
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
      loaders[f'{part}/lora_a'] = _reader(adapter, tensors['lora_a'], lambda a: a.T, want_a)
      loaders[f'{part}/lora_b'] = _reader(
        adapter,
        tensors['lora_b'],
        lambda b, rows=rows, k=theirs / scale: _times(b[rows].T, k),
        want_b,
      )
      if cfg.dora:
        loaders[f'{part}/magnitude_offset'] = _reader(
          adapter, tensors['magnitude'], lambda m, rows=rows: m[rows], want_b[1:]
        )
  by_path = _stack_layers(loaders, per_layer, shapes, adapter)

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


def _times(x: np.ndarray, k: float) -> np.ndarray:
  return x if k == 1.0 else x * np.float32(k)


def _reader(adapter: Adapter, name: str, fn, shape) -> Callable[[], np.ndarray]:
  return lambda: np.ascontiguousarray(fn(adapter.read(name)).reshape(shape), np.float32)


def _stack_layers(loaders, per_layer, shapes, adapter) -> dict[str, Callable[[], np.ndarray]]:
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


# ----------------------------------------------------------------------------------------------
# Export: a run's LoRA as a PEFT adapter directory
# ----------------------------------------------------------------------------------------------
def _per_layer(params) -> dict[str, np.ndarray]:
  out = {}
  for path, value in common.flat(params).items():
    value = np.asarray(value, np.float32)
    if re.search(r'(^|/)layers/', path):
      for i in range(value.shape[0]):
        out[re.sub(r'(^|/)layers/', rf'\1layer_{i}/', path, count=1)] = value[i]
    else:
      out[path] = value
  return out


def _short_keys(chosen: dict[str, Any], every: list[str], escape: bool) -> dict[str, Any]:
  """{key: value} for PEFT's target_modules / rank_pattern: a module's last name ('q_proj') where
  every module of that name is chosen with one value, else its full name (regex-escaped with
  `escape`: PEFT matches rank_pattern keys as regexes, target_modules names as names)."""
  out: dict[str, Any] = {}
  for name in sorted({m.rsplit('.', 1)[-1] for m in chosen}):
    same = [m for m in every if m.rsplit('.', 1)[-1] == name]
    values = {json.dumps(chosen.get(m)) for m in same}
    if all(m in chosen for m in same) and len(values) == 1:
      out[name] = chosen[same[0]]
    else:
      out.update({(re.escape(m) if escape else m): chosen[m] for m in same if m in chosen})
  return out


def save(config, model, params, directory: str) -> str:
  """Writes the LoRA of a finished run (config, its adapted model and host params) as a PEFT
  adapter directory that `PeftModel.from_pretrained(<the base>, directory)` loads with this
  model's logits; returns the directory. UserError for a run without a LoRA adapter."""
  from safetensors.numpy import save_file

  from bigjax.peft import lora

  cfg = config.get('peft')
  if not common.enabled(cfg) or cfg.method != 'lora':
    raise UserError(
      '--adapter writes LoRA adapters in the PEFT format; the run has config.peft.method='
      f'{cfg.method if cfg else ""!r} (use --merge for a plain checkpoint)'
    )
  base = common.base_model(model)
  flat = _per_layer(params)
  spec = lora.spec_from_params(cfg, common.flat(params))
  modules = hf_modules(base, 'export')
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  for full, parts in modules.items():
    have = [p for p in parts if f'{p}/lora_a' in flat]
    if not have:
      continue
    n_in = math.prod(flat[f'{have[0]}/lora_a'].shape[:-1])
    a_rows = []
    for part in have:
      a = flat[f'{part}/lora_a']
      a_rows.append(a.reshape(n_in, a.shape[-1]).T)
    rank = sum(a.shape[0] for a in a_rows)
    n_out = flat[f'{parts[0]}/kernel'].size // n_in
    b = np.zeros((len(parts) * n_out, rank), np.float32)
    col = 0
    for i, part in enumerate(parts):
      if part in have:
        block = flat[f'{part}/lora_b']
        r = block.shape[0]
        b[i * n_out : (i + 1) * n_out, col : col + r] = block.reshape(r, n_out).T
        col += r
    tensors[PREFIX + full + SUFFIXES['lora_a']] = np.concatenate(a_rows)
    tensors[PREFIX + full + SUFFIXES['lora_b']] = b
    if spec.dora:
      m = []
      for part in parts:
        kernel = flat[f'{part}/kernel'].reshape(n_in, n_out)
        offset = flat.get(f'{part}/magnitude_offset', np.zeros(n_out, np.float32)).reshape(-1)
        m.append(np.linalg.norm(kernel, axis=0) + offset)
      tensors[PREFIX + full + SUFFIXES['magnitude']] = np.concatenate(m).astype(np.float32)
    ranks[full] = rank
  if not tensors:
    raise UserError('--adapter: the run\'s parameters hold no LoRA layer the HF mapping names')
  every = list(modules)
  odd = {m: r for m, r in ranks.items() if r != spec.rank}
  family = _family(base)
  adapter_config = dict(
    peft_type='LORA',
    task_type=TASK_TYPES.get(family.MODEL),
    base_model_name_or_path=os.path.abspath(config.init_from.hf) if config.init_from.hf else None,
    r=spec.rank,
    lora_alpha=spec.alpha,
    lora_dropout=spec.dropout,
    use_dora=spec.dora,
    fan_in_fan_out=FAN_IN_FAN_OUT.get(family.MODEL, False),
    target_modules=sorted(_short_keys(dict.fromkeys(ranks, True), every, False)),
    rank_pattern=_short_keys(odd, every, True),
    alpha_pattern=_short_keys({m: spec.scaling * r for m, r in odd.items()}, every, True),
    bias='none',
    inference_mode=True,
    init_lora_weights=True,
  )
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WEIGHTS)
  # safetensors.numpy writes an array's buffer whatever its strides: a transposed view would be
  # stored scrambled, so every tensor is made C-contiguous first.
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  save_file(tensors, path + '.tmp', metadata={'format': 'pt'})
  os.replace(path + '.tmp', path)
  reporting.write_json_atomic(os.path.join(directory, CONFIG), adapter_config)
  return directory
