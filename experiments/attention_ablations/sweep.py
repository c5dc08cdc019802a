"""Table 3 of "Attention Is All You Need" (rows A, D, E) at small scale on the Shakespeare LM.

  bigjax-sweep --sweep=experiments/attention_ablations/sweep.py --workdir=runs/attention_ablations

Base model (like the paper's base: sinusoidal positions, dropout 0.1, label smoothing 0.1):
configs/gpt_shakespeare.py:size=small (4 layers, 128 wide, byte-level, context 64, batch 32),
4 heads, AdamW 1e-3 with 100 warmup steps and cosine decay, 400 steps, one seed. Each row changes
one thing: (A) 1 / 2 / 8 heads at the same width (head size 128 / 64 / 16), (D) dropout 0 / 0.2
and label smoothing 0 / 0.2, (E) learned instead of sinusoidal positions. Reports validation loss
(nats per byte, without smoothing) on 256 windows.
"""

from bigjax import sweep

#        row    heads dropout smoothing positions
ROWS = [
  ('base', 4, 0.1, 0.1, 'sinusoidal'),
  ('A', 1, 0.1, 0.1, 'sinusoidal'),
  ('A', 2, 0.1, 0.1, 'sinusoidal'),
  ('A', 8, 0.1, 0.1, 'sinusoidal'),
  ('D', 4, 0.0, 0.1, 'sinusoidal'),
  ('D', 4, 0.2, 0.1, 'sinusoidal'),
  ('D', 4, 0.1, 0.0, 'sinusoidal'),
  ('D', 4, 0.1, 0.2, 'sinusoidal'),
  ('E', 4, 0.1, 0.1, 'learned'),
]


def get_sweep():
  _, heads, dropout, smoothing, positions = (list(c) for c in zip(*ROWS))
  return sweep.Sweep(
    config='gpt_shakespeare:size=small',
    overrides={
      'model.kwargs.max_len': 64,
      'data.seq_len': 64,
      'num_steps': 400,
      'eval_every': 0,
      'log_every': 10,
      'checkpoint_every': 200,
      'data.eval_max_examples': 256,
    },
    settings=sweep.zip_axes(
      sweep.axis('model.kwargs.num_heads', heads, label='heads'),
      sweep.axis('model.kwargs.dropout', dropout, label='dropout'),
      sweep.axis('task.kwargs.label_smoothing', smoothing, label='smoothing'),
      sweep.axis('model.kwargs.positions', positions, label='positions'),
    ),
    seeds=[0],
    metrics=['loss', 'bits_per_byte', 'accuracy'],
  )
