"""Small Vision Transformer on MNIST: 7x7 patches (16 tokens + class token), 4 pre-LN layers, 64 wide.

  bigjax-train --config=vit_mnist --workdir=runs/vit_mnist

Args: data=mnist5k (default, offline) | tfds (full MNIST); smoke. AdamW 1e-3 with warmup + cosine.
"""

from bigjax import config_lib


def get_config(arg=None):
  args = config_lib.parse(arg, data='mnist5k', smoke=False)
  config = config_lib.base_config()
  config.data.name = {'mnist5k': 'mnist5k', 'tfds': 'mnist'}.get(args.data, args.data)
  config.model.name = 'vit'
  config.model.kwargs = dict(
    patch_size=7,
    num_layers=4,
    num_heads=4,
    embed_dim=64,
    mlp_dim=128,
    pool='cls',
    dropout=0.0,
    scan=False,
    remat='none',
    attention='xla',
    dtype='float32',
    param_dtype='float32',
  )
  config.task.name = 'classification'
  config.optim.update(
    name='adamw',
    lr=1e-3,
    weight_decay=0.05,
    schedule='warmup_cosine',
    warmup_steps=100,
    clip_norm=1.0,
  )
  config.batch_size = 64
  config.num_epochs = 20
  config.checkpoint_every = 500
  if args.smoke:
    config.model.kwargs.update(num_layers=1, embed_dim=32, mlp_dim=64)
    config.num_steps = 30
    config.optim.update(lr=3e-3, warmup_steps=5)
    config.log_every = 5
    config.checkpoint_every = 10
  return config
