"""Dropout x weight decay x data augmentation on the MNIST CNN trained on 500 digits, 3 seeds.

  bigjax-sweep --sweep=experiments/regularization/sweep.py --workdir=runs/regularization

configs/mnist_cnn.py on the first 500 training digits (train[:500]) for 40 epochs (320 steps of 64)
with AdamW 1e-3; scored on the 1,000 test digits. Axes: dropout before the classifier (0 / 0.5),
decoupled weight decay (0 / 0.5, i.e. each step shrinks weights by lr x 0.5), augmentation
(off / random crop with 2-pixel padding, rotation up to 10 degrees, scaling up to 10%).
train/accuracy is the mean accuracy on the training batches of the last log interval (the last
epoch), as trained (with dropout and augmentation on); gap = train/accuracy - accuracy.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'data.train_split': 'train[:500]',
      'num_epochs': 40,
      'log_every': 8,
      'checkpoint_every': 160,
      'optim.name': 'adamw',
      'augment.crop_padding': 2,
      'augment.max_rotate_degrees': 10.0,
      'augment.max_scale': 0.1,
    },
    settings=sweep.product(
      sweep.axis('model.kwargs.dropout', [0.0, 0.5]),
      sweep.axis('optim.weight_decay', [0.0, 0.5], label='wd'),
      sweep.axis('augment.enabled', [False, True], label='augment'),
    ),
    seeds=[0, 1, 2],
    metrics=['accuracy', 'train/accuracy', 'loss'],
    derived={'gap': lambda m: m['train/accuracy'] - m['accuracy']},
  )
