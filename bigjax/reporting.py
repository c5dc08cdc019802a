"""What a run tells the user: a console progress bar, TensorBoard event files, JSON files.

Only process 0 writes. TensorBoard events go through tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
import tqdm


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to `path` via a temporary file in the same directory and a
  rename, so readers and a crash never see a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_')
  try:
    with os.fdopen(fd, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the run's files follow the umask
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as JSON (numpy values as lists) to `path` atomically (see write_atomic)."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_builtin))


def _to_builtin(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')


class Reporter:
  """Progress bar + TensorBoard scalars for a run from `first_step` to `total_steps`."""

  def __init__(self, workdir, first_step, total_steps, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard')) if self.enabled else None
    self.bar = tqdm.tqdm(
      total=total_steps,
      initial=first_step,
      unit='step',
      dynamic_ncols=True,
      disable=not self.enabled,
      mininterval=1.0,
    )

  def step(self, n=1):
    self.bar.update(n)

  def scalars(self, step, prefix, metrics):
    """Logs the scalar entries of `metrics` as `prefix/name` at `step`."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    for name, value in scalars.items():
      self.writer.add_scalar(f'{prefix}/{name}', value, step)
    if prefix == 'train':
      self.bar.set_postfix(
        {k: f'{v:.4g}' for k, v in scalars.items() if k in ('loss', 'accuracy')}, refresh=False
      )

  def print(self, text):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.writer.close()
