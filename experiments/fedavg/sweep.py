"""FedAvg vs FedSGD on mnist5k with McMahan et al. 2017's 2NN (MLP 200-200, their Table 1/2):
rounds to a target test accuracy, IID vs pathological non-IID clients, C in {0.1, 1.0}, E in {1, 5}.

  bigjax-sweep --sweep=experiments/fedavg/sweep.py --workdir=runs/fedavg

K = 100 clients over mnist5k's 4,000 training digits (40 each): 'iid' (a random 40) or 'shards'
(sorted by label, 200 single-label shards of ~20, 2 per client). Client SGD at lr 0.1 for every
algorithm (the paper tuned lr per setting; this CPU budget could not). Presets (zipped): FedSGD
(E=1, B=inf) and FedAvg (B=10, E=1 or 5) at C=0.1, and FedAvg B=10, E=1 or 5 at C=1.0, each with
its own round cap and eval interval (the resolution of 'rounds to target'). centralised_sweep.py
trains the same MLP on the pooled data; cnn_sweep.py is the CNN version (too slow for this
machine). The plot hook writes rounds_to_target.md/.csv and accuracy_vs_rounds.png.
"""

from bigjax import sweep
from bigjax.federated import report

TARGETS = (0.85, 0.9)

MODEL = {
  'model.kwargs.hidden': (200, 200),
  'optim.name': 'sgd',
  'optim.lr': 0.1,
  'log_grad_norms': False,
}


def plot(runs, outdir):
  report.rounds_to_target(runs, TARGETS, outdir)
  report.plot_accuracy_vs_rounds(runs, outdir, TARGETS)


def get_sweep():
  return sweep.Sweep(
    config='mlp_mnist',
    overrides={
      **MODEL,
      'federated.clients': 100,
      'federated.shards_per_client': 2,
      'log_every': 5,
      'checkpoint_every': 50,
    },
    settings=sweep.product(
      sweep.zip_axes(
        sweep.axis('federated.client_fraction', [0.1, 0.1, 0.1, 1.0, 1.0], label='C'),
        sweep.axis('federated.local_epochs', [1, 1, 5, 1, 5], label='E'),
        sweep.axis('federated.local_batch_size', [0, 10, 10, 10, 10], label='B'),
        sweep.axis('num_steps', [150, 80, 40, 20, 20], label='rounds'),
        sweep.axis('eval_every', [10, 5, 2, 2, 2], label='eval'),
      ),
      sweep.axis('federated.split', ['iid', 'shards'], label='split'),
    ),
    seeds=[0],
    metrics=['accuracy', 'loss'],
    plot=plot,
  )
