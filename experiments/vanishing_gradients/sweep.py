"""Deep MLPs on mnist5k: depth x activation x {plain init, scaled init, + LayerNorm}, SGD.

  bigjax-sweep --sweep=experiments/vanishing_gradients/sweep.py --workdir=runs/vanishing_gradients

configs/mlp_mnist.py (64-unit hidden layers, SGD + momentum 0.9, lr 0.05, batch 64, 5 epochs = 310
steps, one seed). Axes: 2 / 6 / 12 hidden layers; sigmoid / tanh / ReLU; and the initialization
variant, zipped from kernel_init and norm: plain N(0, 0.01^2) ('normal'), Glorot (fan-avg),
He (fan-in x 2), and plain N(0, 0.01^2) or Glorot followed by LayerNorm after every hidden layer.
Gradient norms per layer come from the first logged step (the mean over steps 1-10). Besides the
runner's table it draws grad_norms.png (gradient norm against layer, 12-layer nets) and writes
grad_norms.md (first-layer / output-layer gradient-norm ratio per setting).
"""

import os

import numpy as np

from bigjax import sweep

VARIANTS = ['normal', 'glorot', 'he', 'normal', 'glorot']
NORMS = ['none', 'none', 'none', 'layernorm', 'layernorm']


def _variant(run):
  init, norm = run.values['model.kwargs.kernel_init'], run.values['model.kwargs.norm']
  return f'{init} + LayerNorm' if norm == 'layernorm' else init


def _layer_norms(run):
  """Gradient norm of hidden_0 .. hidden_{L-1}, output at the first logged step -> (L + 1,)."""
  first = next(h for h in run.results['history'] if h['split'] == 'train')
  depth = len(run.values['model.kwargs.hidden'])
  return np.array(
    [first[f'grad_norm/hidden_{i}'] for i in range(depth)] + [first['grad_norm/output']]
  )


def plot(runs, outdir):
  """grad_norms.png (12-layer nets: norm against layer per variant) and grad_norms.md."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  done = [r for r in runs if r.finished]
  activations = list(dict.fromkeys(r.values['model.kwargs.activation'] for r in done))
  deepest = max(len(r.values['model.kwargs.hidden']) for r in done)
  fig, axes = plt.subplots(1, len(activations), figsize=(4.2 * len(activations), 3.6), sharey=True)
  for ax, act in zip(np.atleast_1d(axes), activations):
    for r in done:
      if (
        r.values['model.kwargs.activation'] == act
        and len(r.values['model.kwargs.hidden']) == deepest
      ):
        norms = _layer_norms(r)
        ax.semilogy(
          np.arange(len(norms)),
          np.maximum(norms, 1e-30),
          marker='o',
          ms=3,
          label=f"{_variant(r)} (acc {r.metrics['accuracy']:.2f})",
        )
    ax.set(
      title=f'{act}, {deepest} hidden layers', xlabel='layer (0 = first hidden, last = output)'
    )
    ax.legend(fontsize=7)
  np.atleast_1d(axes)[0].set_ylabel('gradient norm at the start')
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, 'grad_norms.png'), dpi=120)
  lines = [
    '| depth | activation | init | first / output grad norm | test accuracy |',
    '|---|---|---|---|---|',
  ]
  for r in done:
    norms = _layer_norms(r)
    lines.append(
      f"| {len(r.values['model.kwargs.hidden'])} | {r.values['model.kwargs.activation']}"
      f" | {_variant(r)} | {norms[0] / norms[-1]:.2e} | {r.metrics['accuracy']:.3f} |"
    )
  with open(os.path.join(outdir, 'grad_norms.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def get_sweep():
  return sweep.Sweep(
    config='mlp_mnist',
    settings=sweep.product(
      sweep.axis('model.kwargs.hidden', [(64,) * 2, (64,) * 6, (64,) * 12], label='hidden'),
      sweep.axis('model.kwargs.activation', ['sigmoid', 'tanh', 'relu'], label='act'),
      sweep.zip_axes(
        sweep.axis('model.kwargs.kernel_init', VARIANTS, label='init'),
        sweep.axis('model.kwargs.norm', NORMS, label='norm'),
      ),
    ),
    seeds=[0],
    metrics=['accuracy', 'loss'],
    plot=plot,
  )
