"""A GPT language model on LM1B (the One Billion Word benchmark) with a SentencePiece tokenizer.

  bigjax-train --config=lm1b_gpt --workdir=runs/lm1b_gpt --config.data.data_dir=DIR

Needs TFDS `lm1b` prepared as array_record in DIR (`tfds build lm1b --file_format=array_record
--data_dir=DIR`). The tokenizer is a 32k-piece SentencePiece BPE trained on at most 16 MB of the
train split, read by random access at evenly spaced records (bigjax.data.text.sample_texts; the
split is never read whole), and cached beside the data (bigjax/data/tokenizers.py). The sentences
are packed (config.data.pack, bigjax/data/packing.py): tokenized once, streaming, into a uint16
token file beside the tokenizer (~1.6 GB for lm1b's ~0.8B tokens) and read as 128-token windows
whose attention and loss never cross a sentence; host memory does not grow with the dataset.

Model: a pre-LN decoder, 6 layers, 8 heads, width 512, MLP 2048, context 128 (the shape of
Flax's lm1b example). Reference results on LM1B test: Transformer-XL Base (0.46B parameters)
23.5 perplexity, Large 21.8 (Dai et al. 2019); the LSTM baselines of Jozefowicz et al. (2016) 30.
This much smaller model is expected well above those; not run here (no lm1b, no accelerator).
C4 instead: --config.data.name=c4/en --config.data.eval_split=validation (TFDS c4 prepared as
array_record). Its packed token store is written in one single-threaded pass over the split on
first use: for c4/en's ~150B tokens that is ~0.3 TB and days of tokenizing, so build it once,
ahead of training, or start from a slice (--config.data.train_split='train[:1%]').
Args: smoke (a tiny model with the byte tokenizer for a few steps, for tests).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.update(
    name='lm1b',
    view='lm',
    pack=True,
    train_split='train',
    eval_split='test',
    seq_len=128,
    tokenizer='sentencepiece',
    vocab_size=32_000,
  )
  config.model.name = 'gpt'
  config.model.kwargs = dict(
    num_layers=6,
    num_heads=8,
    embed_dim=512,
    mlp_dim=2048,
    dropout=0.1,
    positions='learned',
    pre_ln=True,
    max_len=config.data.get_ref('seq_len'),
  )
  config.task.name = 'causal_lm'
  config.optim.update(
    name='adamw',
    lr=1.6e-3,
    b2=0.98,
    weight_decay=0.1,
    clip_norm=1.0,
    schedule='warmup_cosine',
    warmup_steps=1000,
  )
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 0
  config.num_steps = 100_000
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000
  if args.smoke:
    config.data.update(seq_len=16, tokenizer='bytes', vocab_size=0, eval_max_examples=16)
    config.model.kwargs.update(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, dropout=0.0)
    config.optim.warmup_steps = 0
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 2
  return config
