"""Pick a component by name: `load('models', 'cnn')` imports `bigjax.models.cnn`.

Adding a model or task is adding one file that defines `Model` (models) or `Task` (tasks); no central
if/else chain to edit. Helper modules in the same package (e.g. `models/layers.py`) define neither
and are not listed.
"""
import importlib
import pkgutil

from bigjax.errors import UserError

_ENTRY = {'models': ('model', 'Model'), 'tasks': ('task', 'Task')}


def known(kind):
  """Sorted names of the modules in `bigjax.<kind>` that define the kind's entry class."""
  package = importlib.import_module(f'bigjax.{kind}')
  _, attr = _ENTRY[kind]
  names = []
  for info in pkgutil.iter_modules(package.__path__):
    if not info.name.startswith('_'):
      if hasattr(importlib.import_module(f'bigjax.{kind}.{info.name}'), attr):
        names.append(info.name)
  return sorted(names)


def load(kind, name):
  """Returns the entry class (`Model`/`Task`) of `bigjax.<kind>.<name>`.

  Raises UserError naming the config field and listing the known names when `name` is unknown.
  """
  field, attr = _ENTRY[kind]
  try:
    module = importlib.import_module(f'bigjax.{kind}.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'bigjax.{kind}.{name}':
      raise
    module = None
  if module is None or not hasattr(module, attr):
    raise UserError(f'config.{field}.name={name!r} is unknown; known {kind}: {", ".join(known(kind))}')
  return getattr(module, attr)
