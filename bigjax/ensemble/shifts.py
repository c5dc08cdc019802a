"""Out-of-distribution inputs for uncertainty checks: shifted copies of an eval split's images.

Each shift maps host arrays {'inputs': (N, H, W, C) uint8, 'label': (N,)} to arrays of the same
shapes; labels are kept (they mean nothing for noise), since only the predictive entropy and
confidence are reported on shifted inputs.
"""

from __future__ import annotations

import numpy as np

from bigjax import registry
from bigjax.errors import UserError

SHIFTS = registry.Registry('input shifts', '--ood')


@SHIFTS.register('rotate90')
def _rotate90(inputs: np.ndarray) -> np.ndarray:
  """Each image turned by 90 degrees (digits that are no longer digits of any class)."""
  return np.ascontiguousarray(np.rot90(inputs, k=1, axes=(1, 2)))


@SHIFTS.register('noise')
def _noise(inputs: np.ndarray) -> np.ndarray:
  """Uniform random pixels (fixed seed 0), the eval split's shape and dtype."""
  return np.random.default_rng(0).integers(0, 256, size=inputs.shape).astype(inputs.dtype)


def shifted(name: str, arrays: dict) -> dict:
  """arrays with 'inputs' replaced by shift `name` of them; UserError for non-image inputs."""
  fn = SHIFTS.get(name)
  x = arrays['inputs']
  if x.ndim != 4 or x.dtype != np.uint8 or x.shape[1] != x.shape[2]:
    raise UserError(
      f'--ood={name} shifts square uint8 images, and these inputs are {x.dtype} {x.shape[1:]}; '
      'leave --ood empty'
    )
  return {**arrays, 'inputs': fn(x)}
