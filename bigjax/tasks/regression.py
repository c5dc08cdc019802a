"""Regression: mean squared error on float targets."""

import chex
import jax.numpy as jnp
import numpy as np

from bigjax import metrics
from bigjax.tasks import base


class Task(base.Task):
  """D = the size of one label (data.label_shape; 1 for scalar targets); the model outputs (B, D)
  predictions for batch['label'] of shape (B,) or (B, D)."""

  def __init__(self, data: base.DataInfo):
    super().__init__(data)
    self.num_outputs = int(np.prod(data.label_shape, dtype=int))

  @property
  def output_size(self) -> int:
    return self.num_outputs

  report_metrics = ('loss', 'mae', 'r2')

  def _targets(self, label, like):
    return jnp.reshape(label, like.shape).astype(jnp.float32)

  def loss_and_metrics(self, preds, batch):
    """preds (B, D) float32 -> (scalar MSE, {'mae': ()})."""
    chex.assert_rank(preds, 2)
    err = preds - self._targets(batch['label'], preds)
    return jnp.mean(err**2), {'mae': jnp.mean(jnp.abs(err))}

  def eval_outputs(self, preds, batch):
    del batch
    return preds

  def eval_report(self, preds, labels):
    """Host report: preds (N, D), labels (N,) or (N, D) -> {'loss' (MSE), 'mae', 'r2'}."""
    return metrics.regression_report(preds, np.reshape(labels, preds.shape))
