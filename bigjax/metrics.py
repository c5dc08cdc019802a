"""Host-side evaluation reports (scikit-learn does the arithmetic).

Train metrics stay on device inside the step (see `bigjax.steps`); these functions take the whole
gathered eval set as numpy arrays.
"""

import numpy as np
from sklearn import metrics as skm


def multiclass_report(probs, labels):
  """probs (N, K) class probabilities, labels (N,) ints -> accuracy, top-5, macro P/R/F1, confusion."""
  k = probs.shape[1]
  pred = probs.argmax(-1)
  p, r, f1, _ = skm.precision_recall_fscore_support(
    labels, pred, labels=np.arange(k), average='macro', zero_division=0
  )
  report = {
    'accuracy': float(skm.accuracy_score(labels, pred)),
    'precision_macro': float(p),
    'recall_macro': float(r),
    'f1_macro': float(f1),
    'confusion_matrix': skm.confusion_matrix(labels, pred, labels=np.arange(k)).tolist(),
  }
  if k > 5:
    report['top5_accuracy'] = float(
      skm.top_k_accuracy_score(labels, probs, k=5, labels=np.arange(k))
    )
  return report


def binary_report(p_positive, labels, threshold=0.5):
  """p_positive (N,) P(label=1), labels (N,) in {0, 1} -> accuracy, P/R/F1, ROC-AUC, confusion."""
  pred = (p_positive > threshold).astype(int)
  p, r, f1, _ = skm.precision_recall_fscore_support(labels, pred, average='binary', zero_division=0)
  report = {
    'accuracy': float(skm.accuracy_score(labels, pred)),
    'precision': float(p),
    'recall': float(r),
    'f1': float(f1),
    'confusion_matrix': skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
  }
  if len(np.unique(labels)) == 2:
    report['roc_auc'] = float(skm.roc_auc_score(labels, p_positive))
  return report


def regression_report(preds, targets):
  """preds, targets (N, D) -> {'loss': MSE, 'mae', 'r2'}."""
  return {
    'loss': float(skm.mean_squared_error(targets, preds)),
    'mae': float(skm.mean_absolute_error(targets, preds)),
    'r2': float(skm.r2_score(targets, preds)),
  }
