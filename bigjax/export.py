"""Export a run as a HuggingFace save_pretrained directory.

  bigjax-export --workdir=runs/llama_shakespeare --to=exported/llama_shakespeare
  bigjax-export --workdir=runs/llama_lora --to=exported/llama_lora_merged --merge
  bigjax-export --workdir=runs/llama_lora --to=exported/llama_lora_adapter --adapter

Reads the run's config.json and newest checkpoint, builds the same model (its data-derived fields
from the run's tokenizer and, for a run started from config.init_from.hf, the architecture from
that directory, as bigjax-train does), maps the parameters to the family's HuggingFace names
(bigjax/models/hf/<family>.py `mapping`, the one the import uses) and writes config.json +
model.safetensors with `safetensors.numpy` (no torch), plus the starting checkpoint's tokenizer
files when there is one. `transformers`' from_pretrained(DIR) loads the result and gives the
same logits (tests/test_hf_import.py). Families: gpt (GPT2LMHeadModel), bert with
head='pretrain' (BertForPreTraining), llama (LlamaForCausalLM, or Qwen2/Mistral as the starting
checkpoint was). A run trained with a config.peft adapter is exported with --merge: the adapter is
folded into the base weights (LoRA: W + alpha/r A B; DoRA: rescaled columns), giving a plain
checkpoint of the base architecture (tests/test_peft_runs.py); --adapter writes its LoRA as a HF
PEFT adapter directory instead (adapter_config.json + adapter_model.safetensors, base_model_name_or_path
the run's config.init_from.hf), which `peft.PeftModel.from_pretrained(base, DIR)` loads with the
run's logits (bigjax/peft/hf_export.py, tests/test_peft_hf.py).

  bigjax-export --workdir=runs/mnist_cnn --to=exported/mnist_cnn --quantized   (or --pruned)

writes the compressed weights of any run instead, as one .npz (`quantized.npz`: int8 weights and
their scales, from the run's config.quantize or int8 PTQ; `pruned.npz`: each kernel's non-zeros
plus a 1-bit mask), and prints its size on disk against the float32 parameters'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
from typing import Any

from bigjax import cli, experiment, init_from
from bigjax.errors import UserError

# A transform of the checkpoint's params tree before the mapping: --merge passes merge_adapter,
# which folds a config.peft adapter into the base weights; None exports as saved.
ParamsTransform = Callable[[Any, Any], Any]


def merge_adapter(params: Any, config: Any) -> Any:
  """The ParamsTransform of --merge: config.peft's adapter folded into the base weights."""
  from bigjax import peft

  if not peft.enabled(config.get('peft')):
    raise UserError('--merge: the run was trained without config.peft; export it without --merge')
  return peft.merged_params(config.peft, params)


def export_adapter(workdir: str, to: str) -> str:
  """--adapter: writes the run's config.peft LoRA as a PEFT adapter directory `to`."""
  from bigjax.peft import hf_export

  config, _, model, params = experiment.load_run(workdir)
  return hf_export.save(config, model, params, to)


def load_run(workdir: str) -> tuple[Any, Any, Any]:
  """(config, model, params as host numpy arrays) of the newest checkpoint in `workdir`."""
  config, _, model, params = experiment.load_run(workdir)
  return config, model, params


def export(workdir: str, to: str, transform: ParamsTransform | None = None) -> str:
  """Writes the run in `workdir` to the save_pretrained directory `to`; returns `to`.

  transform(params, config) -> params runs before the mapping (see ParamsTransform). UserError
  for a model family without a HuggingFace counterpart, parameters the mapping cannot place, or a
  config.peft run exported with no transform (it needs --merge).
  """
  from bigjax import peft
  from bigjax.models import hf
  from bigjax.models.hf import convert, safetensors_io

  config, model, params = load_run(workdir)
  model = peft.common.base_model(model)  # a config.peft run exports its base architecture
  family = hf.family_for_model(config.model.name)
  if transform is not None:
    params = transform(params, config)
  elif peft.enabled(config.get('peft')):
    raise UserError(
      f'{workdir} trained a config.peft.method={config.peft.method!r} adapter; export it with '
      '--merge (folds the adapter into the base weights) or --adapter (a PEFT adapter directory)'
    )
  tensors = convert.to_hf(params, family.mapping(model, 'export'), 'export')
  source = init_from.hf_family(config)
  base = dict(source[1]) if source else {}
  extra = {}
  if family.MODEL == 'llama' and base.get('model_type'):
    extra['model_type'] = base['model_type']
  hf_config = family.hf_config(model, **extra)
  for stale in ('rope_theta', 'rope_scaling', 'torch_dtype', 'dtype', 'transformers_version'):
    base.pop(stale, None)  # restated by hf_config or by transformers on load
  hf_config = {**base, **hf_config, 'torch_dtype': 'float32'}
  if family.MODEL == 'bert' and model.pad_id < 0:
    hf_config['pad_token_id'] = None
  return safetensors_io.save_pretrained(
    to, tensors, hf_config, copy_from=config.init_from.hf or None
  )


COMPRESSED = {'quantized': 'quantized.npz', 'pruned': 'pruned.npz'}  # --flag -> file in --to


def export_compressed(workdir: str, to: str, kind: str) -> tuple[str, int, int]:
  """Writes the run's newest checkpoint compressed (`kind`: 'quantized' | 'pruned', see
  COMPRESSED) into the directory `to`; returns (file, its bytes on disk, float params' bytes)."""
  from bigjax import checkpoint
  from bigjax.compress import prune, quantize

  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise UserError(f'--workdir={workdir} holds no config.json; give the workdir of a bigjax run')
  try:
    _, state = checkpoint.load_latest(init_from.checkpoint_dir(workdir))
  except FileNotFoundError:
    raise UserError(f'{workdir} holds no checkpoint yet; train it first') from None
  float_bytes = quantize.param_bytes(state['params'])
  os.makedirs(to, exist_ok=True)
  path = os.path.join(to, COMPRESSED[kind])
  write = quantize.write_quantized if kind == 'quantized' else prune.write_sparse
  return path, write(workdir, path), int(float_bytes)


def _main(argv: Sequence[str]) -> int:
  from absl import logging

  parser = cli.Parser('bigjax-export', __doc__)
  parser.string('workdir', None, 'Workdir of a bigjax run (its newest checkpoint).', required=True)
  parser.string('to', None, 'Directory to write (created if missing).', required=True)
  parser.boolean('quantized', False, 'Write int8 weights + scales (to/quantized.npz) instead.')
  parser.boolean('pruned', False, 'Write sparse weights + 1-bit masks (to/pruned.npz) instead.')
  parser.boolean('merge', False, 'Fold the config.peft adapter (LoRA, DoRA) into the weights.')
  parser.boolean('adapter', False, 'Write the config.peft LoRA as a HF PEFT adapter directory.')
  fv = parser.parse(argv)
  logging.set_verbosity(logging.WARNING)
  if os.path.abspath(fv.to) == os.path.abspath(fv.workdir):
    raise UserError('--to must differ from --workdir; give a new directory')
  kinds = [k for k in COMPRESSED if getattr(fv, k)]
  if len(kinds) + fv.merge + fv.adapter > 1:
    raise UserError('--quantized, --pruned, --merge and --adapter write different files; give one')
  if fv.adapter:
    print(f'bigjax-export: wrote {export_adapter(fv.workdir, fv.to)}')
    return 0
  if kinds:
    path, size, float_size = export_compressed(fv.workdir, fv.to, kinds[0])
    print(
      f'bigjax-export: wrote {path}: {size:,} bytes on disk, {float_size / size:.2f}x smaller '
      f'than the float32 parameters ({float_size:,} bytes)'
    )
    return 0
  print(f'bigjax-export: wrote {export(fv.workdir, fv.to, merge_adapter if fv.merge else None)}')
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
