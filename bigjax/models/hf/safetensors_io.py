"""HuggingFace `save_pretrained` directories: read config.json and the safetensors weights (one
`model.safetensors`, or shards listed in `model.safetensors.index.json`) tensor by tensor into
numpy with the `safetensors` package, build parameters straight into their shardings, and write
a directory that `transformers` loads. No torch.

Sharded loading: `load_sharded` builds each parameter with `jax.make_array_from_callback` over
its NamedSharding, so each device receives only its slice; the host holds one converted tensor at
a time (a fused or transposed HF tensor is read whole, then sliced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import json
import os
import shutil
import struct

import jax
import numpy as np

from bigjax import reporting
from bigjax.errors import UserError

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
# Files copied next to exported weights when the run started from a directory that has them.
TOKENIZER_FILES = (
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'generation_config.json',
)


def read_config(directory: str, field: str = 'config.init_from.hf') -> dict:
  """config.json of a save_pretrained directory as a dict; UserError (naming `field`, the file
  and the fix) if the directory is missing, is not an HF checkpoint or has no safetensors."""
  path = os.path.expanduser(directory)
  fix = 'give a directory written by save_pretrained(dir) (config.json + model.safetensors)'
  if not os.path.isdir(path):
    raise UserError(f'{field}={directory!r} is not a directory; {fix}')
  config_path = os.path.join(path, CONFIG)
  if not os.path.exists(config_path):
    raise UserError(f'{field}={directory!r} has no {CONFIG}: not a HuggingFace checkpoint; {fix}')
  if not any(os.path.exists(os.path.join(path, f)) for f in (WEIGHTS, INDEX)):
    torch_only = any(f.endswith('.bin') for f in os.listdir(path))
    raise UserError(
      f'{field}={directory!r} has no {WEIGHTS} or {INDEX}'
      + (' (only PyTorch .bin weights)' if torch_only else '')
      + '; save it with save_pretrained(dir, safe_serialization=True)'
    )
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{config_path} cannot be read as JSON ({e}); {fix}') from None
  if not isinstance(config, dict):
    raise UserError(f'{config_path} is not a JSON object; {fix}')
  return config


def _to_float32(value: np.ndarray) -> np.ndarray:
  return np.asarray(value, np.float32)


class SafetensorsSource:
  """The tensors of a save_pretrained directory as a `convert.Source` (names without `prefix`).

  Opens each safetensors file once (lazily, memory-mapped by safetensors) and reads a tensor only
  when asked; shapes come from the file headers.
  """

  def __init__(self, directory: str, prefix: str):
    from bigjax.models.hf import convert

    self.directory = os.path.expanduser(directory)
    index = os.path.join(self.directory, INDEX)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
          f'{index} is not a safetensors index ({e}); re-save the checkpoint with save_pretrained'
        ) from None
      for file in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(self.directory, file)):
          raise UserError(
            f'{index} lists {file}, which is not in {self.directory}; copy every shard'
          )
      self.where = index
    else:
      weight_map = {name: WEIGHTS for name in self._handle(WEIGHTS).keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
      self.where = os.path.join(self.directory, WEIGHTS)
    self._file = weight_map
    self._stored = convert.strip_prefix(weight_map, prefix)

  def _handle(self, file: str):
    import safetensors

    if not hasattr(self, '_handles'):
      self._handles: dict = {}
    if file not in self._handles:
      path = os.path.join(self.directory, file)
      try:
        self._handles[file] = safetensors.safe_open(path, framework='numpy')
      except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
        raise UserError(f'{path} cannot be read as safetensors ({e}); re-save it') from None
    return self._handles[file]

  def names(self) -> set[str]:
    return set(self._stored)

  def file_of(self, name: str) -> str:
    return os.path.join(self.directory, self._file[self._stored[name]])

  def shape(self, name: str) -> tuple[int, ...]:
    stored = self._stored[name]
    return tuple(self._handle(self._file[stored]).get_slice(stored).get_shape())

  def read(self, name: str) -> np.ndarray:
    stored = self._stored[name]
    file = self._file[stored]
    if self._handle(file).get_slice(stored).get_dtype() == 'BF16':
      return self._read_bfloat16(file, stored)
    return _to_float32(self._handle(file).get_tensor(stored))

  def _read_bfloat16(self, file: str, stored: str) -> np.ndarray:
    """A BF16 tensor (most released checkpoints) as float32: safetensors' numpy backend has no
    bfloat16, so its bytes are read at the offsets of the file's header (the safetensors format:
    an 8-byte little-endian header size, a JSON header, the data) and widened exactly (a bfloat16
    is the top half of a float32)."""
    path = os.path.join(self.directory, file)
    with open(path, 'rb') as f:
      size = struct.unpack('<Q', f.read(8))[0]
      entry = json.loads(f.read(size))[stored]
      begin, end = entry['data_offsets']
      f.seek(8 + size + begin)
      half = np.frombuffer(f.read(end - begin), '<u2')
    return (half.astype(np.uint32) << 16).view(np.float32).reshape(entry['shape'])


def load_sharded(
  loaders: Mapping[str, Callable[[], np.ndarray]],
  abstract: Mapping[str, jax.ShapeDtypeStruct],
  shardings: Mapping[str, jax.sharding.Sharding],
) -> dict[str, jax.Array]:
  """{path: jax.Array}: each parameter `loaders[path]()` (host float32, the param's shape) cast to
  abstract[path].dtype and placed with shardings[path], every device receiving only its slice."""
  out: dict[str, jax.Array] = {}
  for path, load in loaders.items():
    want = abstract[path]
    held: list[np.ndarray] = []

    def slice_of(index, load=load, want=want, held=held):
      if not held:
        held.append(np.asarray(load(), want.dtype))
      return held[0][index]

    out[path] = jax.make_array_from_callback(tuple(want.shape), shardings[path], slice_of)
    held.clear()
  return out


def save_pretrained(
  directory: str,
  tensors: Mapping[str, np.ndarray],
  hf_config: dict,
  copy_from: str | None = None,
  files: Iterable[str] = TOKENIZER_FILES,
) -> str:
  """Writes `directory`/model.safetensors (safetensors.numpy, metadata format 'pt' as transformers
  expects) and config.json, plus `files` found in `copy_from` (the tokenizer of the checkpoint a
  run started from). Returns the directory."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WEIGHTS)
  tmp = path + '.tmp'
  save_file(
    {k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata={'format': 'pt'}
  )
  os.replace(tmp, path)
  reporting.write_json_atomic(os.path.join(directory, CONFIG), hf_config)
  if copy_from:
    for name in files:
      src = os.path.join(os.path.expanduser(copy_from), name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(directory, name))
  return directory
