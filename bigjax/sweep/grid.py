"""Declaring what a sweep varies (axes of config values, combined by `product` and `zip_axes`),
and how its settings and values are named."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import re
from typing import Any

import numpy as np

from bigjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Axis:
  """One config field and the values it takes."""

  field: str  # dotted config field, e.g. 'optim.lr'
  values: tuple
  label: str | None = None  # short name in setting names, tables and plots


@dataclasses.dataclass(frozen=True)
class Grid:
  """Settings over some axes. `settings` holds one {field: value} dict per setting (fields in axis
  order); `groups` holds the tuples of axis indices that vary in lock-step (one per zip_axes)."""

  axes: tuple
  settings: tuple
  groups: tuple

  @classmethod
  def empty(cls) -> Grid:
    """No axes and a single setting that changes nothing (a sweep over seeds or folds only)."""
    return cls((), ({},), ())


def axis(field: str, values: Iterable[Any], label: str | None = None) -> Grid:
  """One config field (dotted, e.g. 'model.kwargs.dropout') taking each of `values` in turn.

  label: a short name for the field in setting names, tables and plots (default: the field's last
  part, or more parts where two axes share it)."""
  values = tuple(values)
  if not isinstance(field, str) or not field:
    raise UserError(
      f'sweep.axis({field!r}): the field must be a dotted config path, e.g. "optim.lr"'
    )
  if not values:
    raise UserError(f'sweep.axis({field!r}) has no values')
  return Grid((Axis(field, values, label),), tuple({field: v} for v in values), ((0,),))


def product(*grids: Grid) -> Grid:
  """All combinations of the settings of `grids` (axes, products, zips); the last varies fastest."""
  _check_grids(grids, 'product')
  axes: tuple = ()
  groups: tuple = ()
  settings: list[dict] = [{}]
  for g in grids:
    groups += tuple(tuple(i + len(axes) for i in group) for group in g.groups)
    axes += g.axes
    settings = [{**s, **t} for s in settings for t in g.settings]
  return Grid(axes, tuple(settings), groups)


def zip_axes(*grids: Grid) -> Grid:
  """The settings of `grids` taken in lock-step: the i-th setting joins the i-th of each grid."""
  _check_grids(grids, 'zip_axes')
  lengths = [len(g.settings) for g in grids]
  if len(set(lengths)) > 1:
    sizes = ', '.join(
      f'{"+".join(a.field for a in g.axes)} has {n}' for g, n in zip(grids, lengths)
    )
    raise UserError(f'sweep.zip_axes needs axes of the same length: {sizes} values')
  axes = sum((g.axes for g in grids), ())
  settings = tuple(
    {k: v for part in parts for k, v in part.items()} for parts in zip(*(g.settings for g in grids))
  )
  return Grid(axes, settings, (tuple(range(len(axes))),))


def _check_grids(grids, name):
  if not grids or not all(isinstance(g, Grid) for g in grids):
    raise UserError(f'sweep.{name} takes one or more sweep.axis/product/zip_axes results')
  fields = [a.field for g in grids for a in g.axes]
  twice = sorted({f for f in fields if fields.count(f) > 1})
  if twice:
    raise UserError(f'sweep.{name}: field {twice[0]!r} is on more than one axis')


# ----------------------------------------------------------------------------------------------
# Names and values
# ----------------------------------------------------------------------------------------------
def short_names(axes: Sequence[Axis]) -> list[str]:
  """Each axis' label, else the shortest dotted suffix of its field that no other axis shares."""
  names = []
  for a in axes:
    parts = a.field.split('.')
    for n in range(1, len(parts) + 1):
      name = '.'.join(parts[-n:])
      if not any(b is not a and b.field.split('.')[-n:] == parts[-n:] for b in axes):
        break
    names.append(a.label or name)
  return names


def fmt(value: Any) -> str:
  """A value as it appears in a setting name: compact and filesystem-safe."""
  if isinstance(value, (bool, type(None))):
    text = str(value).lower()
  elif isinstance(value, (tuple, list)):
    text = '-'.join(fmt(v) for v in value) or 'empty'
  else:
    text = repr(value) if isinstance(value, float) else str(value)
  return re.sub(r'[^A-Za-z0-9_.+-]', '_', text)


def show(value: Any) -> str:
  """A value as it appears in tables and legends."""
  return value if isinstance(value, str) else repr(to_builtin(value))


def setting_name(setting: dict, names: Sequence[str]) -> str:
  """'lr=0.003,warmup=100' for {field: value} with the axes' short `names` ('base' when empty)."""
  text = ','.join(f'{n}={fmt(v)}' for n, v in zip(names, setting.values()))
  return re.sub(r'[^A-Za-z0-9_.=,+-]', '_', text) or 'base'


def to_builtin(value: Any) -> Any:
  """numpy scalars -> python, lists -> tuples (recursively): the types config fields hold."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, list)):
    return tuple(to_builtin(v) for v in value)
  return value


def flag_value(value: Any) -> str:
  """The text of `--config.FIELD=<text>` that bigjax.train's flags parse back to `value`."""
  value = to_builtin(value)
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return value if isinstance(value, str) else repr(value)
