"""Does the model generate or memorize? Nearest training neighbours and their pictures.

For every generated field: the L2 distance from its render to the nearest real training image
(pixel space, [0, 1] pixels, sqrt of the sum over H*W) and from its weight vector to the nearest
training weight vector. The neighbour search is a jitted float32 matmul; the distance to the
chosen neighbour is then recomputed exactly in float64, so copies read as ~0, not as rounding noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.io import files
from nfjax.utils import images as img_utils


@jax.jit
def _argmin_block(a, b, b_sq):
  d2 = jnp.sum(a * a, 1)[:, None] + b_sq[None, :] - 2.0 * a @ b.T
  return jnp.argmin(d2, axis=1)


def nearest(a: np.ndarray, b: np.ndarray, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Nearest row of b for every row of a (L2). a [n, ...], b [m, ...] -> (dist [n] f64, index [n])."""
  a = np.asarray(a, np.float32).reshape(len(a), -1)
  b = np.asarray(b, np.float32).reshape(len(b), -1)
  if len(a) == 0 or len(b) == 0:
    return np.full(len(a), np.nan), np.full(len(a), -1, np.int64)
  bj = jnp.asarray(b)
  b_sq = jnp.sum(bj * bj, 1)
  size = min(block, len(a))
  idx = []
  for i in range(0, len(a), size):
    chunk = a[i:i + size]
    m = len(chunk)
    if m < size:
      chunk = np.concatenate([chunk, np.zeros((size - m, a.shape[1]), np.float32)])
    idx.append(np.asarray(_argmin_block(jnp.asarray(chunk), bj, b_sq))[:m])
  idx = np.concatenate(idx).astype(np.int64)
  dist = np.linalg.norm(a.astype(np.float64) - b[idx].astype(np.float64), axis=1)
  return dist, idx


def stats(x: np.ndarray) -> dict:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  if len(x) == 0:
    return {k: float('nan') for k in ('mean', 'median', 'p05', 'p95', 'min')}
  return {'mean': float(x.mean()), 'median': float(np.median(x)), 'p05': float(np.percentile(x, 5)),
          'p95': float(np.percentile(x, 95)), 'min': float(x.min())}


def histogram_png(path: str, pixel: dict[str, np.ndarray], weight: dict[str, np.ndarray],
                  recon_error: np.ndarray | None = None, copy_threshold: float | None = None,
                  data_title: str = 'L2 to nearest training image (pixels)',
                  recon_label: str = 'fields vs their own image', fmt: str = '.2f') -> None:
  """Two panels: distance to the nearest training example (`pixel`: images, or shapes with a
  `data_title` of their own) and to the nearest training weight vector, per set."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  panels = [(axes[0], pixel, data_title),
            (axes[1], weight, 'L2 to nearest training weight vector')]
  for ax, groups, title in panels:
    vals = [np.asarray(v)[np.isfinite(v)] for v in groups.values()]
    if ax is axes[0] and recon_error is not None:
      vals.append(np.asarray(recon_error))
    vals = [v for v in vals if len(v)]
    hi = max((float(np.percentile(v, 99.5)) for v in vals), default=1.0) or 1.0
    bins = np.linspace(0.0, hi * 1.05, 50)
    for name, v in groups.items():
      v = np.asarray(v)[np.isfinite(v)]
      if len(v):
        ax.hist(np.clip(v, 0, bins[-1]), bins=bins, histtype='step', linewidth=1.5, density=True,
                label=f"{name} (median {np.median(v):{fmt}})")
    if ax is axes[0] and recon_error is not None and len(recon_error):
      ax.hist(np.clip(recon_error, 0, bins[-1]), bins=bins, histtype='stepfilled', alpha=0.25, density=True,
              color='gray', label=f"{recon_label} (median {np.median(recon_error):{fmt}})")
      if copy_threshold is not None:
        ax.axvline(copy_threshold, color='k', linestyle='--', linewidth=1, label='copy threshold')
    ax.set_title(title)
    ax.set_xlabel('distance')
    ax.set_ylabel('density')
    ax.legend(fontsize=7)
  fig.tight_layout()
  files.write_figure(path, fig, dpi=100)


NEIGHBOURS_CAPTION = ("c = the class the sample was conditioned on, p = the class the classifier predicts for it; "
                      "the number on a neighbour = its L2 distance to the sample (pixels for the nearest image, "
                      "weights for the nearest weights)")


def neighbours_png(path: str, samples: np.ndarray, cond: np.ndarray, pred: np.ndarray,
                   nn_image: np.ndarray, nn_image_dist: np.ndarray, nn_field: np.ndarray,
                   nn_field_dist: np.ndarray) -> None:
  """Rows: generated sample (cond/pred class), nearest real training image, nearest training field."""
  cols = [f"c{c} p{p}" for c, p in zip(cond, pred)]
  img = img_utils.grid(
      [samples, nn_image, nn_field],
      row_labels=['sample', 'nearest image', 'nearest weights'],
      col_labels=cols, label_width=100)
  # Distances under each neighbour: appended as a caption row of text.
  from PIL import ImageDraw
  draw = ImageDraw.Draw(img)
  scale, pad, top, left = 3, 2, 14, 100
  h = samples.shape[1] * scale
  w = samples.shape[2] * scale
  for j in range(len(samples)):
    x = left + pad + j * (w + pad)
    draw.text((x + 1, top + pad + 2 * (h + pad) - 11), f"{nn_image_dist[j]:.1f}", fill=255)
    draw.text((x + 1, top + pad + 3 * (h + pad) - 11), f"{nn_field_dist[j]:.1f}", fill=255)
  img_utils.save_png(img_utils.captioned(img, 'samples beside their nearest training images and fields',
                                         NEIGHBOURS_CAPTION), path)
