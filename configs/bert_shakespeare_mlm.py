"""BERT-style masked-LM + next-sentence pretraining on Shakespeare (byte-level, sentence pairs).

  bigjax-train --config=bert_shakespeare_mlm --workdir=runs/bert_mlm

Args: smoke; hf=DIR starts from a HuggingFace BERT save_pretrained directory (config.json +
model.safetensors and its tokenizer.json: data.tokenizer='hf'), whose config.json states the
architecture (layers, heads, width, positions, vocabulary: not set here; `--config.init_from.hf=DIR`
on the plain config is refused, its model fields would contradict DIR's). 4 post-LN layers, 4
heads, 128 wide, sequences of 128 bytes; AdamW 1e-3 with warmup + linear decay. Its workdir is
what configs/bert_genre.py fine-tunes from.
"""

from bigjax import config_lib

MODEL = dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=128, dropout=0.1)


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False, hf='')
  config = config_lib.base_config()
  config.data.update(
    name='shakespeare', view='pairs', seq_len=128, eval_split='validation', eval_max_examples=1024
  )
  config.model.name = 'bert'
  config.model.kwargs = dict(
    head='pretrain',
    dropout=MODEL['dropout'],
    scan=False,
    remat='none',
    attention='xla',
    dtype='float32',
    param_dtype='float32',
  )
  if args.hf:  # the architecture is DIR/config.json's; the tokenizer DIR's
    config.init_from.hf = args.hf
    config.data.tokenizer = 'hf'
  else:
    config.model.kwargs.update(MODEL)
  config.task.name = 'masked_lm'
  config.task.kwargs = dict(mask_rate=0.15, next_sentence=True)
  config.optim.update(
    name='adamw',
    lr=1e-3,
    weight_decay=0.01,
    clip_norm=1.0,
    schedule='warmup_linear',
    warmup_steps=100,
  )
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 0
  config.num_steps = 2000
  config.log_every = 50
  config.checkpoint_every = 500
  if args.smoke:
    if not args.hf:
      config.model.kwargs.update(num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2)
    config.data.eval_max_examples = 64
    config.num_steps = 30
    config.optim.lr = 1e-2  # a 32-wide model takes a larger step
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.checkpoint_every = 10
  return config
