"""Per-example image decoding and host-side crops, run as grain map operations.

`decode` turns a record's image (JPEG/PNG bytes, or an HWC uint8 array of any size as TFDS data
sources return them) into a PIL image. Training uses `inception_crop` (Szegedy et al. 2015, as
big_vision's `inception_crop` and the Goyal et al. 2017 ResNet recipe: a random box of 8%-100% of
the area with aspect ratio in [3/4, 4/3], resized to size x size) and a random left-right flip;
evaluation `center_crop` (resize the shorter side to size / 0.875, e.g. 256 for 224, then the
central size x size). Outputs are (size, size, C) uint8, so batches stay small on the host and
the jitted step converts them to float (bigjax.steps.prepare_inputs). The on-device augmentations
(bigjax.data.augment) still apply on top when config.augment is enabled.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from bigjax.errors import DataError

EVAL_CROP_FRACTION = 0.875  # 224 of 256: the ResNet / ViT evaluation convention
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
ATTEMPTS = (
  10  # boxes tried before the central-crop fallback (as TF's sample_distorted_bounding_box)
)


def decode(value: Any, channels: int, where: str):
  """JPEG/PNG bytes or an (H, W[, C]) uint8 array -> PIL image with `channels` (1: 'L', 3:
  'RGB'); DataError naming `where` (dataset, split, record) when it does not decode."""
  from PIL import Image

  image: Image.Image
  try:
    if isinstance(value, (bytes, bytearray, np.bytes_)):
      image = Image.open(io.BytesIO(bytes(value)))
      image.load()
    else:
      array = np.asarray(value)
      image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
  except (OSError, ValueError, TypeError, SyntaxError) as e:
    raise DataError(
      f'{where}: the image does not decode ({type(e).__name__}: {e}); remove or replace that '
      'record and prepare the dataset again'
    ) from None
  mode = {1: 'L', 3: 'RGB'}[channels]
  return image if image.mode == mode else image.convert(mode)


def _as_array(image, channels: int) -> np.ndarray:
  array = np.asarray(image, np.uint8)
  return array[..., None] if channels == 1 else array


def inception_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
  """A random (left, top, right, bottom) box covering AREA_RANGE of the image with aspect ratio
  in ASPECT_RANGE (log-uniform); after ATTEMPTS misses, the largest central box within the
  aspect range."""
  area = width * height
  log_aspect = (math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1]))
  for _ in range(ATTEMPTS):
    target = area * rng.uniform(*AREA_RANGE)
    aspect = math.exp(rng.uniform(*log_aspect))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  ratio = width / height
  if ratio < ASPECT_RANGE[0]:
    w, h = width, int(round(width / ASPECT_RANGE[0]))
  elif ratio > ASPECT_RANGE[1]:
    w, h = int(round(height * ASPECT_RANGE[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def inception_crop(
  image, size: int, rng: np.random.Generator, channels: int, flip: bool = True
) -> np.ndarray:
  """PIL image -> (size, size, C) uint8: a random inception box resized (bilinear), flipped
  left-right with probability 1/2 when `flip`."""
  from PIL import Image

  box = inception_box(rng, *image.size)
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if flip and rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return _as_array(out, channels)


def center_crop(image, size: int, channels: int) -> np.ndarray:
  """PIL image -> (size, size, C) uint8: shorter side resized to size / EVAL_CROP_FRACTION
  (bilinear, one resampling: the central box is mapped back onto the original), centre crop."""
  from PIL import Image

  width, height = image.size
  scale = size / EVAL_CROP_FRACTION / min(width, height)  # output pixels per source pixel
  side = size / scale  # the crop's side in source pixels
  left, top = (width - side) / 2, (height - side) / 2
  out = image.resize(
    (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
  )
  return _as_array(out, channels)
