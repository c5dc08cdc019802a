"""Regression: mean squared error on float targets."""
import chex
import jax.numpy as jnp
import numpy as np

from bigjax import metrics


class Task:
  """num_outputs: D; the model outputs (B, D) predictions for batch['label'] of shape (B,) or (B, D)."""

  def __init__(self, num_outputs=1):
    self.num_outputs = num_outputs

  def check_data(self, arrays, name, split):
    del arrays, name, split  # any finite float target is valid

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
