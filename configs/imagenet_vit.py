"""ViT-S/16 on ImageNet (ILSVRC-2012), big_vision's plain-ViT i1k recipe.

  bigjax-train --config=imagenet_vit --workdir=runs/imagenet_vit --config.data.data_dir=DIR

Needs TFDS `imagenet2012` prepared as array_record in DIR, or a `bigjax-prepare` folder (then
--config.data.name=dir:PATH); records are streamed and decoded per example (inception crop + flip
at 224 px for training, resize 256 + centre crop 224 for evaluation).

Recipe (Beyer, Zhai, Kolesnikov 2022, "Better plain ViT baselines for ImageNet-1k";
big_vision/configs/vit_s16_i1k.py): ViT-S/16 (12 layers, 6 heads, width 384, MLP 1536), global
average pooling, batch 1024, AdamW (b2 0.999) lr 1e-3 with 10k warmup steps and cosine decay,
decoupled weight decay 1e-4, 90 epochs: 76.5% top-1; 300 epochs: 80.0%. That recipe also uses
RandAugment(2, 10) and Mixup 0.2, which bigjax does not implement, so expect it to land lower.
Not run here (no ImageNet, no accelerator). Args: smoke (a tiny ViT at 32 px for a few steps).
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, smoke=False)
  config = config_lib.base_config()
  config.data.update(
    name='imagenet2012', eval_split='validation', image_size=224, workers=8, threads=2, prefetch=4
  )
  config.model.name = 'vit'
  config.model.kwargs = dict(
    patch_size=16, num_layers=12, num_heads=6, embed_dim=384, mlp_dim=1536, pool='mean'
  )
  config.task.name = 'classification'
  config.optim.update(
    name='adamw',
    lr=1e-3,
    b2=0.999,
    weight_decay=1e-4,
    clip_norm=1.0,
    schedule='warmup_cosine',
    warmup_steps=10_000,
  )
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 90
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000
  if args.smoke:
    config.data.update(image_size=32, workers=0, threads=1)
    config.model.kwargs.update(patch_size=8, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64)
    config.optim.warmup_steps = 0
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 0
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 2
  return config
