"""What a run tells the user: a console progress bar, TensorBoard event files, JSON files.

Only process 0 writes. TensorBoard events go through tensorboardX (no TensorFlow needed).
"""
import json
import os
import tempfile

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def write_json_atomic(path, obj):
  """Writes `obj` as JSON to `path` via a temporary file and rename (never a half-written file)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_builtin)
  os.replace(tmp, path)


def _to_builtin(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')


class Reporter:
  """Progress bar + TensorBoard scalars for a run from `first_step` to `total_steps`."""

  def __init__(self, workdir, first_step, total_steps, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard')) if self.enabled else None
    self.bar = tqdm.tqdm(total=total_steps, initial=first_step, unit='step', dynamic_ncols=True,
                         disable=not self.enabled, mininterval=1.0)

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
      self.bar.set_postfix({k: f'{v:.4g}' for k, v in scalars.items() if k in ('loss', 'accuracy')},
                           refresh=False)

  def print(self, text):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.writer.close()
