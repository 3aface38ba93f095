"""Gradient refinement of codebooks: a Flax NNX module trained with optax on minibatches.

This is NeF-GPT's "learnable codebook" (vector-quantize-pytorch with an in-place Adam on the
codebook), done as a proper training loop: each step draws `batch` rows of the fitting data,
assigns them to their nearest codes (greedy over the Q residual stages; assignments carry no
gradient), and takes an Adam step on the squared reconstruction error, which moves every used code
towards the rows it represents (minibatch k-means by gradient) and trains all residual stages
jointly. The learning rate is relative to the typical distance between neighbouring codes
(RMS norm of the rows / K^(1/D)), so one setting works for any coding space, K and D.

Dead codes: the usage of every code is tracked as an exponential moving average of its per-step
count; every `check_every` steps codes whose usage, scaled to the whole data set, is below
`dead_threshold` are moved onto random rows of a fresh batch (their stage's residual) and
counted in `revived`.

Why it exists next to k-means: exact Lloyd iterations (`kmeans1d`, `kmeans`) need a pass over
all rows per iteration; the refinement is the part that scales to data sets that do not fit a
full pass (60k fields x 36k weights), and it refines all residual stages together where k-means
fits them one after another.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Codebooks(nnx.Module):
  """codes [G, Q, K, D]: group g, residual stage q, code k."""

  def __init__(self, codes):
    self.codes = nnx.Param(jnp.asarray(codes, jnp.float32))

  def assign(self, x: jax.Array, group: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows x [B, D] of groups [B] -> (ids [B, Q], reconstruction [B, D]); ids are greedy per stage."""
    cb = self.codes[...]
    num_groups, num_q = cb.shape[0], cb.shape[1]
    r = x
    recon = jnp.zeros_like(x)
    ids = []
    for q in range(num_q):
      c = cb[:, q]                                                        # [G, K, D]
      d = (jnp.sum(r * r, -1)[None, :, None] - 2.0 * jnp.einsum('bd,gkd->gbk', r, c)
           + jnp.sum(c * c, -1)[:, None, :])                              # [G, B, K]
      d = jnp.take_along_axis(d, group[None, :, None], 0)[0] if num_groups > 1 else d[0]
      idx = jnp.argmin(jax.lax.stop_gradient(d), -1)
      vec = c[group, idx]                                                 # [B, D]
      ids.append(idx)
      recon = recon + vec
      r = r - jax.lax.stop_gradient(vec)
    return jnp.stack(ids, -1).astype(jnp.int32), recon

  def __call__(self, x, group):
    return self.assign(x, group)[1]


def refine(codebooks: np.ndarray, rows: np.ndarray, groups: np.ndarray, steps: int, lr: float, batch: int,
           seed: int, dead_threshold: float = 1.0, check_every: int = 50, ema: float = 0.9,
           frozen: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """Refine codebooks [G, Q, K, D] on rows [M, D] with their groups [M]; returns (codebooks, info).

  `frozen` [G, Q, K] marks codes that must not move (pinned exact values)."""
  codebooks = np.asarray(codebooks, np.float32)
  if steps <= 0 or len(rows) == 0:
    return codebooks, {'steps': 0}
  rows_j = jnp.asarray(rows, jnp.float32)
  groups_j = jnp.asarray(groups, jnp.int32)
  m = rows_j.shape[0]
  b = int(min(batch, m))
  num_g, num_q, num_k, dim = codebooks.shape
  # Step size relative to the typical distance between neighbouring codes: rms / K^(1/D).
  spacing = (float(np.sqrt(np.mean(np.square(rows)) * dim)) or 1.0) / num_k ** (1.0 / dim)
  keep = jnp.asarray(1.0 - (np.zeros(codebooks.shape[:3]) if frozen is None else np.asarray(frozen, np.float32)))
  frozen_np = np.zeros(codebooks.shape[:3], bool) if frozen is None else np.asarray(frozen, bool)
  model = Codebooks(codebooks)
  optimizer = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(lr * spacing, steps)), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, static_argnums=(3,))
  def train_steps(state, key, usage, n):
    def one(carry, k):
      state, usage = carry
      model, optimizer = nnx.merge(graphdef, state)
      idx = jax.random.randint(k, (b,), 0, m)
      x, g = rows_j[idx], groups_j[idx]

      def loss_fn(mdl):
        ids, recon = mdl.assign(x, g)
        return jnp.mean(jnp.sum((x - recon) ** 2, -1)), ids

      (loss, ids), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      grads.codes[...] = grads.codes[...] * keep[..., None]
      optimizer.update(model, grads)
      counts = jnp.zeros((num_g, num_q, num_k)).at[g[:, None], jnp.arange(num_q)[None, :], ids].add(1.0)
      return (nnx.state((model, optimizer)), ema * usage + (1 - ema) * counts), loss

    (state, usage), losses = jax.lax.scan(one, (state, usage), jax.random.split(key, n))
    return state, usage, losses

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  # Expected per-step count of a code used by `dead_threshold` rows of the whole data.
  thr = float(dead_threshold) * b / m
  usage = jnp.full((num_g, num_q, num_k), thr + 1.0)
  done, revived, losses = 0, 0, []
  while done < steps:
    n = min(check_every, steps - done)
    key, sub = jax.random.split(key)
    state, usage, loss = train_steps(state, sub, usage, n)
    losses.append(np.asarray(loss))
    done += n
    if done < steps and dead_threshold > 0:
      dead = np.argwhere((np.asarray(usage) < thr) & ~frozen_np)
      if len(dead):
        model, optimizer = nnx.merge(graphdef, state)
        codes = np.array(model.codes[...])
        sample = rng.choice(m, min(m, 4 * b), replace=False)
        xs, gs = np.asarray(rows_j[sample]), np.asarray(groups_j[sample])
        ids, _ = model.assign(jnp.asarray(xs), jnp.asarray(gs))
        ids = np.asarray(ids)
        for g, q, k in dead:
          cand = np.nonzero(gs == g)[0]
          if not len(cand):
            continue
          j = cand[rng.integers(len(cand))]
          resid = xs[j] - sum(codes[g, p, ids[j, p]] for p in range(q))  # stage q's input for that row
          codes[g, q, k] = resid
          revived += 1
        model.codes[...] = jnp.asarray(codes)
        state = nnx.state((model, optimizer))
        usage = jnp.where(jnp.asarray(usage) < thr, thr + 1.0, usage)
  model, _ = nnx.merge(graphdef, state)
  losses = np.concatenate(losses)
  return np.asarray(model.codes[...], np.float32), {
      'steps': int(steps), 'revived': int(revived), 'loss_first': float(losses[0]),
      'loss_last': float(np.mean(losses[-min(len(losses), 20):])), 'lr': float(lr * spacing), 'batch': b}
