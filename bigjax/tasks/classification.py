"""Classification: softmax cross-entropy (optional label smoothing) or binary sigmoid cross-entropy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax import metrics
from bigjax.data import pipeline
from bigjax.tasks import base


class Task(base.Task):
  """K = data.num_classes (from the dataset); the model outputs (B, K) logits, or (B, 1) when
  binary=True (two classes, label 1 = positive).

  label_smoothing: mass spread uniformly over the K classes (softmax only).
  """

  writes_predictions = True

  def __init__(self, data: base.DataInfo, label_smoothing: float = 0.0, binary: bool = False):
    super().__init__(data)
    self.num_classes = data.require('num_classes', 'classification')
    if binary and self.num_classes != 2:
      raise ValueError(f'binary=True needs a dataset with 2 classes, not {self.num_classes}')
    self.label_smoothing = label_smoothing
    self.binary = binary

  @property
  def output_size(self) -> int:
    return 1 if self.binary else self.num_classes

  def check_data(self, arrays, name, split):
    pipeline.check_labels(arrays, self.num_classes, name, split)

  @property
  def report_metrics(self) -> tuple[str, ...]:
    if self.binary:  # roc_auc only when the eval split holds both classes
      return ('loss', 'accuracy', 'precision', 'recall', 'f1', 'roc_auc')
    top5 = ('top5_accuracy',) if self.num_classes > 5 else ()
    return ('loss', 'accuracy', 'precision_macro', 'recall_macro', 'f1_macro', *top5)

  def prediction_scores(self, outputs):
    """(N, 1) P(label=1) -> (N,) when binary, else the (N, K) class probabilities."""
    return outputs[:, 0] if self.binary else outputs

  def loss_and_metrics(self, logits, batch):
    """logits (B, K) or (B, 1) float32; batch['label'] (B,) int -> (scalar loss, {'accuracy': ()})."""
    labels = batch['label']
    chex.assert_rank(labels, 1)
    chex.assert_shape(logits, (labels.shape[0], self.output_size))
    if self.binary:
      losses = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
      correct = (logits[:, 0] > 0) == (labels == 1)
    else:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
      losses = optax.softmax_cross_entropy(logits, targets)
      correct = logits.argmax(-1) == labels
    return losses.mean(), {'accuracy': correct.mean()}

  def eval_outputs(self, logits, batch):
    """(B, K) logits -> (B, K) class probabilities ((B, 1) P(label=1) when binary), kept for the report."""
    del batch
    return jax.nn.sigmoid(logits) if self.binary else jax.nn.softmax(logits)

  def eval_report(self, probs, labels):
    """Host report from all eval examples: probs (N, K) or (N, 1), labels (N,) -> metrics dict."""
    if self.binary:
      p = probs[:, 0].astype(np.float64)
      loss = -np.mean(labels * np.log(p + 1e-12) + (1 - labels) * np.log(1 - p + 1e-12))
      return {'loss': float(loss), **metrics.binary_report(p, labels)}
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels].astype(np.float64) + 1e-12))
    return {'loss': float(loss), **metrics.multiclass_report(probs, labels)}
