"""The one command-line layer every bigjax entry point uses.

- `Parser`: absl flags in a private `FlagValues` (nothing global), an optional `--config` flag
  (ml_collections `config_flags`: a shipped config's bare name or a file path, `:args`, and
  `--config.FIELD=VALUE` overrides), a `--help` that prints the flags, and every parsing mistake
  turned into a one-line `UserError`.
- `run(main)`: calls an entry point and maps its exceptions to exits: `UserError` -> one line
  `bigjax: error: ...` and status 2; `NonFiniteError` -> 1; `Preempted` -> 143; a `SystemExit`
  status passes through.
- `resolve_config(spec)`: 'mnist_cnn[:args]' or 'path/to/file.py[:args]' -> a file path spec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import importlib.resources
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from bigjax.errors import NonFiniteError, Preempted, UserError

EXIT_USER_ERROR, EXIT_NON_FINITE, EXIT_PREEMPTED = 2, 1, 143


# ----------------------------------------------------------------------------------------------
# Configs by name
# ----------------------------------------------------------------------------------------------
def shipped_configs() -> list[str]:
  """Bare names of the configs installed with bigjax (the repository's configs/ folder)."""
  root = importlib.resources.files('bigjax.configs')
  return sorted(
    p.name[:-3] for p in root.iterdir() if p.name.endswith('.py') and not p.name.startswith('_')
  )


def resolve_config(spec: str) -> str:
  """'NAME[:args]' or 'FILE.py[:args]' -> 'FILE.py[:args]' with FILE an existing path.

  A path that exists is used as given; otherwise NAME (or configs/NAME.py) is looked up among the
  shipped configs. Raises UserError naming the spec and the shipped names.
  """
  path, colon, arg = spec.partition(':')
  if not os.path.exists(path):
    name = os.path.basename(path)
    name = name[:-3] if name.endswith('.py') else name
    if name not in shipped_configs():
      raise UserError(
        f'--config={path}: no such config file or shipped config; shipped configs: '
        f'{", ".join(shipped_configs())} (or give a path to a .py file)'
      )
    path = str(importlib.resources.files('bigjax.configs') / f'{name}.py')
  return path + colon + arg


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
class Parser:
  """Flags of one command. `prog`: the command's name; `doc`: the usage text `--help` prints.

  with_config: adds `--config` (required) and its `--config.FIELD=VALUE` overrides.
  """

  def __init__(self, prog: str, doc: str, *, with_config: bool = False):
    self.prog, self.doc, self.with_config = prog, doc, with_config
    self.flag_values = flags.FlagValues()
    self._required: list[str] = []

  def string(self, name: str, default: str | None, help_text: str, required: bool = False):
    flags.DEFINE_string(name, default, help_text, flag_values=self.flag_values)
    if required:
      self._required.append(name)

  def integer(self, name: str, default: int | None, help_text: str):
    flags.DEFINE_integer(name, default, help_text, flag_values=self.flag_values)

  def float(self, name: str, default: float | None, help_text: str):
    flags.DEFINE_float(name, default, help_text, flag_values=self.flag_values)

  def boolean(self, name: str, default: bool, help_text: str):
    flags.DEFINE_boolean(name, default, help_text, flag_values=self.flag_values)

  def help_text(self) -> str:
    lines = [self.doc.strip(), '', 'flags:']
    if self.with_config:
      lines.append(
        '  --config: a shipped config by name, or a config file path, optionally with '
        ':args (e.g. mnist_cnn:smoke)\n    shipped: ' + ', '.join(shipped_configs())
      )
      lines.append(
        '  --config.FIELD=VALUE: override any config field; see every field and its '
        'value with `bigjax-train --config=NAME --dry_run`'
      )
    for name, flag in sorted(self.flag_values._flags().items()):  # pylint: disable=protected-access
      if name != 'config' and name == flag.name:
        default = '' if flag.default is None else f' (default: {flag.default!r})'
        lines.append(f'  --{name}: {flag.help}{default}')
    return '\n'.join(lines)

  def parse(self, argv: Sequence[str]) -> Any:
    """argv (argv[0] = program) -> the parsed FlagValues (`.config` holds the ConfigDict).

    `--help` prints the help text and exits 0; every mistake raises a one-line UserError.
    """
    argv = [self.prog, *argv[1:]]
    if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
      print(self.help_text())
      sys.exit(0)
    if self.with_config:
      argv = [
        f'--config={resolve_config(a.split("=", 1)[1])}' if a.startswith('--config=') else a
        for a in argv
      ]
      config_flags.DEFINE_config_file(
        'config',
        None,
        'Experiment config.',
        flag_values=self.flag_values,
        lock_config=True,
        sys_argv=argv,
      )
    fv = self.flag_values
    try:
      fv(argv)
      if self.with_config and fv.config is not None:
        fv.config.keys()  # a config file that failed to load raises here
    except UserError:
      raise
    except flags.IllegalFlagValueError as e:
      raise UserError(f"{str(e).splitlines()[0]}; give a value of that field's type") from None
    except flags.UnrecognizedFlagError as e:
      raise UserError(f'{e}; see {self.prog} --help') from None
    except (AttributeError, KeyError) as e:  # an override names a field the config lacks
      raise UserError(_explain_unknown_field(argv, e)) from None
    missing = [
      f'--{n}'
      for n in (['config'] if self.with_config else []) + self._required
      if getattr(fv, n) in (None, '')
    ]
    if missing:
      raise UserError(f'{" and ".join(missing)} required; see {self.prog} --help')
    return fv


def _explain_unknown_field(argv: Sequence[str], error: Exception) -> str:
  """Names the first `--config.a.b` override whose path the loaded config lacks, with its siblings."""
  from bigjax.config_lib import load_config_file

  spec = next(a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config='))
  config = load_config_file(spec)
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      path = arg[len('--config.') :].split('=', 1)[0]
      node, parts = config, path.split('.')
      for i, part in enumerate(parts):
        if not hasattr(node, 'keys') or part not in node:
          parent = 'config' + ''.join(f'.{p}' for p in parts[:i])
          known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
          return f'--config.{path}: {parent} has no field {part!r}; its fields: {known}'
        node = node[part]
  return ' '.join(str(error).split())


# ----------------------------------------------------------------------------------------------
# Exits
# ----------------------------------------------------------------------------------------------
def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Calls main(argv) (default sys.argv); returns when it returns 0/None, else exits with its
  status, or with the status of the bigjax exception it raised, printing that exception's message
  on one line."""
  try:
    status = main(list(sys.argv if argv is None else argv))
  except UserError as e:
    _exit(f'bigjax: error: {" ".join(str(e).split())}', EXIT_USER_ERROR)
  except NonFiniteError as e:
    _exit(f'bigjax: {e}', EXIT_NON_FINITE)
  except Preempted as e:
    _exit(f'bigjax: {e}', EXIT_PREEMPTED)
  if status:
    sys.exit(status)


def _exit(message: str, status: int) -> None:
  print(message, file=sys.stderr)
  sys.exit(status)
