"""SHAP values for tabular models with the `shap` library, and their agreement with integrated
gradients.

SHAP's model-agnostic KernelExplainer sees the model only as a function of numpy rows; bigjax hands
it the jitted, batched model score, so each of its (many) coalition batches is one compiled call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import scipy.stats

from bigjax.errors import UserError


def shap_values(
  score_fn: Callable[[np.ndarray], np.ndarray],
  x: np.ndarray,
  background: np.ndarray,
  *,
  num_background: int = 50,
  nsamples: int | str = 'auto',
  seed: int = 0,
) -> tuple[np.ndarray, float]:
  """Kernel SHAP values of `score_fn` (N, F) -> (N,) for rows x (B, F) -> ((B, F), base value).

  background: rows that stand for "feature missing" (the training split); num_background of them
  are drawn with `seed` (more is slower: Kernel SHAP evaluates every coalition against each).
  Local accuracy: each row's values sum to score_fn(x_b) - base value (the mean background score).
  """
  try:
    import shap
  except ImportError:
    raise UserError('SHAP values need the shap package: pip install shap') from None
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(background), size=min(num_background, len(background)), replace=False)
  explainer = shap.KernelExplainer(
    lambda rows: np.asarray(score_fn(np.asarray(rows, np.float32)), np.float64),
    np.asarray(background[rows], np.float64),
  )
  values = explainer.shap_values(np.asarray(x, np.float64), nsamples=nsamples, silent=True)
  return np.asarray(values, np.float32).reshape(x.shape), float(
    np.ravel(explainer.expected_value)[0]
  )


def rank_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """How two attributions (B, F) rank the features.

  'global': Spearman correlation of the features' mean |attribution| over the rows (the feature
  importance ranking); 'per_example': the mean over rows of the Spearman correlation of |a_b| and
  |b_b|; 'top5_overlap': the share of the 5 globally most important features they have in common.
  """
  a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
  ga, gb = a.mean(0), b.mean(0)
  per_example = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
  k = min(5, a.shape[1])
  top = len(set(np.argsort(-ga)[:k]) & set(np.argsort(-gb)[:k])) / k
  return {
    'global': float(scipy.stats.spearmanr(ga, gb).statistic),
    'per_example': float(np.nanmean(per_example)),
    'top5_overlap': float(top),
  }


def device_score_fn(jitted: Callable, batch: int = 1024) -> Callable[[np.ndarray], np.ndarray]:
  """A (N, F) numpy -> (N,) numpy function from a jitted (n, F) -> (n,) one, in fixed-size padded
  chunks of `batch` rows so that SHAP's varying batch sizes compile once."""

  def fn(rows: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(rows), batch):
      chunk = rows[i : i + batch]
      padded = np.concatenate(
        [chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)]
      )
      out.append(np.asarray(jax.device_get(jitted(padded)))[: len(chunk)])
    return np.concatenate(out)

  return fn
