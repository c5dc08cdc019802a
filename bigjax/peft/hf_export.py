"""Writing a run's LoRA as an HF PEFT adapter directory (`bigjax-export --adapter`) that
`PeftModel.from_pretrained(<the base>, DIR)` loads with the run's logits.

GPT-2's fused c_attn feeds the query, key and value kernels: the parts' As are stacked (rank k r
for k adapted parts) with a block-diagonal B and alpha k * alpha in rank_pattern / alpha_pattern,
so PEFT's scale alpha / r is unchanged and the logits are those of the bigjax model. DoRA's
magnitude is written as PEFT's m = ||W_0||_c + bigjax's magnitude_offset.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from bigjax import reporting
from bigjax.errors import UserError
from bigjax.peft import common, hf_names
from bigjax.peft.hf_directory import CONFIG, PREFIX, WEIGHTS
from bigjax.peft.hf_import import SUFFIXES

# Families whose HF layers are Conv1D ((in, out) weights): PEFT's fan_in_fan_out=True for them.
FAN_IN_FAN_OUT = {'gpt': True}
TASK_TYPES = {'gpt': 'CAUSAL_LM', 'llama': 'CAUSAL_LM'}  # adapter_config.json task_type


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
  flat = _per_layer(params)
  spec = lora.spec_from_params(cfg, common.flat(params))
  modules = hf_names.hf_modules(model, 'export')
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
  family = hf_names.family(model)
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
