"""The classic Keras MNIST CNN on mnist5k: test accuracy against training epochs, 3 seeds.

  bigjax-sweep --sweep=experiments/mnist_cnn_baseline/sweep.py --workdir=runs/mnist_cnn_baseline

configs/mnist_cnn.py as shipped (Adam 1e-3, batch 64) for 1, 2, 5 and 10 epochs of the 4,000
training digits; each run is scored on the 1,000 test digits.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    settings=sweep.axis('num_epochs', [1, 2, 5, 10], label='epochs'),
    seeds=[0, 1, 2],
    metrics=['accuracy', 'loss'],
  )
