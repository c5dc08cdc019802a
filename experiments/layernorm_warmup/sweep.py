"""Post-LN vs pre-LN Transformer LM, with and without learning-rate warmup, at two learning rates.

  bigjax-sweep --sweep=experiments/layernorm_warmup/sweep.py --workdir=runs/layernorm_warmup

Claim under test (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"):
post-LN Transformers need a warmup stage to train well; pre-LN ones train without it.
configs/gpt_shakespeare.py:size=small with 6 layers (128 wide, 4 heads, byte-level, context 64,
batch 32), AdamW (betas 0.9/0.99, weight decay 0.1, clipping 1.0) with cosine decay for 400
steps; warmup 0 or 100 steps; peak lr 1e-3 or 3e-3; seeds 0 and 1. Reports validation loss
(nats per byte) on 256 windows, evaluated every 100 steps.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='gpt_shakespeare:size=small',
    overrides={
      'model.kwargs.num_layers': 6,
      'model.kwargs.max_len': 64,
      'data.seq_len': 64,
      'num_steps': 400,
      'eval_every': 100,
      'log_every': 10,
      'checkpoint_every': 100,
      'data.eval_max_examples': 256,
    },
    settings=sweep.product(
      sweep.axis('model.kwargs.pre_ln', [False, True], label='pre_ln'),
      sweep.axis('optim.warmup_steps', [0, 100], label='warmup'),
      sweep.axis('optim.lr', [1e-3, 3e-3], label='lr'),
    ),
    seeds=[0, 1],
    metrics=['loss', 'bits_per_byte', 'accuracy'],
  )
