"""Machine figures the benchmarks report beside their own: the measured dense matmul peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, reps: int = 10, precision: str | None = None) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` on the default device (best of 3 rounds of `reps`), at
  `precision` (jax.default_matmul_precision's names; None = JAX's default: TF32 for float32 on a GPU)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      r = f(a)
    r.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best
