"""MLP with ReLU hidden layers and a sigmoid output (binary cross-entropy) on breast cancer.

  bigjax-train --config=mlp_breast_cancer --workdir=runs/mlp_breast_cancer

Features are standardised with the training split's statistics; 455 train / 114 test examples.
The sigmoid is applied inside the loss (numerically stable logits); predictions are sigmoid(logit).
Reaches about 97% test accuracy in a few seconds on a CPU (see README).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.name = 'breast_cancer'
  config.data.standardize = True
  config.model.name = 'mlp'
  config.model.kwargs = dict(hidden=(32, 16), activation='relu')
  config.task.name = 'classification'
  config.task.kwargs = dict(binary=True)
  config.optim.name = 'adam'
  config.optim.lr = 1e-3
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 50
  config.log_every = 14
  config.checkpoint_every = 140
  if args.smoke:
    config.num_epochs = 3
  return config
