"""Sanity checks for saliency maps (Adebayo et al. 2018): does a method's map change when the
model does?

- cascading randomisation: re-initialise the layers from the output down, one more at a time,
  and compare each copy's maps with the trained model's;
- data randomisation: compare with a model trained on permuted labels.

A method whose maps barely change is not explaining the model. Used by
experiments/saliency_sanity/run.py and tests/test_saliency_sanity.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.explain import gradcam, gradients, images, integrated, similarity
from bigjax.explain.scores import Scorer

METHODS = (
  'saliency',
  'grad_x_input',
  'smoothgrad',
  'integrated_gradients',
  'guided_backprop',
  'gradcam',
)


def layer_order(params: Any) -> list[str]:
  """The model's top-level parameter modules from the output down (conv_0 ... output reversed,
  in the order the CNN applies them: convs, dense layers, output)."""
  names = list(params)
  rank = lambda n: (
    {'conv': 0, 'dense': 1, 'output': 2}.get(n.split('_')[0], 1),
    int(n.split('_')[1]) if '_' in n else 0,
  )
  return sorted(names, key=rank, reverse=True)


def cascade(params: Any, fresh: Any) -> list[tuple[str, Any]]:
  """[(layer, params with that layer and every layer above it re-initialised from `fresh`)],
  from the output layer down to the first."""
  out, current = [], dict(params)
  for name in layer_order(params):
    current = dict(current, **{name: fresh[name]})
    out.append((name, current))
  return out


def maps(
  method: str,
  model: Any,
  variables: Any,
  x: jax.Array,
  target: jax.Array,
  *,
  seed: int = 0,
  steps: int = 64,
  num_samples: int = 32,
  layer: str | None = None,
) -> np.ndarray:
  """(B, H, W) signed maps of `method` (channels summed; Grad-CAM upsampled to H x W)."""
  scorer = Scorer(model)
  args: tuple[Any, ...] = (scorer, variables, x, target, {})
  if method == 'saliency':
    a = gradients.saliency(*args)
  elif method == 'grad_x_input':
    a = gradients.gradient_x_input(*args)
  elif method == 'smoothgrad':
    a = gradients.smoothgrad(*args, jax.random.key(seed), 0.15, num_samples)
  elif method == 'integrated_gradients':
    a = integrated.integrated_gradients(*args, jnp.zeros_like(x), steps)
  elif method == 'guided_backprop':
    a = gradients.guided_backprop(*args)
  elif method == 'gradcam':
    layer = layer or gradcam.feature_map_layers(model, variables, x)[-1]
    cam = np.asarray(gradcam.gradcam(*args, layer))
    return images.upsample(cam, tuple(x.shape[1:3]))
  else:
    raise ValueError(f'unknown method {method!r}; known: {", ".join(METHODS)}')
  return similarity.to_map(np.asarray(a), absolute=False)


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
  """Mean over examples of the Spearman rank correlation of |maps| ('spearman_abs'), of the
  signed maps ('spearman'), and the SSIM of the |maps| ('ssim'); maps (B, H, W)."""
  ra, oa = np.abs(reference), np.abs(other)
  return {
    'spearman_abs': float(similarity.spearman(ra, oa).mean()),
    'spearman': float(similarity.spearman(reference, other).mean()),
    'ssim': float(similarity.ssim(ra, oa).mean()),
  }


def cascading_similarity(
  method: str,
  model: Any,
  variables: Any,
  fresh_params: Any,
  x: jax.Array,
  target: jax.Array,
  **kwargs: Any,
) -> list[dict[str, Any]]:
  """[{'randomized': layer, 'spearman_abs', 'spearman', 'ssim'}] for each cascading step, from
  the output layer down (maps of the trained model vs the copy; `kwargs` go to `maps`)."""
  ref = maps(method, model, variables, x, target, **kwargs)
  rows = []
  for layer, params in cascade(variables['params'], fresh_params):
    other = maps(method, model, dict(variables, params=params), x, target, **kwargs)
    rows.append({'randomized': layer, **compare(ref, other)})
  return rows


def summary(rows: Sequence[dict[str, Any]], key: str = 'spearman_abs') -> float:
  """The last (fully randomised) step's similarity."""
  return float(rows[-1][key])
