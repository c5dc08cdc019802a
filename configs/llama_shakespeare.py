"""A small Llama-family model (RMSNorm, rotary positions, SwiGLU, grouped-query attention, untied
head) on Shakespeare's works, byte-level and trained from scratch by default.

  bigjax-train --config=llama_shakespeare --workdir=runs/llama_shakespeare

Args: smoke (a tiny model for a few steps); hf=DIR starts from a HuggingFace save_pretrained
directory of a Llama / Mistral / Qwen2 / SmolLM model instead (config.json + model.safetensors, or
a sharded index, and its tokenizer.json): the architecture fields (layers, heads, kv heads, widths,
vocabulary, rope theta, norm eps, tied head) then come from DIR/config.json and are not set here,
the tokenizer is DIR's (data.tokenizer='hf'), and every parameter is read from DIR into the mesh's
shardings:

  bigjax-train --config=llama_shakespeare:hf=/path/to/SmolLM-135M --workdir=runs/smollm_shakespeare \\
      --config.mesh.fsdp=-1 --config.mesh.data=1

(`--config.init_from.hf=DIR` on the plain config is refused: its model fields would contradict
DIR's.) Export a run for transformers with `bigjax-export --workdir=RUN --to=OUT`. AdamW 1e-3
(3e-4 from a checkpoint), warmup + cosine, global-norm clipping 1.0; validation loss in bits per
byte (bits per token with the HF tokenizer).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False, hf='')
  config = config_lib.base_config()
  config.data.update(name='shakespeare', view='lm', eval_split='validation', seq_len=128)
  config.model.name = 'llama'
  config.model.kwargs = dict(scan=False, remat='none', attention='xla', dtype='float32')
  if args.hf:
    config.init_from.hf = args.hf
    config.data.tokenizer = 'hf'
  else:
    config.model.kwargs.update(
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      embed_dim=128,
      mlp_dim=384,
      # The context length is one fact: rotary positions need no table, max_len only bounds T.
      max_len=config.data.get_ref('seq_len'),
      rope_theta=10000.0,
      norm_eps=1e-5,
      tie_embeddings=False,
    )
  config.task.name = 'causal_lm'
  config.optim.update(
    name='adamw',
    lr=3e-4 if args.hf else 1e-3,
    b2=0.99,
    weight_decay=0.1,
    clip_norm=1.0,
    schedule='warmup_cosine',
    warmup_steps=100,
    end_lr_fraction=0.1,
  )
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 0
  config.num_steps = 3000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  if args.smoke:
    if not args.hf:
      config.model.kwargs.update(
        num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64
      )
    config.data.seq_len = 32
    config.data.eval_max_examples = 128
    config.batch_size = 16
    config.num_steps = 30
    config.optim.lr = 1e-2 if not args.hf else 3e-3
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 0
    config.checkpoint_every = 10
  return config
