"""The CNN version of experiments/fedavg/sweep.py (McMahan et al. 2017's Table 2 model, smaller):
not run to the end on the shared 2-vCPU machine (one run of eight took 14 min: XLA:CPU runs the
kernel gradient of a conv vmapped over clients ~14x slower than one batched conv, measured), meant
for a GPU. Rounds to a target test accuracy, IID vs pathological non-IID clients.

  bigjax-sweep --sweep=experiments/fedavg/cnn_sweep.py --workdir=runs/fedavg_cnn

K = 100 clients over mnist5k's 4,000 training digits (40 each): 'iid' (a random 40) or 'shards'
(sorted by label, 200 single-label shards of ~20, 2 per client). A small CNN (Conv16-Pool-Conv32-
Pool-Dense64-Dense10, 3x3 kernels; the paper's has 5x5 kernels, 32/64 channels and Dense512),
client SGD at lr 0.1 for every algorithm (the paper tuned lr per setting; this CPU budget could
not). Presets (zipped): FedSGD (E=1, B=inf) and FedAvg (B=10, E=1 or 5) at C=0.1, and FedAvg E=1
at C=1.0, each with its own round cap and eval interval (the resolution of 'rounds to target').
The plot hook writes
rounds_to_target.md/.csv and accuracy_vs_rounds.png.
"""

from bigjax import sweep
from bigjax.federated import report

TARGETS = (0.9, 0.95)

CNN = {
  'model.kwargs.conv_features': (16, 32),
  'model.kwargs.pool_after': (True, True),
  'model.kwargs.dense_features': (64,),
  'optim.name': 'sgd',
  'optim.lr': 0.1,
}


def plot(runs, outdir):
  report.rounds_to_target(runs, TARGETS, outdir)
  report.plot_accuracy_vs_rounds(runs, outdir, TARGETS)


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      **CNN,
      'federated.clients': 100,
      'federated.shards_per_client': 2,
      'log_every': 1,
      'checkpoint_every': 10,
    },
    settings=sweep.product(
      sweep.zip_axes(
        sweep.axis('federated.client_fraction', [0.1, 0.1, 0.1, 1.0], label='C'),
        sweep.axis('federated.local_epochs', [1, 1, 5, 1], label='E'),
        sweep.axis('federated.local_batch_size', [0, 10, 10, 10], label='B'),
        sweep.axis('num_steps', [60, 40, 20, 8], label='rounds'),
        sweep.axis('eval_every', [4, 2, 1, 1], label='eval'),
      ),
      sweep.axis('federated.split', ['iid', 'shards'], label='split'),
    ),
    seeds=[0],
    metrics=['accuracy', 'loss'],
    plot=plot,
  )
