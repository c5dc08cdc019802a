"""An HF PEFT adapter directory (a PEFT model's `save_pretrained`: adapter_config.json +
adapter_model.safetensors): opening and validating it, and config.peft as the adapter states it.

`read(dir)` checks the directory before any tensor is read (one-line UserErrors naming the file and
the fix); `settings(config.peft)` returns config.peft with the fields the adapter states (LoRA's
r, lora_alpha, use_dora; prompt / prefix tuning's num_virtual_tokens) filled in: each fact is
stated once, so a config field that contradicts the adapter is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from bigjax.errors import UserError

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'  # PeftModel's name of the wrapped transformers model
# adapter_config.json peft_type -> the config.peft.method that imports it
METHOD_OF = {'LORA': 'lora', 'PROMPT_TUNING': 'prompt', 'PREFIX_TUNING': 'prefix'}
# config.peft field -> the adapter_config.json field that states it, per method
STATED = {
  'lora': {'rank': 'r', 'alpha': 'lora_alpha', 'dora': 'use_dora'},
  'prompt': {'virtual_tokens': 'num_virtual_tokens'},
  'prefix': {'virtual_tokens': 'num_virtual_tokens'},
}
# adapter_config.json options that change the computation beyond what bigjax reproduces
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

  @property
  def method(self) -> str:
    """The config.peft.method of the adapter's peft_type ('lora', 'prompt', 'prefix')."""
    return METHOD_OF[self.config['peft_type']]

  def read(self, name: str) -> np.ndarray:
    import safetensors

    # The 'flax' framework reads bfloat16 too (safetensors' numpy one cannot).
    with safetensors.safe_open(self.weights_file, framework='flax') as f:
      stored = name if name in f.keys() else PREFIX + name  # noqa: SIM118 (a safe_open handle)
      return np.asarray(f.get_tensor(stored), np.float32)


def read(directory: str, field: str = 'config.peft.init_from') -> Adapter:
  """The adapter in `directory`; UserError (naming `field` or the file, and the fix) for a path
  that is not a PEFT adapter of a type bigjax imports or uses options bigjax does not reproduce."""
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
  if kind not in METHOD_OF:
    raise UserError(
      f'{config_file}: peft_type={kind!r}; bigjax imports peft_type {", ".join(METHOD_OF)} adapters'
    )
  for option in UNSUPPORTED:
    if config.get(option):
      raise UserError(
        f'{config_file}: {option}={config[option]!r} is not supported (bigjax imports LoRA / '
        f'DoRA on linear layers, prompt and prefix tuning); save the adapter without {option}'
      )
  if kind != 'LORA' and config.get('num_transformer_submodules', 1) != 1:
    raise UserError(
      f'{config_file}: num_transformer_submodules={config["num_transformer_submodules"]}: an '
      'encoder-decoder adapter; bigjax imports virtual tokens of decoder-only and encoder models'
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


def _stated(adapter: Adapter) -> dict[str, Any]:
  """{config.peft field: the value the adapter states} (PEFT's defaults where it is silent)."""
  c = adapter.config
  if adapter.method == 'lora':
    return {
      'rank': int(c.get('r', 8)),
      'alpha': float(c.get('lora_alpha', 8)),
      'dora': bool(c.get('use_dora', False)),
    }
  return {'virtual_tokens': int(c['num_virtual_tokens'])}


def settings(cfg) -> Any:
  """config.peft with the fields config.peft.init_from's adapter states filled in (a copy; as
  given without config.peft.init_from). UserError for an adapter of another method, or a field
  set to something else than the adapter states."""
  if not cfg.get('init_from'):
    return cfg
  from bigjax import config_lib

  adapter = read(cfg.init_from)
  if adapter.method != cfg.method:
    raise UserError(
      f'{adapter.config_file}: peft_type={adapter.config["peft_type"]!r} is imported by '
      f"config.peft.method={adapter.method!r}, not {cfg.method!r}; set "
      f'config.peft.method={adapter.method!r}'
    )
  defaults = config_lib.base_config().peft
  stated = _stated(adapter)
  for field, value in stated.items():
    if cfg[field] != defaults[field] and cfg[field] != value:
      raise UserError(
        f'config.peft.{field}={cfg[field]!r} contradicts {adapter.config_file} '
        f'({STATED[adapter.method][field]}={value!r}); remove config.peft.{field} (the adapter '
        'states it)'
      )
  if cfg.target != defaults.target:
    raise UserError(
      f'config.peft.target={cfg.target!r}: with config.peft.init_from the layers are those '
      f'{adapter.weights_file} adapts; remove config.peft.target'
    )
  resolved = cfg.copy_and_resolve_references()
  resolved.update(stated)
  return resolved
