"""bigjax-prepare: your own data -> an array_record dataset that `config.data.name` can name.

  bigjax-prepare --input=IMAGES_DIR --output=DIR          one sub-folder per class (or
                                                          IMAGES_DIR/<split>/<class>/...)
  bigjax-prepare --input=train=a.jsonl,test=b.jsonl --output=DIR    (or .csv) texts or features
  bigjax-prepare --input=arrays.npz --output=DIR          (or .npy pairs: x=X.npy,y=Y.npy)
  bigjax-train --config=... --config.data.name=dir:DIR

Each input kind is read by its own module: image_folder.py (a), table.py (b: CSV / JSONL, with
--text_column, --label_column, --max_text_bytes), npz.py (c). --input=PATH is the 'train' split;
name splits with split=PATH,split=PATH; --test_fraction=F holds out a seed-fixed fraction of
'train' as 'test' when no test split is given. The result is DIR/bigjax_dataset.json +
DIR/<split>-NNNNN.array_record (bigjax.data.records).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import os

import numpy as np

from bigjax import cli
from bigjax.data import records
from bigjax.data.prepare import image_folder, npz, table
from bigjax.errors import UserError

Splits = dict[str, list[dict]]


def _inputs(spec: str) -> dict[str, str]:
  """'a.jsonl' -> {'train': 'a.jsonl'}; 'train=a.csv,test=b.csv' -> both."""
  out = {}
  for part in filter(None, spec.split(',')):
    split, eq, path = part.partition('=')
    split, path = (split, path) if eq else ('train', split)
    out[split.strip()] = os.path.expanduser(path.strip())
  for split, path in out.items():
    if not os.path.exists(path):
      raise UserError(f'--input {split}={path}: no such file or folder')
  return out


def hold_out(splits: Splits, fraction: float, seed: int) -> Splits:
  """Moves a seed-fixed `fraction` of 'train' into 'test' (when there is no 'test' yet)."""
  if not fraction:
    return splits
  if not 0 < fraction < 1:
    raise UserError(f'--test_fraction={fraction} must be in (0, 1)')
  if 'test' in splits:
    raise UserError('--test_fraction with a test split given: drop one of them')
  train = splits['train']
  perm = np.random.default_rng(seed).permutation(len(train))
  n_test = int(round(fraction * len(train)))
  test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
  return {**splits, 'train': [train[i] for i in train_idx], 'test': [train[i] for i in test_idx]}


def prepare(
  inputs: str,
  output: str,
  *,
  text_column: str = 'text',
  label_column: str = 'label',
  max_text_bytes: int = 0,
  test_fraction: float = 0.0,
  seed: int = 0,
) -> dict:
  """Writes the dataset of `inputs` (see the module doc) into `output`; returns its info."""
  paths = _inputs(inputs)
  first = next(iter(paths.values()))
  if os.path.isdir(first):
    if len(paths) != 1:
      raise UserError('--input: give one image folder (its splits are sub-folders)')
    features, rows = image_folder.read(first)
    rows = hold_out(rows, test_fraction, seed)
    splits: Mapping[str, Iterable[dict]] = {s: image_folder.records(r) for s, r in rows.items()}
  elif first.endswith(table.SUFFIXES):
    features, tables = table.read(paths, text_column, label_column, max_text_bytes)
    splits = hold_out(tables, test_fraction, seed)
  elif first.endswith(npz.SUFFIXES):
    features, arrays = npz.read(paths)
    splits = hold_out(arrays, test_fraction, seed)
  else:
    raise UserError(
      f'--input={first}: not an image folder, .csv, .jsonl, .npz or .npy; see bigjax-prepare --help'
    )
  if os.path.exists(os.path.join(output, records.INFO_FILE)):
    raise UserError(f'--output={output} already holds a dataset; remove it or choose another')
  return records.write_dataset(output, features, splits)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.Parser('bigjax-prepare', __doc__)
  parser.string('input', None, 'An image folder, a .csv/.jsonl, or .npz; split=PATH,...', True)
  parser.string('output', None, 'The dataset folder to write (config.data.name=dir:OUTPUT).', True)
  parser.string('text_column', 'text', 'CSV/JSONL: the column holding the text.')
  parser.string('label_column', 'label', 'CSV/JSONL: the column holding the label.')
  parser.integer('max_text_bytes', 0, 'CSV/JSONL: refuse texts longer than this (0: no limit).')
  parser.float('test_fraction', 0.0, "Hold out this fraction of 'train' as 'test'.")
  parser.integer('seed', 0, 'Seed of the --test_fraction hold-out.')

  def run(args: Sequence[str]) -> None:
    fv = parser.parse(args)
    info = prepare(
      fv.input,
      fv.output,
      text_column=fv.text_column,
      label_column=fv.label_column,
      max_text_bytes=fv.max_text_bytes,
      test_fraction=fv.test_fraction,
      seed=fv.seed,
    )
    counts = ', '.join(f'{s} {v["num_examples"]}' for s, v in info['splits'].items())
    print(
      f'bigjax-prepare: wrote {fv.output} ({counts}); train with --config.data.name=dir:{fv.output}'
    )

  cli.run(run, argv)
