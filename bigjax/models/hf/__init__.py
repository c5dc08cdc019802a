"""HuggingFace import and export: one module per family (`gpt2`, `bert`, `llama`: the config.json
fields it reads, its tensor `mapping`, the config it exports), `convert` for what they share (the
mapping machinery, in both directions) and `safetensors_io` for `save_pretrained` directories
(read into shardings, written without torch). No torch import here.

A family module defines MODEL (the bigjax model name), MODEL_TYPES (config.json model_type values),
HF_NAMES (bigjax field -> HF field, for messages), architecture(hf_config) -> model kwargs,
mapping(model) -> convert.Mapping and hf_config(model) -> config.json dict.
"""

from types import ModuleType

from bigjax.errors import UserError
from bigjax.models.hf import bert, gpt2, llama

FAMILIES: tuple[ModuleType, ...] = (gpt2, bert, llama)


def family_of(hf_config: dict, where: str) -> ModuleType:
  """The family module of a config.json dict (by model_type); UserError naming `where` (the
  config file) and the supported types."""
  kind = hf_config.get('model_type')
  for family in FAMILIES:
    if kind in family.MODEL_TYPES:
      return family
  known = ', '.join(t for f in FAMILIES for t in f.MODEL_TYPES)
  raise UserError(
    f'{where}: model_type={kind!r} is not supported; bigjax imports HuggingFace {known} '
    'checkpoints (convert another architecture yourself, or pick a supported checkpoint)'
  )


def family_for_model(name: str) -> ModuleType:
  """The family module whose bigjax model is `name` ('gpt', 'bert', 'llama'); UserError else."""
  for family in FAMILIES:
    if name == family.MODEL:
      return family
  known = ', '.join(f.MODEL for f in FAMILIES)
  raise UserError(
    f'config.model.name={name!r} has no HuggingFace counterpart; export supports {known} runs'
  )
