"""A small MLP student for distillation on mnist5k: 784-32-10 ReLU, Adam 1e-3, batch 64, 10 epochs.

  bigjax-train --config=mnist_mlp_student --workdir=runs/student \
      [--config.distill.teacher=runs/compression/teacher]

25,450 parameters (the mnist_cnn teacher has 93,322); trained alone it is the baseline of
experiments/compression/distill_sweep.py. Args: smoke (a few steps, for tests).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.name = 'mnist5k'
  config.model.name = 'mlp'
  config.model.kwargs = dict(hidden=(32,), activation='relu', kernel_init='lecun', norm='none')
  config.task.name = 'classification'
  config.optim.update(name='adam', lr=1e-3)
  config.batch_size = 64
  config.num_epochs = 10
  config.log_every = 31
  config.checkpoint_every = 310
  if args.smoke:
    config.num_epochs = 1
    config.num_steps = 20
    config.log_every = 5
    config.checkpoint_every = 10
  return config
