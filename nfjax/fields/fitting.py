"""Batched fitting of many neural fields at once.

One field is fitted by a plain function (`fit_one`: Adam over `steps` with `lax.scan`); `jax.vmap`
of it is the reference fitter for a stack of fields (`fit.formulation='vmap'`), and
nfjax/fields/stacked.py computes the same fit for a whole stack in big matrix products (the
default). nfjax/fields/stack.py compiles either with the field axis sharded over the mesh.
Every field's randomness comes from `fold_in(key, field_id)`, so a field's result does not
depend on which chunk, batch or device it was fitted in.

Two kinds of input:
* image fields (`fit_one`): encoded features [n, E] shared by every field (the pixel grid), targets
  per field; optionally a random subset of `fit.pixels_per_step` pixels per step.
* point fields (`fit_points`, 3D shapes): raw coordinates [n, d] and values [n] per field; every
  step draws `fit.points_per_step` of them (with replacement, as NeF-GPT and HyperDiffusion do) and
  encodes only that batch, so an [F, n, E] feature tensor never exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nfjax.errors import ConfigError
from nfjax.fields import mlp
from nfjax import config as cfg_utils

LOSSES = ('bce', 'mse', 'l1')
SCHEDULES = ('cosine', 'constant')
MATMUL_PRECISIONS = ('highest', 'high', 'default')  # fit.matmul_precision: jax.default_matmul_precision's names
FORMULATIONS = ('auto', 'stacked', 'blocked', 'vmap')  # of a stack's fit: nfjax/fields/stacked.py, stack.py
PROTOTYPE_TARGETS = ('auto', 'mean', 'medoid')  # fit.prototype_target: nfjax/fields/stack.py prototypes


def validate(config) -> None:
  """Checks of the fit.* keys every modality reads (its own, e.g. how many pixels or points a step
  draws, it checks itself)."""
  cfg_utils.check_positive(config, 'fit.steps')
  cfg_utils.check_positive(config, 'fit.lr')
  cfg_utils.check_positive(config, 'fit.chunk_size')
  cfg_utils.check_positive(config, 'fit.warmup_steps', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.l2', allow_zero=True)
  if 'anchor' in config.fit:   # a config written without the key has no pull (anchor_of)
    cfg_utils.check_positive(config, 'fit.anchor', allow_zero=True)
  cfg_utils.check_choice(config, 'fit.loss', LOSSES)
  cfg_utils.check_choice(config, 'fit.schedule', SCHEDULES)
  cfg_utils.check_choice(config, 'fit.init', ('shared', 'random'))
  if config.fit.init == 'shared':
    cfg_utils.check_positive(config, 'fit.shared_init_steps')
    cfg_utils.check_positive(config, 'fit.shared_init_candidates')
  if 'prototypes' in config.fit:   # a config written without the key has none
    cfg_utils.check_positive(config, 'fit.prototypes', allow_zero=True)
    if prototypes_of(config.fit) > 0 and config.fit.init != 'shared':
      raise ConfigError(f"config key fit.prototypes={config.fit.prototypes} fits its prototypes from the shared "
                        f"init and needs fit.init='shared' (not {config.fit.init!r}); or set fit.prototypes=0")
  if 'prototype_target' in config.fit:
    cfg_utils.check_choice(config, 'fit.prototype_target', PROTOTYPE_TARGETS)
  cfg_utils.check_choice(config, 'fit.formulation', FORMULATIONS)
  cfg_utils.check_choice(config, 'fit.matmul_precision', MATMUL_PRECISIONS)
  cfg_utils.check_positive(config, 'fit.block_fields', allow_zero=True)
  if config.fit.warmup_steps >= config.fit.steps:
    raise ConfigError(f"config key fit.warmup_steps={config.fit.warmup_steps} must be < fit.steps={config.fit.steps}")


def make_schedule(fit_cfg, steps: int) -> optax.Schedule:
  lr = float(fit_cfg.lr)
  warmup = int(fit_cfg.warmup_steps)
  if fit_cfg.schedule == 'constant':
    if warmup:
      return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  end = lr * float(fit_cfg.end_lr_factor)
  if not warmup:
    return optax.cosine_decay_schedule(lr, steps, alpha=end / lr)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end)


def make_optimizer(fit_cfg, steps: int) -> optax.GradientTransformation:
  return optax.adam(make_schedule(fit_cfg, steps), b1=float(fit_cfg.b1), b2=float(fit_cfg.b2))


def output_loss(spec: mlp.FieldSpec, loss: str, raw: jax.Array, target: jax.Array, clamp: float = 0.0) -> jax.Array:
  """Loss of one field's raw output [n, out] against targets [n, out] (see `field_loss`)."""
  if loss == 'bce':
    return optax.sigmoid_binary_cross_entropy(raw, target).mean()
  pred = mlp.output(spec, raw)
  if clamp:  # no error where both are beyond the same bound; a prediction beyond the wrong one keeps its gradient
    target = jnp.clip(target, -clamp, clamp)
    err = pred - target
    err = jnp.where(((target >= clamp) & (pred >= clamp)) | ((target <= -clamp) & (pred <= -clamp)), 0.0, err)
  else:
    err = pred - target
  return jnp.mean(jnp.abs(err)) if loss == 'l1' else jnp.mean(err ** 2)


def l2_penalty(spec: mlp.FieldSpec, l2: float, params) -> jax.Array:
  """NeF-GPT's weight penalty of one field: l2 * ||theta||_2 / P."""
  flat = mlp.flatten(spec, params)
  return l2 * jnp.sqrt(jnp.sum(flat ** 2)) / flat.shape[-1]


def prototypes_of(fit_cfg) -> int:
  """fit.prototypes per class (0 = off: every field starts from the shared init; configs from before
  the key have none)."""
  return int(fit_cfg.get('prototypes', 0) or 0)


def anchor_of(fit_cfg) -> float:
  """fit.anchor (0 = off; configs from before the key have none)."""
  return float(fit_cfg.get('anchor', 0.0) or 0.0)


def anchor_penalty(spec: mlp.FieldSpec, anchor: float, params, start) -> jax.Array:
  """A pull back to where the fit started (the shared init): anchor * mean((theta - theta_0)^2).
  Weights the data does not need then stay at the init, where every field's tokens agree."""
  delta = mlp.flatten(spec, params) - mlp.flatten(spec, start)
  return anchor * jnp.mean(delta ** 2, axis=-1)


def field_loss(spec: mlp.FieldSpec, loss: str, l2: float, params, feats, target,
               clamp: float = 0.0) -> jax.Array:
  """Loss of one field on encoded inputs [n, E] against targets [n, out].

  bce: binary cross-entropy of the raw output (logits) against targets in [0, 1]. mse / l1: of the
  output (after output_activation). clamp > 0 truncates signed distances at +-clamp (DeepSDF):
  targets are clipped and a prediction beyond the same bound as its target costs nothing. Unlike
  DeepSDF's clip of both sides, a prediction beyond the *other* bound keeps its gradient (a clipped
  prediction has none, so a field initialised beyond the bound everywhere never moves).
  l2 adds NeF-GPT's penalty l2 * ||theta||_2 / P.
  """
  value = output_loss(spec, loss, mlp.apply_encoded(spec, params, feats), target, clamp)
  if l2:
    value = value + l2_penalty(spec, l2, params)
  return value


def _fit_loop(spec, fit_cfg, steps, params, inputs, target, key, per_step: int, prepare):
  """Adam over `steps`; each step a random batch of `per_step` rows of inputs/target drawn from
  `fold_in(key, step)` (all rows when per_step <= 0 or >= n). `prepare` maps the batch's inputs to
  encoded features."""
  opt = make_optimizer(fit_cfg, steps)
  clamp = float(fit_cfg.get('sdf_clamp', 0.0) or 0.0)
  anchor, start = anchor_of(fit_cfg), params

  def loss_fn(p, f, t):
    value = field_loss(spec, fit_cfg.loss, float(fit_cfg.l2), p, prepare(f), t, clamp)
    return value + anchor_penalty(spec, anchor, p, start) if anchor else value
  grad_fn = jax.value_and_grad(loss_fn)
  n = inputs.shape[0]

  def body(carry, step):
    p, st = carry
    if 0 < per_step < n:
      idx = jax.random.randint(jax.random.fold_in(key, step), (per_step,), 0, n)
      f, t = inputs[idx], target[idx]
    else:
      f, t = inputs, target
    value, g = grad_fn(p, f, t)
    updates, st = opt.update(g, st, p)
    return (optax.apply_updates(p, updates), st), value

  (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(steps))
  return params, losses[-1]


def fit_one(spec: mlp.FieldSpec, fit_cfg, steps: int, params, feats, target, key, per_step: int = -1):
  """Fit one field. feats [n, E] encoded inputs, target [n, out]. Returns (params, final loss).

  With per_step > 0 (images: fit.pixels_per_step), each step uses a random subset of the n inputs
  drawn from `fold_in(key, step)`; otherwise every step is full-batch (deterministic, and best for images).
  """
  return _fit_loop(spec, fit_cfg, steps, params, feats, target, key, int(per_step), lambda f: f)


def fit_points(spec: mlp.FieldSpec, fit_cfg, steps: int, params, coords, values, key, per_step: int = -1):
  """Fit one field to points: coords [n, in_dims] (any float dtype), values [n] or [n, out].

  Each step draws `per_step` points (shapes: fit.points_per_step; with replacement) from
  `fold_in(key, step)` and encodes only those; -1 uses every point every step. Returns (params, loss).
  """
  if values.ndim == 1:
    values = values[:, None]
  prepare = lambda x: mlp.encode(spec, x.astype(jnp.float32))
  return _fit_loop(spec, fit_cfg, steps, params, coords, values.astype(jnp.float32), key, int(per_step), prepare)


def occupancy_iou(spec: mlp.FieldSpec, level: float, inside_above: bool, points, occupancy,
                  params, chunk: int = 4096) -> jax.Array:
  """IoU of one field's occupancy with `occupancy` [m] (0/1) at `points` [m, d].

  A point is inside where the field's output (after output_activation) is above `level`
  (inside_above) or below it. The points are evaluated `chunk` at a time (memory: chunk x width
  per field). Two empty sets have IoU 1.
  """
  m = points.shape[0]
  chunk = min(chunk, m)
  pad = -m % chunk
  pts = jnp.concatenate([points, jnp.zeros((pad,) + points.shape[1:], points.dtype)]) if pad else points
  occ = occupancy > 0.5
  occ = jnp.concatenate([occ, jnp.zeros((pad,), bool)]) if pad else occ
  valid = jnp.arange(m + pad) < m

  def inside(x):
    out = mlp.apply(spec, params, x.astype(jnp.float32))[:, 0]
    return out > level if inside_above else out < level

  pred = jax.lax.map(inside, pts.reshape(-1, chunk, pts.shape[-1])).reshape(-1) & valid
  inter = jnp.sum(pred & occ)
  union = jnp.sum(pred | occ)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
