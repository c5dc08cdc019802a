"""Parameter-efficient fine-tuning (config.peft): a frozen base model plus a few new parameters.

  model, tx, plan = peft.build(config, model, tx, sample)    # in experiment.build

One module per method, registered by name in METHODS ('lora': LoRA and, with config.peft.dora, DoRA,
with config.peft.quantize QLoRA (qlora.py); 'ia3'; 'adapter': bottleneck adapters; 'adalora';
'prompt': prompt tuning; 'prefix': prefix tuning); HF PEFT adapter directories: `hf_directory.py`
reads and checks one, `hf_import.py` puts it onto the imported base (`hf_virtual.py`: prompt and
prefix tuning), `hf_export.py` writes a run's LoRA, `hf_names.py` maps HF module names to bigjax
modules for both; `common.py` holds what the methods share: which Dense
kernels a target regex selects, the model wrapper that runs the base model's __call__ under
`nn.intercept_methods`, the trainable mask, the optimizer (`optax.multi_transform`: frozen
parameters get `set_to_zero` and so no optimizer state) and the gradient of the trainable parameters
only. `saving.py`: adapter-only checkpoints (config.peft.save='trainable') and a finished run's
adapted model for bigjax-sample / -export.
"""

from bigjax.peft.common import METHODS, Plan, build, enabled, merged_params, plan_from_params
from bigjax.peft.saving import checkpointer, run_params

# The methods register themselves in METHODS when imported.
from bigjax.peft import adalora, adapter, ia3, lora, prefix, prompt  # noqa: E402,F401  isort: skip

__all__ = [
  'METHODS',
  'Plan',
  'build',
  'checkpointer',
  'enabled',
  'merged_params',
  'plan_from_params',
  'run_params',
]
