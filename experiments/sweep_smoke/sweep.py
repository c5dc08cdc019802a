"""A tiny sweep for tests/test_sweep.py: the breast-cancer MLP smoke config, 2 settings x 2 seeds.

  bigjax-sweep --sweep=experiments/sweep_smoke/sweep.py --workdir=runs/sweep_smoke

Each run is 210 steps (15 epochs, a checkpoint every 14 steps), about 12 s on a CPU, most of it
start-up; long enough for the test to kill the sweep in the middle of a run. The two settings zip a
learning rate with a warmup length (lr=0.001,warmup=0 and lr=0.01,warmup=5); the overrides include a
tuple and a boolean to exercise how values are passed on bigjax.train's command line.
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mlp_breast_cancer:smoke',
    overrides={
      'model.kwargs.hidden': (16, 8),
      'data.standardize': True,
      'num_epochs': 15,
      'log_every': 7,
      'checkpoint_every': 14,
    },
    settings=sweep.zip_axes(
      sweep.axis('optim.lr', [1e-3, 1e-2]), sweep.axis('optim.warmup_steps', [0, 5], label='warmup')
    ),
    seeds=[0, 1],
    metrics=['accuracy', 'loss', 'roc_auc'],
  )
