"""Explaining trained models: gradient saliency, gradient x input, SmoothGrad, guided backprop,
integrated gradients, Grad-CAM, attention maps and rollout, SHAP; batched under jax.jit on the
run's mesh. `bigjax-explain` (cli.py) is the command line; from Python:

  from bigjax import explain
  run = explain.load_run('runs/mnist_cnn')
  out = explain.explain(run, 'smoothgrad', indices=range(8))   # {'attributions': (8, 28, 28, 1), ...}

Modules, one job each: scores (what is differentiated), gradients, integrated, gradcam, attention,
text, tabular (SHAP), similarity (rank correlation, SSIM), images (PNGs), run (loading a workdir
and checking inputs), api (the method table), cli.
"""

from bigjax.explain.api import METHODS, Options, explain, methods_for
from bigjax.explain.run import Run, load_run
from bigjax.explain.scores import Scorer

__all__ = ['METHODS', 'Options', 'Run', 'Scorer', 'explain', 'load_run', 'methods_for']
