"""One mechanism for every by-name choice in a config.

A `Registry` maps names to objects and reports an unknown name as a one-line `UserError` that names
the config field and lists the known names. Two ways to fill one:

- entries registered where they are defined::

    OPTIMIZERS = registry.Registry('optimizer', 'config.optim.name')

    @OPTIMIZERS.register('adam')
    def _adam(cfg, lr): ...

- a package of one module per entry (models, tasks): `Registry(..., package='bigjax.models',
  attr='Model')` finds `bigjax.models.cnn.Model` for the name 'cnn'. Adding a model or a task is
  adding one file; helper modules that define no `attr` (e.g. `models/layers.py`) are not listed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import importlib
import inspect
import pkgutil
from typing import Any

from bigjax.errors import UserError


class Registry:
  """Name -> object, with `UserError` for unknown names.

  kind: what the entries are, plural in messages ('optimizers'); field: the config field that
  names one ('config.optim.name'); package/attr: optional module-per-entry lookup (see module doc).
  """

  def __init__(self, kind: str, field: str, *, package: str | None = None, attr: str | None = None):
    self.kind, self.field = kind, field
    self.package, self.attr = package, attr
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator: registers the decorated object under `name` and returns it unchanged."""

    def add(obj):
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = obj
      return obj

    return add

  def add(self, name: str, obj: Any) -> None:
    """Registers `obj` under `name` (for entries that are values rather than definitions)."""
    self.register(name)(obj)

  def _module_entry(self, name: str) -> Any:
    if self.package is None or name.startswith('_'):
      return None
    try:
      module = importlib.import_module(f'{self.package}.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'{self.package}.{name}':
        raise
      return None
    entry = getattr(module, self.attr or '', None)
    return None if inspect.isabstract(entry) else entry  # e.g. tasks/base.py's interface

  def names(self) -> list[str]:
    """Sorted names of the known entries."""
    names = set(self._entries)
    if self.package is not None:
      package = importlib.import_module(self.package)
      for info in pkgutil.iter_modules(package.__path__):
        if self._module_entry(info.name) is not None:
          names.add(info.name)
    return sorted(names)

  def __contains__(self, name: str) -> bool:
    return name in self._entries or self._module_entry(name) is not None

  def get(self, name: str) -> Any:
    """The entry called `name`; raises UserError naming the field and the known names."""
    if name in self._entries:
      return self._entries[name]
    entry = self._module_entry(name)
    if entry is None:
      raise UserError(
        f'{self.field}={name!r} is unknown; known {self.kind}: {", ".join(self.names())}'
      )
    return entry

  def check(self, name: str) -> None:
    """Raises the unknown-name UserError unless `name` is known."""
    self.get(name)

  def items(self) -> Iterable[tuple[str, Any]]:
    return ((name, self.get(name)) for name in self.names())


MODELS = Registry('models', 'config.model.name', package='bigjax.models', attr='Model')
TASKS = Registry('tasks', 'config.task.name', package='bigjax.tasks', attr='Task')
