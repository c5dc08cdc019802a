"""bigjax's own array_record datasets: the on-disk layout `bigjax-prepare` writes and `dir:` reads.

A prepared dataset is a folder:
  DIR/bigjax_dataset.json   {'format': FORMAT, 'features': {key: feature}, 'splits': {split:
                            {'num_examples': N, 'files': [name, ...]}}}
  DIR/<split>-NNNNN.array_record   records of that split, RECORDS_PER_FILE a file (NNNNN = 00000,
                                   00001, ...; the info file lists them in order)
A feature is {'kind': 'image'} (encoded JPEG/PNG bytes, any size), {'kind': 'text'} (UTF-8 bytes),
{'kind': 'tensor', 'shape': [...], 'dtype': 'float32'} or {'kind': 'class_label', 'names': [...]}.
Each record is one msgpack map {key: value} (flax.serialization, which stores numpy arrays with
their dtype and shape and bytes as bytes): no pickle, no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import json
import os
from typing import Any

from flax import serialization
import numpy as np

from bigjax import reporting
from bigjax.errors import DataError

FORMAT = 'bigjax-array_record-1'
INFO_FILE = 'bigjax_dataset.json'
RECORDS_PER_FILE = 100_000  # array_record files stay ~100k records: many readers, quick opens

Record = dict[str, Any]


def encode(record: Mapping[str, Any]) -> bytes:
  """{key: ndarray | bytes | int | float | str} -> msgpack bytes (str stored as UTF-8 bytes)."""
  out = {}
  for k, v in record.items():
    if isinstance(v, str):
      v = v.encode('utf-8')
    elif isinstance(v, (int, float, np.generic)):
      v = np.asarray(v)
    out[k] = v
  return serialization.msgpack_serialize(out)


def decode(data: bytes) -> Record:
  """msgpack bytes written by `encode` -> {key: ndarray | bytes}."""
  return serialization.msgpack_restore(data)


def read_info(directory: str) -> dict:
  """DIR/bigjax_dataset.json as a dict; DataError naming the folder when it is not a prepared
  dataset (no such folder, a TFDS/TFRecord folder, a damaged file)."""
  path = os.path.join(directory, INFO_FILE)
  if not os.path.isdir(directory):
    raise DataError(
      f'config.data.name=dir:{directory}: no such folder; run `bigjax-prepare --input=... '
      f'--output={directory}` first'
    )
  if not os.path.exists(path):
    tfrecords = [f for f in os.listdir(directory) if '.tfrecord' in f]
    hint = (
      ' (it holds TFRecord files: bigjax reads array_record only; re-run `bigjax-prepare` on the '
      'raw data, or `tfds build NAME --file_format=array_record`)'
      if tfrecords
      else ''
    )
    raise DataError(
      f'config.data.name=dir:{directory} is not a prepared dataset: it has no {INFO_FILE}{hint}; '
      f'run `bigjax-prepare --input=... --output={directory}`'
    )
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'{path} cannot be read ({e}); re-run bigjax-prepare') from None
  if info.get('format') != FORMAT:
    raise DataError(
      f'{path} has format {info.get("format")!r}, not {FORMAT!r}; re-run bigjax-prepare'
    )
  return info


def write_dataset(
  directory: str, features: dict, splits: Mapping[str, Iterable[Mapping[str, Any]]]
) -> dict:
  """Writes a prepared dataset: every split's records (dicts matching `features`) into
  array_record files, then bigjax_dataset.json last (a folder without it is not a dataset, so an
  interrupted write is never read). Returns the info dict."""
  from array_record.python import array_record_module

  os.makedirs(directory, exist_ok=True)
  info: dict = {'format': FORMAT, 'features': features, 'splits': {}}
  for split, records in splits.items():
    files: list[str] = []
    writer, count = None, 0
    for record in records:
      if count % RECORDS_PER_FILE == 0:
        if writer is not None:
          writer.close()
        files.append(f'{split}-{len(files):05d}.array_record')
        writer = array_record_module.ArrayRecordWriter(
          os.path.join(directory, files[-1]), 'group_size:1'
        )
      assert writer is not None
      writer.write(encode(record))
      count += 1
    if writer is not None:
      writer.close()
    info['splits'][split] = {'num_examples': count, 'files': files}
  reporting.write_json_atomic(os.path.join(directory, INFO_FILE), info)
  return info


class RecordSource:
  """A prepared split as a random-access source: len() records, [i] -> {key: ndarray | bytes}.

  Reads through grain's ArrayRecordDataSource (memory-mapped, opened lazily, picklable for grain's
  worker processes)."""

  def __init__(self, directory: str, split: str, files: list[str], num_examples: int):
    import grain

    self.name, self.split = f'dir:{directory}', split
    paths = [os.path.join(directory, f) for f in files]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DataError(
        f'dataset dir:{directory} split {split!r}: {missing[0]} is missing; re-run bigjax-prepare'
      )
    self._records = grain.sources.ArrayRecordDataSource(paths) if paths else []
    self._len = num_examples

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Record:
    return decode(self._records[index])
