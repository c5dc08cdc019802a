"""Deep ensembles (Lakshminarayanan et al. 2017) on scikit-learn's 8x8 digits: the members.

  bigjax-sweep --sweep=experiments/deep_ensembles/sweep.py --workdir=runs/deep_ensembles --jobs 1
  python experiments/deep_ensembles/run.py --workdir=runs/deep_ensembles

A Conv16-Pool-Dense64 CNN (configs/mnist_cnn.py's model with smaller widths), Adam 3e-3, batch 64,
400 steps on the first 1,150 training digits (the last 287 are held out for temperature scaling),
evaluated on the 360 test digits. Two settings x 5 seeds: dropout 0 (the ensemble members, each
its own initialisation and data order, as in the paper) and dropout 0.5 after the dense layer
(for MC dropout). run.py combines them with bigjax-ensemble's Python API.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'data.name': 'digits',
      'data.train_split': 'train[:1150]',
      'model.kwargs.conv_features': (16,),
      'model.kwargs.pool_after': (True,),
      'model.kwargs.dense_features': (64,),
      'optim.lr': 3e-3,
      'num_steps': 400,
      'log_every': 100,
      'checkpoint_every': 400,
    },
    settings=sweep.axis('model.kwargs.dropout', [0.0, 0.5], label='dropout'),
    seeds=[0, 1, 2, 3, 4],
    metrics=['accuracy', 'loss'],
  )
