"""The centralised baseline of experiments/fedavg/sweep.py: the same 2NN and SGD (lr 0.1, batch
10 = the clients' B) on the pooled 4,000 training digits, evaluated every 100 steps (1,000
examples, a quarter epoch), 10 epochs.

  bigjax-sweep --sweep=experiments/fedavg/centralised_sweep.py --workdir=runs/fedavg_central

The plot hook writes steps_to_target.md/.csv (steps of batch 10; 400 steps = 1 epoch) and
accuracy_vs_rounds.png with steps on the x axis.
"""

import importlib.util
import os

from bigjax import sweep
from bigjax.federated import report

_spec = importlib.util.spec_from_file_location(
  'fedavg_sweep', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sweep.py')
)
_fed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fed)  # the federated sweep's model and targets: stated once


def plot(runs, outdir):
  report.rounds_to_target(runs, _fed.TARGETS, outdir, name='steps_to_target')
  report.plot_accuracy_vs_rounds(runs, outdir, _fed.TARGETS, xlabel='step (batch 10)')


def get_sweep():
  return sweep.Sweep(
    config='mlp_mnist',
    overrides={
      **_fed.MODEL,
      'batch_size': 10,
      'num_steps': 4000,
      'eval_every': 100,
      'log_every': 100,
      'checkpoint_every': 1000,
    },
    seeds=[0],
    metrics=['accuracy', 'loss'],
    plot=plot,
  )
