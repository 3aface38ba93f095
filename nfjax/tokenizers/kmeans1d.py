"""Exact 1-D k-means (scalar codebooks) on sorted data, plus the uniform and quantile baselines.

Why not a generic k-means here: in one dimension the nearest-code cells are intervals between
the midpoints of the sorted codes. With the data sorted once (O(N log N)) and float64 prefix sums
of x and x^2, one Lloyd iteration is K binary searches plus K differences: O(K log N), independent
of N. Fitting 245 codes to 2.8M scalars with 25 restarts x 100 iterations therefore takes well
under a second after the sort, and every iteration is exact (no sampling, no histogram). The
float64 prefix sums are what make the per-cell sums exact; there is nothing for an accelerator to
do, so this part is numpy. (Vector codebooks, where distances are real work, are JAX:
`nfjax.tokenizers.kmeans`.)

Conventions: codes are returned sorted ascending; `pinned` values are codes that Lloyd never moves
(e.g. 0.0 in residual mode, where every weight of a dead neuron equals its initial value, so
w - w_init is exactly 0 for a fifth of all weights); dead codes (fewer than `dead_threshold`
members) are moved into the cell that contributes most to the distortion.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Sorted1D:
  """Sorted float64 data with prefix sums: the sufficient statistics of (weighted) 1-D k-means."""
  x: np.ndarray    # [N] sorted
  s0: np.ndarray   # [N+1] prefix sums of the weights (of 1 when unweighted)
  s1: np.ndarray   # [N+1] prefix sums of weight * x
  s2: np.ndarray   # [N+1] prefix sums of weight * x^2

  @classmethod
  def build(cls, values: np.ndarray, weights: np.ndarray | None = None) -> 'Sorted1D':
    values = np.asarray(values, np.float64).ravel()
    if not np.isfinite(values).all():
      raise ValueError("k-means input holds non-finite values")
    if weights is None:
      x = np.sort(values)
      om = np.ones_like(x)
    else:
      weights = np.asarray(weights, np.float64).ravel()
      if weights.shape != values.shape or not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("k-means weights must be finite, >= 0 and one per value")
      order = np.argsort(values, kind='stable')
      x, om = values[order], weights[order]
    s0 = np.concatenate([[0.0], np.cumsum(om)])
    s1 = np.concatenate([[0.0], np.cumsum(om * x)])
    s2 = np.concatenate([[0.0], np.cumsum(om * x * x)])
    return cls(x, s0, s1, s2)

  @property
  def n(self) -> int:
    return len(self.x)

  def cells(self, codes: np.ndarray) -> np.ndarray:
    """Sorted codes [K] -> cell bounds [K+1]: cell j holds x[b[j]:b[j+1]] (nearest code j)."""
    mids = 0.5 * (codes[:-1] + codes[1:])
    inner = np.searchsorted(self.x, mids, side='right')
    return np.concatenate([[0], inner, [self.n]])

  def stats(self, codes: np.ndarray):
    """(mass [K], sums [K], sse [K]) of each code's cell (weighted), sse measured to the code itself."""
    b = self.cells(codes)
    cnt = self.s0[b[1:]] - self.s0[b[:-1]]
    s1 = self.s1[b[1:]] - self.s1[b[:-1]]
    s2 = self.s2[b[1:]] - self.s2[b[:-1]]
    sse = np.maximum(s2 - 2.0 * codes * s1 + cnt * codes * codes, 0.0)
    return cnt, s1, sse

  def sse(self, codes: np.ndarray) -> float:
    return float(self.stats(np.sort(codes))[2].sum())


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, fixed: np.ndarray) -> np.ndarray:
  """k-means++ seeding on a sample, starting from the pinned codes (if any)."""
  chosen = list(fixed)
  if not chosen:
    chosen.append(x[rng.integers(len(x))])
  d2 = np.min((x[:, None] - np.asarray(chosen)[None, :]) ** 2, axis=1)
  while len(chosen) < k:
    total = d2.sum()
    if total <= 0:  # fewer distinct values than codes: the rest become duplicates (dead codes)
      chosen.extend([chosen[-1]] * (k - len(chosen)))
      break
    c = x[rng.choice(len(x), p=d2 / total)]
    chosen.append(c)
    d2 = np.minimum(d2, (x - c) ** 2)
  return np.sort(np.asarray(chosen, np.float64))


def lloyd(data: Sorted1D, codes: np.ndarray, iters: int, pinned_mask: np.ndarray | None = None,
          dead_threshold: float = 1.0, tol: float = 0.0) -> tuple[np.ndarray, int, int]:
  """Lloyd iterations from `codes`; returns (sorted codes, iterations run, dead codes revived)."""
  codes = np.asarray(codes, np.float64).copy()
  order = np.argsort(codes, kind='stable')
  codes = codes[order]
  pinned = np.zeros(len(codes), bool) if pinned_mask is None else np.asarray(pinned_mask, bool)[order]
  revived = 0
  it = 0
  for it in range(1, iters + 1):
    cnt, s1, sse = data.stats(codes)
    new = np.where(cnt > 0, s1 / np.maximum(cnt, 1.0), codes)
    new = np.where(pinned, codes, new)
    dead = np.nonzero((cnt < dead_threshold) & ~pinned)[0]
    if len(dead):
      # Move each dead code next to the mean of the cell with the largest distortion: splitting the
      # worst cell is the move that lowers the total error most.
      sse = sse.copy()
      for d in dead:
        j = int(np.argmax(sse))
        if sse[j] <= 0:
          break
        std = np.sqrt(sse[j] / max(cnt[j], 1.0))
        new[d] = new[j] + (0.5 * std if not pinned[j] else std)
        sse[j] = 0.0
        revived += 1
    order = np.argsort(new, kind='stable')
    new, pinned = new[order], pinned[order]
    shift = np.max(np.abs(new - codes)) if len(dead) == 0 else np.inf
    codes = new
    if shift <= tol:
      break
  return codes, it, revived


@dataclasses.dataclass
class KMeansResult:
  codes: np.ndarray          # [K] sorted
  sse: float
  restarts_sse: list[float]
  iterations: int
  revived: int


def kmeans(values: np.ndarray | Sorted1D, k: int, restarts: int = 10, iters: int = 100, seed: int = 0,
           pinned: tuple[float, ...] = (), dead_threshold: float = 1.0, sample: int = 20000) -> KMeansResult:
  """Best of `restarts` k-means++-seeded Lloyd runs (lowest sum of squared errors)."""
  data = values if isinstance(values, Sorted1D) else Sorted1D.build(values)
  if data.n == 0:
    raise ValueError("k-means needs at least one value")
  pinned_arr = np.asarray(sorted(set(float(p) for p in pinned)), np.float64)[:k]
  rng = np.random.default_rng(seed)
  best = None
  all_sse = []
  for _ in range(max(1, restarts)):
    sub = data.x if data.n <= sample else data.x[np.sort(rng.choice(data.n, sample, replace=False))]
    init = _plus_plus(sub, k, rng, pinned_arr)
    mask = np.isin(init, pinned_arr) if len(pinned_arr) else None
    if mask is not None:  # exactly one mask entry per pinned value
      mask = np.zeros(k, bool)
      for p in pinned_arr:
        mask[np.nonzero(init == p)[0][0]] = True
    codes, n_it, revived = lloyd(data, init, iters, mask, dead_threshold)
    sse = data.sse(codes)
    all_sse.append(sse)
    if best is None or sse < best.sse:
      best = KMeansResult(codes, sse, [], n_it, revived)
  best.restarts_sse = all_sse
  return best


def uniform_codes(values: np.ndarray, k: int) -> np.ndarray:
  """K bin centres of K equal-width bins over [min, max] (the naive baseline)."""
  lo, hi = float(np.min(values)), float(np.max(values))
  if hi <= lo:
    return np.full(k, lo)
  width = (hi - lo) / k
  return lo + width * (np.arange(k) + 0.5)


def quantile_codes(values: np.ndarray | Sorted1D, k: int) -> np.ndarray:
  """K equal-mass bins; each code is the mean of its bin (so each code is used about N/K times)."""
  data = values if isinstance(values, Sorted1D) else Sorted1D.build(values)
  b = np.round(np.linspace(0, data.n, k + 1)).astype(np.int64)
  cnt = np.diff(b)
  sums = data.s1[b[1:]] - data.s1[b[:-1]]
  # Empty bins (k > n) repeat the neighbouring value.
  edge = data.x[np.minimum(b[:-1], data.n - 1)]
  return np.where(cnt > 0, sums / np.maximum(cnt, 1), edge)


def atoms(values: np.ndarray, min_fraction: float, limit: int, assume_sorted: bool = False) -> tuple[float, ...]:
  """Values that alone make up at least `min_fraction` of the data (point masses), most frequent first."""
  x = np.asarray(values).ravel()
  if min_fraction <= 0 or limit <= 0 or len(x) == 0:
    return ()
  if not assume_sorted:
    x = np.sort(x)
  starts = np.concatenate([[0], np.nonzero(x[1:] != x[:-1])[0] + 1])
  counts = np.diff(np.concatenate([starts, [len(x)]]))
  keep = np.nonzero(counts >= min_fraction * len(x))[0]
  keep = keep[np.argsort(-counts[keep], kind='stable')][:limit]
  return tuple(float(x[starts[i]]) for i in keep)
