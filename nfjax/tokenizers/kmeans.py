"""Vector k-means in JAX (codebooks for chunks of D > 1 weights, and the stages of residual VQ).

Here the distance computations are the work ([M, D] x [K, D] per iteration), so they are jitted:
k-means++ seeding and Lloyd iterations run on a seeded sample of at most `sample` rows, with
several restarts; the best restart (lowest squared error on the sample) is kept. Codes used by
fewer than `dead_threshold` rows (scaled to the sample) are moved onto the rows that are worst
represented. The result initialises the gradient refinement (`nfjax.tokenizers.refine`), which
then sees all rows in minibatches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sq_dist(x: jax.Array, c: jax.Array) -> jax.Array:
  """[M, D], [K, D] -> [M, K] squared distances."""
  return (jnp.sum(x * x, -1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :])


@jax.jit
def _assign(x, c):
  return jnp.argmin(_sq_dist(x, c), axis=-1).astype(jnp.int32)


def assign(x: np.ndarray, codes: np.ndarray, batch: int = 65536) -> np.ndarray:
  """Nearest code id of every row (numpy in, numpy out; jitted batches of fixed size)."""
  x = np.asarray(x, np.float32)
  codes = jnp.asarray(codes, jnp.float32)
  n = len(x)
  if n == 0:
    return np.zeros((0,), np.int32)
  b = min(batch, n)
  out = []
  for s in range(0, n, b):
    xb = x[s:s + b]
    pad = b - len(xb)
    if pad:
      xb = np.concatenate([xb, np.zeros((pad, x.shape[1]), np.float32)])
    out.append(np.asarray(_assign(jnp.asarray(xb), codes))[:b - pad])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(2,))
def _plus_plus(key, x, k):
  """k-means++ seeding: each new code drawn with probability proportional to its squared distance."""
  m = x.shape[0]
  k0, key = jax.random.split(key)
  first = x[jax.random.randint(k0, (), 0, m)]
  codes = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
  d2 = jnp.sum((x - first) ** 2, -1)

  def body(i, carry):
    codes, d2, key = carry
    key, sub = jax.random.split(key)
    total = jnp.sum(d2)
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 1e-30)), jnp.zeros_like(d2))
    j = jax.random.categorical(sub, logits)
    c = x[j]
    return codes.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, -1)), key

  codes, _, _ = jax.lax.fori_loop(1, k, body, (codes, d2, key))
  return codes


@functools.partial(jax.jit, static_argnums=(2,))
def _lloyd(x, codes, iters, dead_threshold):
  k = codes.shape[0]

  def body(_, carry):
    codes, revived = carry
    d = _sq_dist(x, codes)
    idx = jnp.argmin(d, -1)
    best = jnp.min(d, -1)
    cnt = jax.ops.segment_sum(jnp.ones_like(best), idx, k)
    sums = jax.ops.segment_sum(x, idx, k)
    new = jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], codes)
    # Dead codes -> the rows with the largest error (the i-th dead code takes the i-th worst row).
    dead = cnt < dead_threshold
    rank = jnp.cumsum(dead) - 1
    worst = jnp.argsort(-best)[:k]
    new = jnp.where(dead[:, None], x[worst[jnp.clip(rank, 0, k - 1)]], new)
    return new, revived + jnp.sum(dead)

  codes, revived = jax.lax.fori_loop(0, iters, body, (codes, jnp.zeros((), jnp.int32)))
  # A final assignment step so that the codes are centroids of their cells.
  d = _sq_dist(x, codes)
  idx = jnp.argmin(d, -1)
  cnt = jax.ops.segment_sum(jnp.ones(x.shape[0]), idx, k)
  sums = jax.ops.segment_sum(x, idx, k)
  codes = jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], codes)
  sse = jnp.sum(jnp.min(_sq_dist(x, codes), -1))
  return codes, sse, revived


def kmeans(x: np.ndarray, k: int, restarts: int, iters: int, seed: int, sample: int = 65536,
           dead_threshold: float = 1.0) -> tuple[np.ndarray, dict]:
  """Best-of-`restarts` k-means of rows x [M, D] -> (codes [k, D] float32, info)."""
  x = np.asarray(x, np.float32)
  rng = np.random.default_rng(seed)
  if len(x) > sample:
    xs = x[np.sort(rng.choice(len(x), sample, replace=False))]
  else:
    xs = x
  thr = float(dead_threshold) * len(xs) / max(len(x), 1)
  xj = jnp.asarray(xs)
  best, best_sse, all_sse, revived = None, np.inf, [], 0
  for r in range(max(1, restarts)):
    key = jax.random.PRNGKey(int(rng.integers(2 ** 31)))
    init = _plus_plus(key, xj, int(k))
    codes, sse, rev = _lloyd(xj, init, int(iters), thr)
    sse = float(sse)
    all_sse.append(sse / len(xs))
    if sse < best_sse:
      best, best_sse, revived = np.asarray(codes), sse, int(rev)
  return best.astype(np.float32), {'restart_mse': all_sse, 'mse': best_sse / len(xs), 'sample_rows': len(xs),
                                   'revived': revived}
