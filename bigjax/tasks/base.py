"""The Task interface every objective implements, and the data facts it is built from.

`build()` derives `DataInfo` once from the dataset's info and the tokenizer and hands it to the task
(`Task(data, **config.task.kwargs)`) and, through `Model.data_fields`, to the model: sizes are never
written twice in a config.

A task's methods, in the order a step uses them:
  prepare(batch, rng)            on device, inside the jitted step: batch -> model batch (default:
                                 unchanged), e.g. next-token targets or MLM masking.
  loss_and_metrics(outputs, b)   on device: (scalar loss, {name: scalar}).
  eval_outputs(outputs, b)       on device: per-example arrays (B, ...) gathered over the eval split.
  eval_report(outputs, labels)   on the host: the gathered outputs (N, ...) -> {metric: value}.
and `output_size` (what the model's last axis must be), `check_data` (host arrays before training).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Facts about the data, derived once by build(); None where they do not apply.

  num_classes: label classes of the dataset (its TFDS ClassLabel, or the text view's labels).
  label_shape: shape of one label (() for class ids; (D,) for a D-dim regression target).
  vocab_size, num_regular_tokens, pad_id, cls_id, sep_id, mask_id: the tokenizer's (text only;
  ids >= num_regular_tokens are the specials). seq_len: tokens per example (config.data.seq_len).
  """

  num_classes: int | None = None
  label_shape: tuple[int, ...] = ()
  vocab_size: int | None = None
  num_regular_tokens: int | None = None
  pad_id: int | None = None
  cls_id: int | None = None
  sep_id: int | None = None
  mask_id: int | None = None
  seq_len: int | None = None

  def require(self, field: str, task: str) -> Any:
    """The value of `field`; ValueError when the data does not provide it."""
    value = getattr(self, field)
    if value is None:
      raise ValueError(f'the {task} task needs data with a {field} (this dataset/view has none)')
    return value


Batch = dict[str, jax.Array]


class Task(abc.ABC):
  """Base of every objective; `data` is the run's DataInfo."""

  writes_predictions = False  # True: eval outputs are class scores (config.save_eval_predictions)

  def __init__(self, data: DataInfo):
    self.data = data

  @property
  @abc.abstractmethod
  def output_size(self) -> int:
    """Size of the model output's last axis (classes, vocabulary, regression dims)."""

  def check_data(self, arrays: dict[str, np.ndarray], name: str, split: str) -> None:
    """Raises DataError naming the first bad record of a host split (default: accepts all)."""
    del arrays, name, split

  def prepare(self, batch: Batch, rng: jax.Array) -> Batch:
    """On-device batch -> the batch the model and loss see (default: unchanged)."""
    del rng
    return batch

  @abc.abstractmethod
  def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Model outputs and the prepared batch -> (scalar loss, {name: scalar metric})."""

  @abc.abstractmethod
  def eval_outputs(self, outputs: Any, batch: Batch) -> Any:
    """Model outputs -> per-example arrays (B, ...) (or a dict of them) kept for the report."""

  @abc.abstractmethod
  def eval_report(self, outputs: Any, labels: np.ndarray | None) -> dict[str, Any]:
    """Host report over the whole eval split: gathered eval outputs (N, ...) -> {metric: value}."""

  @property
  @abc.abstractmethod
  def report_metrics(self) -> tuple[str, ...]:
    """The scalar metrics eval_report returns (what config.early_stopping.metric may name)."""

  def prediction_scores(self, outputs: Any) -> np.ndarray:
    """Eval outputs (N, ...) -> the scores written to eval_predictions.npz (writes_predictions)."""
    raise NotImplementedError(f'{type(self).__name__} writes no eval predictions')
