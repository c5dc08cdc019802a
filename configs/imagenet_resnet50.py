"""ResNet-50 on ImageNet (ILSVRC-2012), the Goyal et al. (2017) recipe.

  bigjax-train --config=imagenet_resnet50 --workdir=runs/imagenet_resnet50 \
    --config.data.data_dir=DIR

Needs TFDS `imagenet2012` prepared as array_record in DIR (`tfds build imagenet2012
--file_format=array_record --data_dir=DIR` after placing the manual download), or a folder
written by `bigjax-prepare --input=IMAGENET_DIR` (then --config.data.name=dir:PATH). Records are
streamed (config.data.load='auto' streams encoded images): each JPEG is decoded in grain's worker
processes, inception-cropped to 224 px and flipped for training, resized to 256 and centre-cropped
to 224 for evaluation (bigjax/data/images.py).

Recipe (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Table/Fig. 1 baseline, k=8 x n=32):
batch 256, SGD momentum 0.9, lr 0.1 x batch/256 with 5 epochs of linear warmup, decayed 10x at
epochs 30, 60 and 80 of 90, weight decay 1e-4 (here on kernels only: bigjax.optim.decay_mask),
reference top-1 76.3% (23.7% error). Not run here (no ImageNet, no accelerator on this machine).
Args: smoke (a narrow ResNet-50 at 32 px for a few steps, for tests).
"""

from bigjax import config_lib

EPOCH_STEPS = 1_281_167 // 256  # ILSVRC-2012 train images / batch size


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.update(
    name='imagenet2012', eval_split='validation', image_size=224, workers=8, threads=2, prefetch=4
  )
  config.model.name = 'resnet'
  config.model.kwargs = dict(depth=50, stem='imagenet', width=64)
  config.task.name = 'classification'
  config.optim.update(
    name='momentum',
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    schedule='step',
    step_boundaries=(30 / 90, 60 / 90, 80 / 90),
    step_decay=0.1,
    warmup_steps=5 * EPOCH_STEPS,
  )
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_epochs = 90
  config.log_every = 100
  config.eval_every = 5 * EPOCH_STEPS
  config.checkpoint_every = 2000
  if args.smoke:
    config.data.update(image_size=32, workers=0, threads=1)
    config.model.kwargs.width = 8
    config.optim.warmup_steps = 1
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 0
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 2
  return config
