"""ResNet-18 (CIFAR stem) on CIFAR-10: SGD momentum 0.9, lr 0.1 with warmup + cosine, wd 5e-4.

  bigjax-train --config=cifar10_resnet --workdir=runs/cifar10_resnet

Needs TFDS cifar10 prepared in config.data.data_dir. Args: depth=18|34|50; smoke (a narrow ResNet
for a few steps). The standard recipe (200 epochs, this augmentation) is reported at ~95% in the
literature; we have not run it here (no GPU, no CIFAR-10 download on CI).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, depth=18, smoke=False)
  config = config_lib.base_config()
  config.data.name = 'cifar10'
  config.augment = dict(
    enabled=True, crop_padding=4, flip=True, max_rotate_degrees=0.0, max_scale=0.0
  )
  config.model.name = 'resnet'
  config.model.kwargs = dict(depth=args.depth, stem='cifar', width=64)
  config.task.name = 'classification'
  config.task.kwargs = dict(label_smoothing=0.0)
  config.optim = dict(
    config.optim.to_dict(),
    name='nesterov',
    lr=0.1,
    momentum=0.9,
    schedule='warmup_cosine',
    warmup_steps=390,
    weight_decay=5e-4,
  )
  config.batch_size = 128
  config.num_epochs = 200
  config.checkpoint_every = 2000
  if args.smoke:
    config.model.kwargs.width = 8
    config.num_steps = 6
    config.log_every = 3
    config.checkpoint_every = 3
  return config
