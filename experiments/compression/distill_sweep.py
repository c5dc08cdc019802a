"""Distillation (Hinton et al. 2015): a 784-32-10 MLP student taught by the mnist_cnn teacher.

  bigjax-train --config=mnist_cnn --workdir=runs/compression/teacher
  bigjax-sweep --sweep=experiments/compression/distill_sweep.py --workdir=runs/compression/distill

configs/mnist_mlp_student.py (25k parameters, Adam 1e-3, 10 epochs) on mnist5k, with
config.distill.teacher = the mnist_cnn run above (93k parameters, seed 0). Settings (T, alpha):
(1, 1.0) = the student trained alone (the KL term has weight 0), then alpha 0.5 at T = 1, 4, 8
and alpha 0.1 at T = 4 (a 2-core machine shared with other work: 5 settings, not the full grid).
3 seeds.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_mlp_student',
    overrides={'distill.teacher': 'runs/compression/teacher'},
    settings=sweep.zip_axes(
      sweep.axis('distill.temperature', [1.0, 1.0, 4.0, 4.0, 8.0], label='T'),
      sweep.axis('distill.alpha', [1.0, 0.5, 0.5, 0.1, 0.5], label='alpha'),
    ),
    seeds=[0, 1, 2],
    metrics=['accuracy', 'loss', 'train/distill_kl'],
  )
