"""What a run tells the user: a console progress bar and eval lines, TensorBoard event files (and
Weights & Biases when config.wandb.project is set), JSON files.

Only process 0 writes. TensorBoard events go through tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import tempfile
import time
from typing import Any
import zlib

import jax
import numpy as np
from tensorboardX import SummaryWriter
import tqdm

from bigjax.config_lib import flat_fields


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
  """Progress bar + TensorBoard (+ W&B) scalars for a run from `first_step` to `total_steps`.

  `wandb`: config.wandb (project '' = no W&B run); `run_config`: the run's config as a dict, sent
  to W&B and, flattened, to TensorBoard's HParams tab by `hparams`."""

  def __init__(self, workdir, first_step, total_steps, enabled=None, wandb=None, run_config=None):
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
    self.wandb = None
    if self.enabled and wandb is not None and wandb.project:
      self.wandb = _start_wandb(wandb, workdir, run_config or {})
    self._rate_mark = (first_step, time.perf_counter())

  def step(self, n=1):
    self.bar.update(n)

  def steps_per_s(self, step: int) -> float:
    """Training steps per second since the previous call (or the start), at `step`."""
    last_step, last_time = self._rate_mark
    now = time.perf_counter()
    self._rate_mark = (step, now)
    return (step - last_step) / max(now - last_time, 1e-9)

  def scalars(self, step, prefix, metrics):
    """Logs the scalar entries of `metrics` as `prefix/name` at `step`."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    for name, value in scalars.items():
      self.writer.add_scalar(f'{prefix}/{name}', value, step)
    if self.wandb is not None:
      self.wandb.log({f'{prefix}/{k}': v for k, v in scalars.items()}, step=step)
    if prefix == 'train':
      self.bar.set_postfix(
        {k: f'{v:.4g}' for k, v in scalars.items() if k in ('loss', 'accuracy', 'lr')},
        refresh=False,
      )

  def hparams(self, run_config: dict, metrics: dict) -> None:
    """An HParams entry (TensorBoard's HParams tab): the flattened config (dotted names; lists and
    None as text) against the eval scalars `metrics` ({'eval/loss': ...}), logged at each step by
    `scalars`, so sweep runs can be compared side by side."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams

    flat = {}
    for name, value in flat_fields(run_config).items():
      flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    experiment, start, end = hparams(flat, {k: float(v) for k, v in metrics.items()})
    writer = self.writer._get_file_writer()
    for summary in (experiment, start, end):
      writer.add_summary(summary)

  def print(self, text):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.writer.close()
      if self.wandb is not None:
        self.wandb.finish()


def _start_wandb(cfg, workdir: str, run_config: dict):
  """A W&B run for this workdir: its id is derived from the workdir's path, so a resumed run logs
  into the same W&B run; its files go to workdir/wandb/."""
  try:
    import wandb
  except ImportError:
    from bigjax.errors import UserError

    raise UserError(
      f'config.wandb.project={cfg.project!r} needs the wandb package: pip install wandb '
      '(or set config.wandb.project= to turn W&B off)'
    ) from None
  run_id = f'bigjax-{zlib.crc32(os.path.abspath(workdir).encode()):08x}'
  return wandb.init(
    project=cfg.project,
    entity=cfg.entity or None,
    name=cfg.name or os.path.basename(os.path.abspath(workdir)),
    id=run_id,
    resume='allow',
    dir=workdir,
    config=flat_fields(run_config),
  )


class Profile:
  """A jax.profiler trace of the steps after `steps[0]` through `steps[1]` (config.profile_steps)
  into `directory`, by process 0; nothing when `steps` is empty."""

  def __init__(self, directory: str, steps: Sequence[int], enabled: bool):
    self.directory, self.steps = directory, tuple(steps) if enabled else ()
    self.active = False

  def before(self, step: int) -> None:
    """Called with the number of steps done, before the next one runs."""
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    """Called with the number of steps done once a step has been dispatched."""
    if self.active and step == self.steps[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
