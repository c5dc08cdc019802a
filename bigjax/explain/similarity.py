"""How alike two saliency maps are: Spearman rank correlation and SSIM (Adebayo et al. 2018).

SSIM is written out (Wang et al. 2004, a uniform 7x7 window, K1 = 0.01, K2 = 0.03, the same
definition as skimage.metrics.structural_similarity's defaults) because scikit-image is not a
dependency of bigjax and a dozen lines of numpy/scipy do it.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import scipy.stats


def to_map(attributions: np.ndarray, absolute: bool = True) -> np.ndarray:
  """(B, H, W[, C]) attributions -> (B, H, W) maps: |a| summed over channels (or a summed over
  channels, keeping the sign, when not absolute)."""
  a = np.asarray(attributions, np.float64)
  if a.ndim == 4:
    a = np.abs(a).sum(-1) if absolute else a.sum(-1)
  elif absolute:
    a = np.abs(a)
  return a


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(B,) Spearman rank correlation of the flattened maps a[i], b[i] (B, ...); constant maps 0."""
  out = []
  for x, y in zip(np.asarray(a), np.asarray(b)):
    x, y = x.ravel(), y.ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
      out.append(0.0)
    else:
      out.append(float(scipy.stats.spearmanr(x, y).statistic))
  return np.array(out)


def normalize(maps: np.ndarray) -> np.ndarray:
  """Each map (B, H, W) scaled to [0, 1] (constant maps to 0), as compared by SSIM."""
  m = np.asarray(maps, np.float64)
  lo = m.min(axis=(1, 2), keepdims=True)
  span = m.max(axis=(1, 2), keepdims=True) - lo
  return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7) -> np.ndarray:
  """(B,) mean structural similarity of maps a[i], b[i] (B, H, W), both normalised to [0, 1]."""
  a, b = normalize(a), normalize(b)
  win = min(win, a.shape[1], a.shape[2])
  c1, c2 = 0.01**2, 0.03**2
  mean = lambda x: scipy.ndimage.uniform_filter(x, size=(1, win, win), mode='reflect')
  n = win * win
  cov = n / (n - 1)  # sample (co)variances, as skimage
  mu_a, mu_b = mean(a), mean(b)
  var_a = cov * (mean(a * a) - mu_a**2)
  var_b = cov * (mean(b * b) - mu_b**2)
  cov_ab = cov * (mean(a * b) - mu_a * mu_b)
  s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
    (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  )
  r = win // 2
  return s[:, r : s.shape[1] - r, r : s.shape[2] - r].mean(axis=(1, 2))
