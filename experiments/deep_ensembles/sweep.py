"""Deep ensembles (Lakshminarayanan et al. 2017): the members, on two datasets.

  bigjax-sweep --sweep=experiments/deep_ensembles/sweep.py --workdir=runs/deep_ensembles --jobs 1
  python experiments/deep_ensembles/run.py --workdir=runs/deep_ensembles

Datasets (DATASETS, one zipped axis; each holds out the end of its train split for temperature
scaling, run.py reads HELD_OUT):
- digits: scikit-learn's 8x8 digits, a Conv16-Pool-Dense64 CNN (configs/mnist_cnn.py's model with
  smaller widths), Adam 3e-3, batch 64, 400 steps on the first 1,150 training digits (the last
  287 held out), evaluated on the 360 test digits.
- mnist5k: configs/mnist_cnn.py as it is (Conv32-Pool-Conv64-Pool-Conv64-Dense64, Adam 1e-3,
  batch 64), 540 steps (10 epochs) on the first 3,500 training digits (the last 500 held out),
  evaluated on the 1,000 test digits.
Per dataset two settings x 5 seeds: dropout 0 (the ensemble members, each its own
initialisation and data order, as in the paper) and dropout 0.5 after the dense layer (for MC
dropout). run.py combines them with bigjax-ensemble's Python API.
"""

from bigjax import sweep

# dataset -> (the fields that differ, the held-out split run.py calibrates on)
DATASETS = {
  'digits': (
    {
      'data.train_split': 'train[:1150]',
      'model.kwargs.conv_features': (16,),
      'model.kwargs.pool_after': (True,),
      'optim.lr': 3e-3,
      'num_steps': 400,
    },
    'train[1150:]',
  ),
  'mnist5k': (
    {
      'data.train_split': 'train[:3500]',
      'model.kwargs.conv_features': (32, 64, 64),
      'model.kwargs.pool_after': (True, True, False),
      'optim.lr': 1e-3,
      'num_steps': 540,
    },
    'train[3500:]',
  ),
}
HELD_OUT = {name: held_out for name, (_, held_out) in DATASETS.items()}
LABELS = {  # short names in the run directories
  'data.train_split': 'train',
  'model.kwargs.conv_features': 'conv',
  'model.kwargs.pool_after': 'pool',
  'optim.lr': 'lr',
  'num_steps': 'steps',
}


def get_sweep():
  names = list(DATASETS)
  per_dataset = [
    sweep.axis(field, [DATASETS[n][0][field] for n in names], label=label)
    for field, label in LABELS.items()
  ]
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'model.kwargs.dense_features': (64,),
      'log_every': 100,
      'checkpoint_every': 1000,  # the final step is always saved
    },
    settings=sweep.product(
      sweep.zip_axes(sweep.axis('data.name', names, label='data'), *per_dataset),
      sweep.axis('model.kwargs.dropout', [0.0, 0.5], label='dropout'),
    ),
    seeds=[0, 1, 2, 3, 4],
    metrics=['accuracy', 'loss'],
  )
