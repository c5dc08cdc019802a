"""Deep MLP on mnist5k digits (flattened 28x28), trained with plain SGD + momentum.

  bigjax-train --config=mlp_mnist:depth=6 --workdir=runs/mlp_mnist

Args: depth (hidden layers, default 2), width (units per hidden layer, default 64), smoke (a few
steps, for tests). The activation, initializer and normalization are model kwargs
(`--config.model.kwargs.activation=sigmoid`, `kernel_init=normal|lecun|glorot|he`,
`norm=none|layernorm`); per-layer gradient norms are logged (`grad_norm/hidden_i`). SGD rather than
Adam because Adam rescales each parameter's step and so hides vanishing gradients: the
experiment in experiments/vanishing_gradients studies exactly that.
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, depth=2, width=64, smoke=False)
  config = config_lib.base_config()
  config.data.name = 'mnist5k'
  config.model.name = 'mlp'
  config.model.kwargs = dict(
    hidden=(args.width,) * args.depth, activation='relu', kernel_init='lecun', norm='none'
  )
  config.task.name = 'classification'
  config.optim.update(name='momentum', lr=0.05, momentum=0.9)
  config.batch_size = 64
  config.num_epochs = 5
  config.log_every = 10
  config.log_grad_norms = True
  config.checkpoint_every = 500
  if args.smoke:
    config.num_epochs = 1
    config.num_steps = 20
    config.log_every = 5
  return config
