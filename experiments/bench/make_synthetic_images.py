"""Writes a synthetic ImageNet-like dataset of >= 2 GB of JPEGs as a bigjax-prepare folder.

  python experiments/bench/make_synthetic_images.py --output=runs/synthetic_images [--gigabytes=2]

Records are {'image': JPEG bytes, 'label': class id} in array_record files (bigjax.data.records,
the layout `bigjax-prepare` writes; train with --config.data.name=dir:OUTPUT). The JPEG bytes
come from a pool of --pool distinct images (smooth random colour fields plus noise, 600-900 px a
side, quality 95, ~0.5 MB each), reused across records under random labels, so generating 2 GB
takes about a minute; every record is still read and decoded from disk when training. Not
committed (runs/ is ignored).
"""

import argparse
import io
import os

import numpy as np

from bigjax.data import records


def _image(rng: np.random.Generator) -> bytes:
  from PIL import Image

  h, w = rng.integers(600, 901, size=2)
  coarse = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC), np.int16)
  noisy = np.clip(base + rng.integers(-40, 41, size=base.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noisy).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', required=True)
  parser.add_argument('--gigabytes', type=float, default=2.0)
  parser.add_argument('--pool', type=int, default=64)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--test_records', type=int, default=256)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  pool = [_image(rng) for _ in range(args.pool)]
  mean_bytes = np.mean([len(p) for p in pool])
  n_train = int(np.ceil(args.gigabytes * 1e9 / mean_bytes))

  def split(n: int, seed: int):
    r = np.random.default_rng(seed)
    for _ in range(n):
      yield {'image': pool[r.integers(len(pool))], 'label': np.int64(r.integers(args.classes))}

  features = {
    'image': {'kind': 'image', 'shape': [None, None, 3]},
    'label': {'kind': 'class_label', 'names': [str(i) for i in range(args.classes)]},
  }
  info = records.write_dataset(
    args.output, features, {'train': split(n_train, 1), 'test': split(args.test_records, 2)}
  )
  size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
  print(
    f'{args.output}: {info["splits"]["train"]["num_examples"]} train + '
    f'{args.test_records} test records, {size / 1e9:.2f} GB on disk '
    f'(pool of {args.pool} JPEGs, {mean_bytes / 1e6:.2f} MB each on average)'
  )


if __name__ == '__main__':
  main()
