"""Byte-level GPT on Shakespeare's works (the shape of nanoGPT's character model).

  bigjax-train --config=gpt_shakespeare --workdir=runs/gpt_shakespeare

Args: size=nano (default: 6 layers, 6 heads, 384 wide, context 256, dropout 0.2, 10.85M params),
size=small (4 layers, 4 heads, 128 wide, context 128: the CPU benchmark shape), smoke (a tiny model
for a few steps); tokenizer=sentencepiece (a 1,024-piece BPE trained on the train split instead of
bytes; divide the reported bits per byte by the tokenizer's bytes per token, 2.28 on validation).
AdamW 1e-3 (betas 0.9/0.99, weight decay 0.1 on matrices), warmup + cosine,
global-norm clipping 1.0. Train/validation/test are split by play. Reports validation loss in
bits per byte; see README for the CPU run and a generated sample.

hf=DIR starts from a HuggingFace GPT-2 save_pretrained directory instead (config.json +
model.safetensors and its tokenizer.json: data.tokenizer='hf'): the architecture fields (layers,
heads, width, context, vocabulary) come from DIR/config.json and are not set here, and every
parameter is read from DIR (`--config.init_from.hf=DIR` on the plain config is refused: its model
fields would contradict DIR's). The windows stay size's (or smoke's) seq_len.
"""

from bigjax import config_lib
from bigjax.errors import UserError


def get_config(arg=None):
  args = config_lib.parse(arg, size='nano', tokenizer='bytes', smoke=False, hf='')
  config = config_lib.base_config()
  config.data.update(name='shakespeare', view='lm', eval_split='validation')
  shapes = {
    'nano': dict(num_layers=6, num_heads=6, embed_dim=384, max_len=256, dropout=0.2),
    'small': dict(num_layers=4, num_heads=4, embed_dim=128, max_len=128, dropout=0.0),
  }
  if args.size not in shapes:
    raise UserError(f'config arg size={args.size!r} is unknown; use one of {", ".join(shapes)}')
  shape = dict(shapes[args.size])
  # The context length is one fact: the model's max_len is tied to the data's windows.
  config.data.seq_len = shape.pop('max_len')
  # SentencePiece: a 1,024-piece model trained on the train split; bytes: the 260 byte ids. The
  # model's and task's vocabulary size come from the tokenizer (build() derives them).
  sp_sizes = {'bytes': 0, 'sentencepiece': 1024}
  if args.tokenizer not in sp_sizes:
    raise UserError(
      f'config arg tokenizer={args.tokenizer!r} is unknown; use bytes or sentencepiece'
    )
  config.data.update(tokenizer=args.tokenizer, vocab_size=sp_sizes[args.tokenizer])
  config.model.name = 'gpt'
  config.model.kwargs = dict(
    scan=False, remat='none', attention='xla', dtype='float32', param_dtype='float32'
  )
  if args.hf:  # the architecture is DIR/config.json's; the tokenizer DIR's
    if args.tokenizer != 'bytes':
      raise UserError(
        f'config arg tokenizer={args.tokenizer!r}: with hf=DIR the tokenizer is DIR\'s; remove it'
      )
    config.init_from.hf = args.hf
    config.data.update(tokenizer='hf', vocab_size=0)
    config.model.kwargs.dropout = shape['dropout']
  else:
    config.model.kwargs.update(
      positions='learned', pre_ln=True, max_len=config.data.get_ref('seq_len'), **shape
    )
  config.task.name = 'causal_lm'
  config.task.kwargs = dict(label_smoothing=0.0)
  config.optim.update(
    name='adamw',
    lr=1e-3,
    b2=0.99,
    weight_decay=0.1,
    clip_norm=1.0,
    schedule='warmup_cosine',
    warmup_steps=100,
    end_lr_fraction=0.1,
  )
  config.batch_size = 64 if args.size == 'nano' else 32
  config.eval_batch_size = 64
  config.num_epochs = 0
  config.num_steps = 5000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  if args.smoke:
    config.model.kwargs.dropout = 0.0
    if not args.hf:
      config.model.kwargs.update(num_layers=2, num_heads=2, embed_dim=32)
    config.data.seq_len = 32  # and so the model's max_len
    config.data.eval_max_examples = 128
    config.batch_size = 16
    config.num_steps = 30
    config.optim.lr = 3e-3 if args.hf else 1e-2  # a 32-wide model takes a larger step
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 0
    config.checkpoint_every = 10
  return config
