"""PNG figures of explanations (matplotlib, Agg backend): image maps, token attributions,
attention grids, bar charts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def upsample(maps_Bhw: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
  """(B, h, w) -> (B, H, W) bilinear (jax.image.resize), for Grad-CAM and rollout maps."""
  import jax

  maps = np.asarray(maps_Bhw, np.float32)
  return np.asarray(jax.image.resize(maps, (maps.shape[0], *size), 'bilinear'))


def _show_image(ax, image: np.ndarray) -> None:
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray')
  else:
    ax.imshow(np.clip(image, 0, 1))
  ax.axis('off')


def save_image_maps(
  path: str,
  images_BHWC: np.ndarray,
  maps_BHW: np.ndarray,
  titles: Sequence[str],
  method: str,
  overlay: bool = False,
) -> None:
  """Two rows per figure: the inputs, and each one's map (|attribution| summed over channels, or
  a Grad-CAM / rollout map already (B, H, W), overlaid on the image when `overlay`)."""
  plt = _pyplot()
  n = len(images_BHWC)
  fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
  for i in range(n):
    _show_image(axes[0, i], images_BHWC[i])
    axes[0, i].set_title(titles[i], fontsize=7)
    if overlay:
      _show_image(axes[1, i], images_BHWC[i])
      axes[1, i].imshow(maps_BHW[i], cmap='jet', alpha=0.5)
    else:
      axes[1, i].imshow(maps_BHW[i], cmap='hot')
      axes[1, i].axis('off')
  fig.suptitle(method, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def save_token_attributions(
  path: str, tokens: Sequence[Sequence[str]], attributions_BT: np.ndarray, method: str
) -> None:
  """One row of coloured token boxes per example (red positive, blue negative)."""
  plt = _pyplot()
  rows = len(tokens)
  width = max(len(t) for t in tokens)
  fig, ax = plt.subplots(figsize=(min(0.35 * width + 1, 40), 0.5 * rows + 0.8))
  a = np.asarray(attributions_BT, np.float32)
  ax.imshow(
    np.where(np.arange(a.shape[1])[None] < np.array([len(t) for t in tokens])[:, None], a, 0),
    cmap='bwr',
    vmin=-np.abs(a).max() - 1e-12,
    vmax=np.abs(a).max() + 1e-12,
    aspect='auto',
  )
  for r, row in enumerate(tokens):
    for c, tok in enumerate(row):
      ax.text(c, r, tok, ha='center', va='center', fontsize=6)
  ax.set_yticks(range(rows))
  ax.set_xticks([])
  ax.set_title(method, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def save_attention_grid(
  path: str, maps_LNTS: np.ndarray, labels: Sequence[str] | None, title: str
) -> None:
  """One panel per (layer, head) of one example's attention probabilities (L, N, T, S)."""
  plt = _pyplot()
  L, N = maps_LNTS.shape[:2]
  fig, axes = plt.subplots(L, N, figsize=(2.0 * N + 0.4, 2.0 * L + 0.6), squeeze=False)
  for l in range(L):
    for h in range(N):
      ax = axes[l, h]
      ax.imshow(maps_LNTS[l, h], cmap='viridis', vmin=0)
      ax.set_title(f'layer {l} head {h}', fontsize=7)
      if labels is not None and len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, fontsize=4, rotation=90)
        ax.set_yticks(range(len(labels)), labels, fontsize=4)
      else:
        ax.set_xticks([])
        ax.set_yticks([])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def save_bars(path: str, names: Sequence[str], series: dict[str, np.ndarray], title: str) -> None:
  """Horizontal bars of one or more value series over the same names (features, tokens)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 0.22 * len(names) + 1.2))
  y = np.arange(len(names))
  height = 0.8 / len(series)
  for i, (label, values) in enumerate(series.items()):
    ax.barh(y + i * height, values, height=height, label=label)
  ax.set_yticks(y + 0.4 - height / 2, names, fontsize=6)
  ax.invert_yaxis()
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
