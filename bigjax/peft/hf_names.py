"""HF module names <-> bigjax modules, from a model family's HF tensor mapping (bigjax.models.hf):
what PEFT adapter import and export both need.

A mapping rule that turns the HF weight '<module>.weight' into bigjax kernels names the HF module
('model.layers.0.self_attn.q_proj') and the bigjax modules it fills, in order (GPT-2's fused
c_attn: query, key, value). Paths are per layer ('stack/layer_0/...'); `model_module` finds the
module of a scanned stack ('stack/layers/...').
"""

from __future__ import annotations

import re
from types import ModuleType

from bigjax.peft import common

_SCANNED = re.compile(r'(^|/)layer_\d+/')


def family(model) -> ModuleType:
  """The bigjax.models.hf family module of a (base or adapted) model."""
  from bigjax.models import hf

  base = common.base_model(model)
  # A registry model's module is named after it (bigjax.models.llama -> 'llama').
  return hf.family_for_model(type(base).__module__.rsplit('.', 1)[-1])


def hf_modules(model, what: str) -> dict[str, tuple[str, ...]]:
  """{full HF module name ('model.layers.0.self_attn.q_proj', 'lm_head'): the (unscanned) bigjax
  module paths its weight fills, in order} of a model's linear layers."""
  base = common.base_model(model)
  mapping = family(base).mapping(base, what)
  return {
    mapping.export_name(rule.name).removesuffix('.weight'): tuple(
      p.removesuffix('/kernel') for p in rule.params
    )
    for rule in mapping.rules
    if rule.name.endswith('.weight') and all(p.endswith('/kernel') for p in rule.params)
  }


def tied_output(model, hf_module: str, what: str) -> str | None:
  """The bigjax parameter a tied HF output layer ('lm_head') equals ('embed/embedding'), or None
  when the module is not a tied output of this model."""
  base = common.base_model(model)
  mapping = family(base).mapping(base, what)
  return dict(mapping.tied).get(hf_module + '.weight')


def model_module(path: str, dense: dict[str, str]) -> str | None:
  """The model's module for an unscanned path: itself, or 'stack/layers/...' in a scanned stack."""
  if path in dense:
    return path
  scanned = _SCANNED.sub(r'\1layers/', path, count=1)
  return scanned if scanned in dense else None
