"""Adversarial training on mnist5k (Madry et al. 2018): standard vs FGSM-trained vs PGD-trained CNN,
robust accuracy under FGSM and PGD at eps 0.05, 0.1, 0.2, 0.3 (L-infinity, pixels in [0, 1]).

  bigjax-sweep --sweep=experiments/adversarial_mnist/sweep.py --workdir=runs/adversarial_mnist --jobs 1

configs/mnist_cnn.py (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, Adam 1e-3, batch 64) for 10
epochs (620 steps) on the 4,000 training digits. Training (config.adversarial, eps 0.3): none;
FGSM on half of each batch (Goodfellow et al. 2015's even mix); PGD-5 (step 2.5 * eps / 5, random
start) on the whole batch (Madry et al. train with PGD-40). Evaluation (config.eval_attacks) on the
first 500 test digits: FGSM and PGD-20 (step 2.5 * eps / 20, random start, 1 restart) where Madry
et al. evaluate with PGD-100 and 50 restarts. All scaled down for a shared 2-core CPU; 1 seed.
"""

from bigjax import sweep

EPS = (0.05, 0.1, 0.2, 0.3)


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'num_epochs': 10,
      'adversarial.eps': 0.3,
      'adversarial.steps': 5,
      'eval_attacks.methods': ('fgsm', 'pgd'),
      'eval_attacks.eps': EPS,
      'eval_attacks.steps': 20,
      'eval_attacks.max_examples': 500,
    },
    settings=sweep.zip_axes(
      sweep.axis('adversarial.method', ['', 'fgsm', 'pgd'], label='training'),
      sweep.axis('adversarial.fraction', [1.0, 0.5, 1.0], label='fraction'),
    ),
    seeds=[0],
    metrics=[
      'accuracy',
      *[f'robust_accuracy_fgsm_linf_{e:g}' for e in EPS],
      *[f'robust_accuracy_pgd_linf_{e:g}' for e in EPS],
    ],
    plot=plot,
  )


def plot(runs, outdir):
  """robust_accuracy_vs_eps.png: mean PGD-20 (solid) and FGSM (dashed) accuracy against eps, one
  colour per training method (eps 0 = clean accuracy)."""
  import os

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  done = [r for r in runs if r.finished]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  names = {'': 'standard', 'fgsm': 'FGSM-trained', 'pgd': 'PGD-5-trained'}
  for i, method in enumerate(names):
    mine = [r for r in done if r.values['adversarial.method'] == method]
    if not mine:
      continue
    for attack, style in (('pgd', '-'), ('fgsm', '--')):
      ys = [np.mean([r.metrics['accuracy'] for r in mine])] + [
        np.mean([r.metrics[f'robust_accuracy_{attack}_linf_{e:g}'] for r in mine]) for e in EPS
      ]
      label = f'{names[method]}, {attack.upper()}' + ('-20' if attack == 'pgd' else '')
      ax.plot((0, *EPS), ys, style, marker='o', ms=3, color=f'C{i}', label=label)
  ax.set(xlabel='eps (L-infinity, pixels in [0, 1])', ylabel='test accuracy under attack')
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'robust_accuracy_vs_eps.png'), dpi=120)
  plt.close(fig)
