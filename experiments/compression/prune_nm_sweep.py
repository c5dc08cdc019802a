"""N:M structured pruning of the MNIST CNN (2:4 and 1:8), one-shot after 310 of 620 steps.

  bigjax-sweep --sweep=experiments/compression/prune_nm_sweep.py --workdir=runs/compression/prune_nm

configs/mnist_cnn.py; in conv_1, conv_2, dense_0 and output, every group of m consecutive weights
along the kernel's input axis keeps its n largest (conv_0 has a single input channel, which no m
divides, so it stays dense: 288 of the 93k weights). Pruned once after 310 steps, then trained
310 more with the mask, as prune_sweep.py's one_shot rows. 3 seeds.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={
      'prune.method': 'n_m',
      'prune.schedule': 'one_shot',
      'prune.begin_step': 310,
      'prune.params': '(conv_1|conv_2|dense_0|output)/kernel',
      'log_every': 31,
      'checkpoint_every': 310,
    },
    settings=sweep.zip_axes(
      sweep.axis('prune.n', [2, 1], label='n'), sweep.axis('prune.m', [4, 8], label='m')
    ),
    seeds=[0, 1, 2],
    metrics=['accuracy', 'loss', 'train/sparsity'],
  )
