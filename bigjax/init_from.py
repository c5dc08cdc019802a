"""Start a run from another run's parameters (pretrain -> fine-tune).

config.init_from.checkpoint: a workdir (its checkpoints/ is used) or a checkpoints directory; its
newest step is read. config.init_from.load: comma-separated regular expressions over parameter
paths ('stack/layer_0/mlp/wi/kernel'); matching parameters are copied, the rest (new heads) keep
their fresh initialisation. Applied only when a run starts; a resumed run restores its own
checkpoint instead.
"""

import os
import re

import flax
import jax
import numpy as np

from bigjax import checkpoint
from bigjax.errors import UserError


def checkpoint_dir(path):
  """The checkpoints directory named by config.init_from.checkpoint; UserError if it has none."""
  path = os.path.expanduser(path)
  for candidate in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
      return candidate
  raise UserError(
    f'config.init_from.checkpoint={path!r} holds no checkpoint; give a workdir of a '
    'finished run (or its checkpoints/ directory)'
  )


def load_matching(params, path, load):
  """Reads the checkpoint at `path` and returns {'a/b/c': numpy array} for every leaf of `params`
  (arrays or ShapeDtypeStructs) whose path matches a regex in `load`. Raises UserError for missing
  leaves, shape mismatches, or patterns that match nothing -- call it before writing anything."""
  _, source = checkpoint.load_latest(checkpoint_dir(path))
  source = flax.traverse_util.flatten_dict(source['params'], sep='/')
  patterns = [re.compile(p.strip()) for p in load.split(',') if p.strip()]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  chosen, used = {}, set()
  for name, value in flat.items():
    hits = [p for p in patterns if p.search(name)]
    if not hits:
      continue
    used.update(p.pattern for p in hits)
    if name not in source:
      raise UserError(
        f'config.init_from: parameter {name} matches {hits[0].pattern!r} but the '
        f'checkpoint in {path} has no such parameter; narrow config.init_from.load'
      )
    if source[name].shape != value.shape:
      raise UserError(
        f'config.init_from: parameter {name} has shape {value.shape} here but '
        f'{source[name].shape} in {path}; the model configs differ'
      )
    chosen[name] = np.asarray(source[name], value.dtype)
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    raise UserError(
      f'config.init_from.load pattern(s) {unused} match no parameter; parameters '
      f'look like {next(iter(flat))}'
    )
  return chosen


def merge(params, chosen):
  """`params` with the leaves named in `chosen` (from load_matching) replaced, keeping shardings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  for name, value in chosen.items():
    flat[name] = jax.device_put(value, flat[name].sharding)
  return flax.traverse_util.unflatten_dict(flat, sep='/')
