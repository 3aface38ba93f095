"""eval/settings.png: every sampled setting beside the context rows, on the modality's comparison figures.

One panel per comparison figure (`Evaluator.comparison`) other than the coverage figure
(`Evaluator.coverage`), plotted against coverage: a dot per setting, labelled with its name; the
no-structure row, with the region where a setting beats it on both figures shaded; the reference row
(the held-out fields: the ceiling) and the baseline row (noisy training fields). A setting in the shaded
region of every panel is better than `no_structure` on every figure at once.
"""

from __future__ import annotations

import numpy as np

from nfjax.evaluate import no_structure
from nfjax.io import files

CONTEXT_STYLE = {
    no_structure.NAME: dict(marker='X', color='tab:red', s=90, label='no_structure (per-slot histograms, conditioned as the model)'),
    no_structure.NAME_CLASS: dict(marker='P', color='tab:orange', s=80,
                               label='no_structure_class (per-class histograms, prototypes ignored)'),
    'reference': dict(marker='*', color='tab:green', s=160, label='reference (held-out fields: the ceiling)'),
    'baseline': dict(marker='s', color='tab:gray', s=50, label='baseline (training fields + noise)'),
}


def better(a: float, b: float, direction) -> bool:
  """a strictly better than b: direction 'higher', 'lower', or the ideal value (nearer is better)."""
  if direction == 'higher':
    return a > b
  if direction == 'lower':
    return a < b
  return abs(a - float(direction)) < abs(b - float(direction))


def _better_span(at: float, direction, lo: float, hi: float) -> tuple[float, float]:
  """The stretch of an axis [lo, hi] better than `at`."""
  if direction == 'higher':
    return at, hi
  if direction == 'lower':
    return lo, at
  t = float(direction)
  return t - abs(at - t), t + abs(at - t)


def _wording(direction) -> str:
  return f"{direction} is better" if isinstance(direction, str) else f"nearer {direction:g} is better"


def _xy(row: dict, xkey: str, ykey: str):
  x, y = row.get(xkey), row.get(ykey)
  ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in (x, y))
  return (float(x), float(y)) if ok else None


def settings_png(path: str, figures, coverage: str, settings: dict[str, dict], context: dict[str, dict],
                 headline: str = '', title: str = '') -> bool:
  """Write the picture; figures: ((key, label, format, 'higher' | 'lower' | ideal value), ...), `coverage` the key on
  the x axis; settings / context: {name: result row}; `headline` (a setting's name) is ringed. Returns
  False (nothing written) when the figures have no directions or no coverage figure."""
  xf = next((f for f in figures if f[0] == coverage), None)
  panels = [f for f in figures if f[0] != coverage]
  if xf is None or not panels or any(len(f) < 4 for f in figures):
    return False
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.0), squeeze=False)
  for ax, yf in zip(axes[0], panels):
    for name, row in settings.items():
      p = _xy(row, xf[0], yf[0])
      if p is not None:
        ax.scatter(*p, color='tab:blue', s=36, zorder=3, label='a sampled setting')
        if name == headline:
          ax.scatter(*p, facecolors='none', edgecolors='k', s=150, linewidths=1.2, zorder=3, label='the headline')
        ax.annotate(name, p, fontsize=7, xytext=(4, 3), textcoords='offset points')
    for name, row in context.items():
      p = _xy(row, xf[0], yf[0])
      if p is not None:
        ax.scatter(*p, zorder=4, **CONTEXT_STYLE.get(name, dict(marker='D', color='k', s=50, label=name)))
    ns = _xy(context.get(no_structure.NAME, {}), xf[0], yf[0])
    if ns is not None:
      ax.margins(0.15)
      ax.autoscale_view()
      (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
      xs, ys = _better_span(ns[0], xf[3], x0, x1), _better_span(ns[1], yf[3], y0, y1)
      ax.fill_between(xs, ys[0], ys[1], color='tab:red', alpha=0.08, zorder=0,
                      label='better than no_structure on both axes')
      ax.set_xlim(x0, x1)
      ax.set_ylim(y0, y1)
    ax.set_xlabel(f"{xf[1]} ({_wording(xf[3])})")
    ax.set_ylabel(f"{yf[1]} ({_wording(yf[3])})")
    ax.grid(alpha=0.3)
  legend = {}
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  fig.legend(list(legend.values()), list(legend), loc='lower center', ncol=3, fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.11, 1, 1))
  files.write_figure(path, fig, dpi=100)
  return True
