"""Small CNN on CIFAR-10 with augmentation: Conv32-Pool-Conv64-Pool-Dense64-Dense10.

  bigjax-train --config=cifar10_cnn --workdir=runs/cifar10_cnn

Needs TFDS cifar10 prepared in config.data.data_dir (`tfds build cifar10 --file_format=array_record`
on a machine with internet). Augmentation: random crop (pad 4), horizontal flip, rotation up to 10
degrees, scaling up to 10%. Expected: ~70% test accuracy after 20 epochs (a figure from the classic
Keras/TensorFlow tutorials of this model; not measured here, CIFAR-10 cannot be downloaded on our CI).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.name = 'cifar10'
  config.augment = dict(
    enabled=True, crop_padding=4, flip=True, max_rotate_degrees=10.0, max_scale=0.1
  )
  config.model.name = 'cnn'
  config.model.kwargs = dict(conv_features=(32, 64), pool_after=(True, True), dense_features=(64,))
  config.task.name = 'classification'
  config.optim.name = 'adam'
  config.optim.lr = 1e-3
  config.batch_size = 128
  config.num_epochs = 20
  config.checkpoint_every = 1000
  if args.smoke:
    config.num_steps = 10
    config.log_every = 5
    config.checkpoint_every = 5
  return config
