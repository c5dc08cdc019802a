"""Cross-checks the numbers in every experiment README's tables against its committed results files.

  python experiments/check_numbers.py            # all experiments; exit 1 listing what is unbacked

A README table whose header is the header of a table in `results/*.md` (a copy of the runner's
table) must hold only rows of that table, character for character. Any other table (a summary
written by hand) may only quote numbers found in the results files (`results/*.csv` cells and
`results/*.md` tables; subfolders of `results/` count too), to the precision it quotes them: 0.954
is backed by 0.95433, not by 0.9549. Columns and rows about a paper or a published figure, signed
differences (+0.017) and whole numbers (sizes, counts) are not checked. A table right after a
`<!-- unbacked: REASON -->` line is not checked but listed (`declared_unbacked`); the test pins that
list. Used by tests/test_experiment_numbers.py.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import re
import sys

NUMBER = re.compile(r'(?<![\w.+\-−])\d+\.\d+(?:e[+-]?\d+)?')
SKIP_COLUMNS = ('paper', 'published', 'claim')


UNBACKED = re.compile(r'<!--\s*unbacked:\s*(.*?)\s*-->')


def tables(path: str) -> list[tuple[str, list[str]]]:
  """[(header row, [data rows])] of the markdown tables in a file (rows with spaces normalised),
  leaving out tables declared unbacked (see `declared_unbacked`)."""
  return [(header, rows) for header, rows, note in _tables(path) if note is None]


def declared_unbacked(path: str) -> list[tuple[str, str]]:
  """[(header row, reason)] of the tables that a `<!-- unbacked: REASON -->` line declares to have
  no results file (e.g. a GPU run whose raw output was not kept). The checker skips them and lists
  them; tests/test_experiment_numbers.py pins the list, so a new one cannot appear unnoticed."""
  return [(header, note) for header, _, note in _tables(path) if note is not None]


def _tables(path: str) -> list[tuple[str, list[str], str | None]]:
  out: list[tuple[str, list[str], str | None]] = []
  block: list[str] = []
  note = None
  with open(path, encoding='utf-8') as f:
    lines = [l.strip() for l in f] + ['']
  for line in lines:
    if line.startswith('|'):
      block.append(' '.join(line.split()))
      continue
    if len(block) >= 2:
      out.append((block[0], [r for r in block[2:] if not set(r) <= set('|-: ')], note))
    if block:
      note = None  # a declaration covers the next table only
    block = []
    match = UNBACKED.search(line)
    if match:
      note = match.group(1)
  return out


def _cells(row: str) -> list[str]:
  return [c.strip() for c in row.strip('|').split('|')]


def _results_files(results_dir: str, ext: str) -> list[str]:
  """The .csv or .md files in results_dir and its subfolders (one per dataset, say)."""
  return glob.glob(os.path.join(results_dir, '**', f'*.{ext}'), recursive=True)


def result_numbers(results_dir: str) -> list[float]:
  """Every decimal number in the results files (csv cells, md table cells)."""
  values: list[float] = []
  for path in _results_files(results_dir, 'csv'):
    with open(path, encoding='utf-8') as f:
      for row in csv.reader(f):
        for cell in row:
          with contextlib.suppress(ValueError):  # a label, not a number
            values.append(float(cell))
  for path in _results_files(results_dir, 'md'):
    for _, rows in tables(path):
      for row in rows:
        values += [float(x) for x in NUMBER.findall(row)]
  return values


def _backed(token: str, pool: list[float]) -> bool:
  value = float(token)
  mantissa = token.split('e')[0]
  decimals = len(mantissa.split('.')[1]) if '.' in mantissa else 0
  tolerance = 0.5 * 10.0**-decimals * (10.0 ** int(token.split('e')[1]) if 'e' in token else 1)
  return any(abs(v - value) <= tolerance * (1 + 1e-9) for v in pool)


def check(experiment_dir: str) -> list[str]:
  """Problems (one line each) with the numbers in `experiment_dir/README.md`'s tables."""
  readme = os.path.join(experiment_dir, 'README.md')
  results_dir = os.path.join(experiment_dir, 'results')
  readme_tables = tables(readme)
  if not readme_tables:
    return []
  if not _results_files(results_dir, 'csv') + _results_files(results_dir, 'md'):
    return [f'{readme}: tables but no results/*.csv or results/*.md to back them']
  copies = {}
  for path in _results_files(results_dir, 'md'):
    for header, rows in tables(path):
      copies.setdefault(header, set()).update(rows)
  pool = result_numbers(results_dir)
  problems = []
  for header, rows in readme_tables:
    if header in copies:
      problems += [
        f'{readme}: row {row!r} is not in the results table it copies'
        for row in rows
        if row not in copies[header]
      ]
      continue
    names = [c.lower() for c in _cells(header)]
    for row in rows:
      if any(word in _cells(row)[0].lower() for word in SKIP_COLUMNS):
        continue  # a row quoting the paper
      for name, cell in zip(names, _cells(row)):
        if any(word in name for word in SKIP_COLUMNS):
          continue
        for token in NUMBER.findall(cell):
          if not _backed(token, pool):
            problems.append(f'{readme}: {token} (column {name!r}) is in no results file')
  return problems


def main() -> int:
  root = os.path.dirname(os.path.abspath(__file__))
  problems = []
  for readme in sorted(glob.glob(os.path.join(root, '*', 'README.md'))):
    problems += check(os.path.dirname(readme))
    for header, reason in declared_unbacked(readme):
      print(f'declared unbacked in {readme}: {header[:60]}... ({reason})')
  print('\n'.join(problems) or 'every number in the experiment tables is in a results file')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
