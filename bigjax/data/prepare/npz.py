"""bigjax-prepare input (c): arrays in .npz files (one per split), or x=X.npy,y=Y.npy.

Inputs are the array named image/images/x/inputs/features, labels label/labels/y; uint8 arrays of
rank 3 or 4 are images (N, H, W[, C]) stored as fixed-shape tensors, others a float32 'features'
vector per record.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bigjax.errors import DataError, UserError

SUFFIXES = ('.npz', '.npy')
INPUT_NAMES = ('image', 'images', 'x', 'inputs', 'features')
LABEL_NAMES = ('label', 'labels', 'y')
Rows = dict[str, list[dict]]


def _pick(arrays: dict, names: Sequence[str], what: str, where: str) -> np.ndarray:
  key = next((k for k in names if k in arrays), None)
  if key is None:
    raise UserError(f'{where} has arrays {sorted(arrays)}; name the {what} one of {names}')
  return np.asarray(arrays[key])


def _load(path: str) -> dict:
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  raise UserError(f'--input={path}: arrays must be an .npz (or x=X.npy,y=Y.npy)')


def read(paths: dict[str, str]) -> tuple[dict, Rows]:
  """(features, {split: records}) of .npz files, or of x=X.npy,y=Y.npy for a single split."""
  if set(paths) == {'x', 'y'}:
    data = {'train': {'x': np.load(paths['x']), 'y': np.load(paths['y'])}}
  else:
    data = {split: _load(path) for split, path in paths.items()}
  splits: Rows = {}
  features: dict = {}
  for split, a in data.items():
    x = _pick(a, INPUT_NAMES, 'inputs', paths.get(split, 'the .npy files'))
    y = _pick(a, LABEL_NAMES, 'labels', paths.get(split, 'the .npy files'))
    if len(x) != len(y):
      raise DataError(f'split {split}: {len(x)} inputs but {len(y)} labels; give one label each')
    image = x.dtype == np.uint8 and x.ndim in (3, 4)
    if image and x.ndim == 3:
      x = x[..., None]
    key = 'image' if image else 'features'
    x = x if image else x.astype(np.float32)
    features[key] = {'kind': 'tensor', 'shape': list(x.shape[1:]), 'dtype': str(x.dtype)}
    splits[split] = [{key: x[i], 'label': np.int64(y[i])} for i in range(len(x))]
  all_labels = np.concatenate([[r['label'] for r in rows] for rows in splits.values()])
  if all_labels.min() < 0:
    raise DataError(f'labels must be class ids >= 0; found {int(all_labels.min())}')
  k = int(all_labels.max()) + 1
  features['label'] = {'kind': 'class_label', 'names': [str(i) for i in range(k)]}
  return features, splits
