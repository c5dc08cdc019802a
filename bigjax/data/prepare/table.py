"""bigjax-prepare input (b): CSV or JSONL files of texts or feature columns, and labels.

One record per row/line. The label column (--label_column, default 'label'): strings become sorted
class names, integers 0..K-1 stay. With a text column (--text_column, default 'text') the dataset
is a text dataset (config.data.view='lm' / 'classification', or config.data.pack); else every
other column, in order, becomes the 'features' vector (float32). --max_text_bytes (0: no limit)
refuses a longer text with the record named, rather than letting training cut it silently.
"""

from __future__ import annotations

import csv
import json

import numpy as np

from bigjax.errors import DataError, UserError

SUFFIXES = ('.csv', '.jsonl', '.json')
Rows = dict[str, list[dict]]


def _rows(path: str) -> list[dict]:
  if path.endswith(('.jsonl', '.json')):
    with open(path, encoding='utf-8') as f:
      out = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except ValueError as e:
            raise DataError(f'{path} line {n} is not JSON ({e}); fix that line') from None
      return out
  if path.endswith('.csv'):
    with open(path, newline='', encoding='utf-8') as f:
      return list(csv.DictReader(f))
  raise UserError(f'--input={path}: a table must be .csv or .jsonl')


def read(
  paths: dict[str, str], text_column: str, label_column: str, max_text_bytes: int = 0
) -> tuple[dict, Rows]:
  """(features, {split: records}) of CSV/JSONL files (module doc); DataError naming the file and
  record of a text longer than max_text_bytes UTF-8 bytes (0: no limit) or a non-numeric feature."""
  raw = {split: _rows(path) for split, path in paths.items()}
  first = next((rows[0] for rows in raw.values() if rows), None)
  if first is None:
    raise UserError(f'--input={",".join(paths.values())} holds no rows')
  if label_column not in first:
    raise UserError(
      f'--label_column={label_column!r} is not a column of {next(iter(paths.values()))}; its '
      f'columns: {", ".join(first)}'
    )
  labels = [row.get(label_column) for rows in raw.values() for row in rows]
  names, label_of = _class_names(labels, label_column)
  features: dict = {'label': {'kind': 'class_label', 'names': names}}
  columns = [c for c in first if c != label_column]
  if text_column in first:
    features['text'] = {'kind': 'text'}
  else:
    features['features'] = {'kind': 'tensor', 'shape': [len(columns)], 'dtype': 'float32'}
  splits: Rows = {}
  for split, rows in raw.items():
    out = []
    for i, row in enumerate(rows):
      record: dict = {'label': np.int64(label_of[str(row.get(label_column))])}
      if text_column in first:
        record['text'] = _text(row.get(text_column), f'{paths[split]} record {i}', text_column)
        if max_text_bytes and len(record['text']) > max_text_bytes:
          raise DataError(
            f'{paths[split]} record {i}: its text is {len(record["text"])} bytes, longer than '
            f'--max_text_bytes={max_text_bytes}; shorten or drop that record, or raise the limit'
          )
      else:
        try:
          record['features'] = np.asarray([float(row[c]) for c in columns], np.float32)
        except (KeyError, TypeError, ValueError) as e:
          raise DataError(
            f'{paths[split]} record {i}: the feature columns {columns} must all be numbers '
            f'({type(e).__name__}: {e}); fix that record or give --text_column'
          ) from None
      out.append(record)
    splits[split] = out
  return features, splits


def _text(value, where: str, column: str) -> bytes:
  if not isinstance(value, str):
    raise DataError(f'{where}: column {column!r} is {value!r}, not a text; fix it')
  return value.encode('utf-8')


def _class_names(labels: list, column: str) -> tuple[list[str], dict[str, int]]:
  """Class names and {str(label): id}: integer labels 0..K-1 keep their ids, others are sorted."""
  if any(v is None or v == '' for v in labels):
    raise DataError(f'a record has no value in the label column {column!r}; fill it or drop it')
  try:
    ints = [int(v) for v in labels]
    if all(str(i) == str(v).strip() or i == v for i, v in zip(ints, labels)) and min(ints) >= 0:
      k = max(ints) + 1
      return [str(i) for i in range(k)], {str(i): i for i in range(k)} | {
        str(v): int(v) for v in labels
      }
  except (TypeError, ValueError):
    pass
  names = sorted({str(v) for v in labels})
  return names, {n: i for i, n in enumerate(names)}
