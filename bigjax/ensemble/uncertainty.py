"""Uncertainty and calibration of class probabilities, on the host: NLL, Brier score, expected
calibration error with its reliability diagram, predictive entropy, and temperature scaling.

Definitions (probs p (N, K), labels y (N,)):
  nll      -mean_n log p[n, y_n]                          (scikit-learn log_loss)
  brier    mean_n sum_k (p[n, k] - [y_n = k])^2            (scikit-learn brier_score_loss)
  ece      sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)| over `bins` equal-width bins of the
           confidence max_k p[n, k] (Guo et al. 2017); scikit-learn's calibration_curve is binary
           only, so the binning is ours.
  entropy  mean_n -sum_k p[n, k] log p[n, k]   (nats)
Binary tasks' (N,) or (N, 1) P(label = 1) are taken as the two classes [1 - p, p].
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

BINS = 15  # equal-width confidence bins of the ECE (Guo et al. 2017 use 15)
_TINY = 1e-12


def as_classes(probs: np.ndarray) -> np.ndarray:
  """(N, K) probabilities unchanged; binary (N,) or (N, 1) P(label=1) -> (N, 2)."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim == 1 or probs.shape[1] == 1:
    p = probs.reshape(-1)
    return np.stack([1 - p, p], axis=1)
  return probs


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
  """Per-bin {'count', 'confidence', 'accuracy'} (each (bins,), NaN where a bin is empty) and
  'edges' (bins + 1,) of the confidence max_k p over [0, 1]."""
  p = as_classes(probs)
  confidence, correct = p.max(1), (p.argmax(1) == np.asarray(labels)).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
  count = np.bincount(which, minlength=bins).astype(np.float64)
  with np.errstate(invalid='ignore'):
    conf = np.bincount(which, confidence, bins) / count
    acc = np.bincount(which, correct, bins) / count
  return {'count': count, 'confidence': conf, 'accuracy': acc, 'edges': edges}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
  """Expected calibration error over `bins` equal-width confidence bins (see module doc)."""
  b = calibration_bins(probs, labels, bins)
  full = b['count'] > 0
  gaps = np.abs(b['accuracy'][full] - b['confidence'][full])
  return float(np.sum(b['count'][full] / b['count'].sum() * gaps))


def entropy(probs: np.ndarray) -> float:
  """Mean predictive entropy in nats."""
  p = as_classes(probs)
  return float(np.mean(-np.sum(p * np.log(np.maximum(p, _TINY)), axis=1)))


def report(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, float]:
  """{'nll', 'brier', 'ece', 'entropy'} of probs (N, K) (or binary (N,) / (N, 1)) against labels."""
  p = as_classes(probs)
  classes = np.arange(p.shape[1])
  p = np.clip(p, _TINY, 1.0)
  p = p / p.sum(1, keepdims=True)
  return {
    'nll': float(skm.log_loss(labels, p, labels=classes)),
    'brier': float(skm.brier_score_loss(labels, p, labels=classes, scale_by_half=False)),
    'ece': ece(p, labels, bins),
    'entropy': entropy(p),
  }


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log p / T): probabilities (N, K) re-tempered (T > 1 softens, T < 1 sharpens); for a
  single model these are softmax(logits / T), for an ensemble its log mean probability scaled."""
  logits = np.log(np.maximum(as_classes(probs), _TINY)) / temperature
  logits -= logits.max(1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
  """The T in [0.05, 20] minimising the NLL of with_temperature(probs, T) on a held-out split
  (Guo et al. 2017), by scipy's bounded scalar search over log T."""
  from scipy import optimize

  nll = lambda log_t: skm.log_loss(
    labels,
    with_temperature(probs, float(np.exp(log_t))),
    labels=np.arange(as_classes(probs).shape[1]),
  )
  result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method='bounded')
  return float(np.exp(result.x))


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, path: str, title: str = '') -> None:
  """Writes `path` (.png): accuracy per confidence bin against the diagonal, the gap shaded, the
  share of examples per bin below, the ECE in the title."""
  import io

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from bigjax.reporting import write_atomic

  b = calibration_bins(probs, labels)
  centers = (b['edges'][:-1] + b['edges'][1:]) / 2
  width = b['edges'][1] - b['edges'][0]
  full = b['count'] > 0
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(4.2, 5.0), sharex=True, gridspec_kw={'height_ratios': [3, 1]}
  )
  top.bar(centers[full], b['accuracy'][full], width, edgecolor='k', label='accuracy')
  top.bar(
    centers[full],
    b['confidence'][full] - b['accuracy'][full],
    width,
    bottom=b['accuracy'][full],
    color='r',
    alpha=0.3,
    label='gap to confidence',
  )
  top.plot([0, 1], [0, 1], 'k--', lw=1)
  top.set(ylabel='accuracy', xlim=(0, 1), ylim=(0, 1))
  top.set_title(f'{title + ": " if title else ""}ECE {ece(probs, labels):.4f}', fontsize=9)
  top.legend(fontsize=7, loc='upper left')
  bottom.bar(centers, b['count'] / b['count'].sum(), width, edgecolor='k')
  bottom.set(xlabel='confidence (max class probability)', ylabel='share')
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  write_atomic(path, buffer.getvalue())
