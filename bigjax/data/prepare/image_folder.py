"""bigjax-prepare input (a): a folder of images with one sub-folder per class.

IMAGES_DIR/<class>/<file>.{jpg,jpeg,png,...}: classes are the sorted sub-folder names; top-level
folders named train / validation / test are splits, each with class sub-folders. The encoded bytes
are stored as they are (decoded per example at training time: set config.data.image_size unless
all images share one size).
"""

from __future__ import annotations

from collections.abc import Iterator
import os

import numpy as np

from bigjax.errors import DataError, UserError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
SPLIT_NAMES = ('train', 'validation', 'test')

Rows = dict[str, list[dict]]


def _split_rows(folder: str, classes: list[str]) -> list[dict]:
  rows = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for file in sorted(os.listdir(class_dir)):
      if file.lower().endswith(IMAGE_SUFFIXES):
        rows.append({'path': os.path.join(class_dir, file), 'label': label})
  return rows


def read(folder: str) -> tuple[dict, Rows]:
  """(features, {split: [{'path', 'label'}]}) of an image folder (module doc); the images
  themselves are read by `records`."""
  subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if subdirs and set(subdirs) <= set(SPLIT_NAMES):
    split_dirs = {s: os.path.join(folder, s) for s in subdirs}
  else:
    split_dirs = {'train': folder}
  classes = sorted(
    {c for d in split_dirs.values() for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))}
  )
  if not classes:
    raise UserError(
      f"--input={folder} has no class sub-folders; put each class's images in "
      f'{folder}/<class name>/'
    )
  splits = {s: _split_rows(d, classes) for s, d in split_dirs.items()}
  if not any(splits.values()):
    raise UserError(f'--input={folder} holds no images ({", ".join(IMAGE_SUFFIXES)})')
  return _features(splits, classes), splits


def _features(splits: Rows, classes: list[str]) -> dict:
  """The image feature: channels 1 when every image is grayscale, else 3; the shape fixed when
  all images share one size (read from the file headers only)."""
  from PIL import Image

  modes, sizes = set(), set()
  for rows in splits.values():
    for row in rows:
      try:
        with Image.open(row['path']) as image:
          modes.add(image.mode)
          sizes.add(image.size)
      except OSError as e:
        raise DataError(
          f'{row["path"]} is not a readable image ({e}); remove or replace it'
        ) from None
  channels = 1 if modes <= {'L', '1'} else 3
  height_width: list[int | None] = [None, None]
  if len(sizes) == 1:
    width, height = next(iter(sizes))
    height_width = [height, width]
  return {
    'image': {'kind': 'image', 'shape': [*height_width, channels]},
    'label': {'kind': 'class_label', 'names': classes},
  }


def records(rows: list[dict]) -> Iterator[dict]:
  """A split's records {'image': encoded bytes, 'label'}, each file read as it is written."""
  for row in rows:
    with open(row['path'], 'rb') as f:
      yield {'image': f.read(), 'label': np.int64(row['label'])}
