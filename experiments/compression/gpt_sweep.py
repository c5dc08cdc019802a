"""Pruning and int8 weight-only quantization of the Shakespeare GPT, 3 seeds.

  bigjax-sweep --sweep=experiments/compression/gpt_sweep.py --workdir=runs/compression/gpt --jobs 1

configs/gpt_shakespeare.py:size=small (4 layers, 4 heads, 128 wide, context 128, batch 32, AdamW
with warmup + cosine), 300 steps, evaluated once at the end on the first 1,024 validation windows
(loss in nats per byte, bits_per_byte). Settings (zipped, `method` names them):
- dense: no pruning;
- magnitude 0.5 / 0.9, one-shot: global magnitude pruning of the transformer's kernels
  (PARAMS: attention and MLP projections; embeddings, norms and biases stay dense) once after 150
  steps, then 150 steps with the mask;
- magnitude 0.5 / 0.9, gradual: Zhu & Gupta's cubic schedule from step 60 to 240, every 20 steps;
- n_m 2:4 after 150 steps: in every 4 consecutive inputs of each kernel the 2 largest weights
  (an attention output projection groups along its heads x head_dim inputs).
Every run is also quantized at the end (config.quantize.mode=ptq, weight-only int8 of the same
kernels, activations float): `quant_loss` beside `loss`, bytes of float32 against int8 kernels.
"""

from bigjax import sweep

PARAMS = 'stack/.*/kernel$'  # the projections' kernels (config.prune.params, a search regex)


def get_sweep():
  return sweep.Sweep(
    config='gpt_shakespeare:size=small',
    overrides={
      'num_steps': 300,
      'eval_every': 0,
      'log_every': 50,
      'checkpoint_every': 150,
      'data.eval_max_examples': 1024,
      'optim.warmup_steps': 30,
      'prune.params': PARAMS,
      'prune.frequency': 20,
      'quantize.mode': 'ptq',
      'quantize.act_dtype': '',
      'quantize.layers': 'stack/.*',
    },
    settings=sweep.zip_axes(
      sweep.axis(
        'prune.method',
        ['', 'magnitude', 'magnitude', 'magnitude', 'magnitude', 'n_m'],
        label='method',
      ),
      sweep.axis('prune.sparsity', [0.0, 0.5, 0.9, 0.5, 0.9, 0.5], label='sparsity'),
      sweep.axis(
        'prune.schedule',
        ['one_shot', 'one_shot', 'one_shot', 'gradual', 'gradual', 'one_shot'],
        label='schedule',
      ),
      sweep.axis('prune.begin_step', [150, 150, 150, 60, 60, 150], label='begin'),
      sweep.axis('prune.end_step', [0, 0, 0, 240, 240, 0], label='end'),
    ),
    seeds=[0, 1, 2],
    metrics=[
      'loss',
      'bits_per_byte',
      'quant_loss',
      'train/sparsity',
      'float_bytes',
      'quant_bytes',
    ],
    derived={'quant_gap': lambda m: m['quant_loss'] - m['loss']},
    plot=plot,
  )


def plot(runs, outdir):
  """loss_vs_sparsity.png: mean validation loss (error bars: population std over seeds) against
  the sparsity of the pruned kernels: one-shot and gradual magnitude pruning as lines from the
  dense model, 2:4 as one point."""
  import os

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  done = [r for r in runs if r.finished]

  def losses(method, schedule):
    mine = [
      r
      for r in done
      if r.values['prune.method'] in ('', method)
      and (r.values['prune.method'] == '' or r.values['prune.schedule'] == schedule)
    ]
    levels = sorted({r.values['prune.sparsity'] for r in mine})
    per = [[r.metrics['loss'] for r in mine if r.values['prune.sparsity'] == s] for s in levels]
    return levels, [np.mean(p) for p in per], [np.std(p) for p in per]

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method, schedule, label, fmt in (
    ('magnitude', 'one_shot', 'magnitude, one-shot at step 150', 'o-'),
    ('magnitude', 'gradual', 'magnitude, gradual 60-240', 's-'),
    ('n_m', 'one_shot', '2:4 at step 150', 'D'),
  ):
    levels, mean, std = losses(method, schedule)
    if method == 'n_m':  # the 2:4 point alone, not joined to the dense one
      levels, mean, std = levels[1:], mean[1:], std[1:]
    ax.errorbar(levels, mean, std, fmt=fmt, ms=4, capsize=3, label=label)
  ax.set(xlabel='sparsity of the pruned kernels', ylabel='validation loss (nats per byte)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'loss_vs_sparsity.png'), dpi=120)
  plt.close(fig)
