"""Unstructured magnitude pruning of the MNIST CNN: sparsity x {one-shot, gradual}, 3 seeds.

  bigjax-sweep --sweep=experiments/compression/prune_sweep.py --workdir=runs/compression/prune

configs/mnist_cnn.py (620 steps of Adam 1e-3), global magnitude pruning of every kernel
(config.prune.params='kernel$'). one_shot: the trained weights are pruned once after 310 steps
(half of training; Han et al. 2015's prune-then-retrain), then trained 310 more with the mask.
gradual: Zhu & Gupta 2017's cubic schedule from step 124 to 434, every 31 steps (10 prunings),
then 186 steps with the final mask. train/sparsity is the fraction of exact zeros in the pruned
kernels at the last logged step, measured on the weights.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'prune.method': 'magnitude',
      'prune.scope': 'global',
      'prune.end_step': 434,
      'prune.frequency': 31,
      'log_every': 31,
      'checkpoint_every': 310,
    },
    settings=sweep.product(
      sweep.axis('prune.sparsity', [0.5, 0.75, 0.9, 0.95, 0.98], label='sparsity'),
      sweep.zip_axes(
        sweep.axis('prune.schedule', ['one_shot', 'gradual'], label='schedule'),
        sweep.axis('prune.begin_step', [310, 124], label='begin'),
      ),
    ),
    seeds=[0, 1, 2],
    metrics=['accuracy', 'loss', 'train/sparsity'],
    plot=plot,
  )


def plot(runs, outdir):
  """accuracy_vs_sparsity.png: mean test accuracy (error bars: population std over seeds) against
  the sparsity of the pruned kernels, one line per schedule."""
  import os

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  done = [r for r in runs if r.finished]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for schedule, label in (
    ('one_shot', 'one-shot at step 310'),
    ('gradual', 'gradual, steps 124-434'),
  ):
    mine = [r for r in done if r.values['prune.schedule'] == schedule]
    levels = sorted({r.values['prune.sparsity'] for r in mine})
    accs = [
      [r.metrics['accuracy'] for r in mine if r.values['prune.sparsity'] == s] for s in levels
    ]
    ax.errorbar(
      levels,
      [np.mean(a) for a in accs],
      [np.std(a) for a in accs],
      marker='o',
      ms=3,
      capsize=3,
      label=label,
    )
  ax.set(xlabel='sparsity of the pruned kernels', ylabel='test accuracy (mnist5k)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'accuracy_vs_sparsity.png'), dpi=120)
  plt.close(fig)
