"""Machine figures the benchmarks report beside their own: the measured dense matmul peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` on the default device (best of 3 rounds of `reps`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      r = f(a)
    r.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best
