"""Batched fitting of many neural fields at once.

One field is fitted by a plain function (`fit_one`: Adam over `steps` with `lax.scan`); `jax.vmap`
turns it into a fitter for a stack of fields with per-field parameters and Adam state on the
leading axis, and `make_stack_fitter` compiles that with the field axis sharded over the mesh.
Every field's randomness comes from `fold_in(key, field_id)`, so a field's result does not
depend on which chunk, batch or device it was fitted in.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from nfjax import sharding
from nfjax.errors import ConfigError
from nfjax.fields import mlp
from nfjax.utils import config as cfg_utils

LOSSES = ('bce', 'mse')
SCHEDULES = ('cosine', 'constant')


def validate(config) -> None:
  cfg_utils.check_positive(config, 'fit.steps')
  cfg_utils.check_positive(config, 'fit.lr')
  cfg_utils.check_positive(config, 'fit.chunk_size')
  cfg_utils.check_positive(config, 'fit.warmup_steps', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.l2', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.pixels_per_step', allow_minus_one=True)
  cfg_utils.check_choice(config, 'fit.loss', LOSSES)
  cfg_utils.check_choice(config, 'fit.schedule', SCHEDULES)
  cfg_utils.check_choice(config, 'fit.init', ('shared', 'random'))
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


def field_loss(spec: mlp.FieldSpec, loss: str, l2: float, params, feats, target) -> jax.Array:
  """Loss of one field on encoded inputs [n, E] against targets [n, out]."""
  raw = mlp.apply_encoded(spec, params, feats)
  if loss == 'bce':
    value = optax.sigmoid_binary_cross_entropy(raw, target).mean()
  else:
    value = jnp.mean((mlp.output(spec, raw) - target) ** 2)
  if l2:
    flat = mlp.flatten(spec, params)
    value = value + l2 * jnp.sqrt(jnp.sum(flat ** 2)) / flat.shape[-1]
  return value


def fit_one(spec: mlp.FieldSpec, fit_cfg, steps: int, params, feats, target, key):
  """Fit one field. feats [n, E] encoded inputs, target [n, out]. Returns (params, final loss).

  With fit.pixels_per_step > 0, each step uses a random subset of the n inputs drawn from
  `fold_in(key, step)`; otherwise every step is full-batch (deterministic, and best for images).
  """
  opt = make_optimizer(fit_cfg, steps)
  loss_fn = lambda p, f, t: field_loss(spec, fit_cfg.loss, float(fit_cfg.l2), p, f, t)
  grad_fn = jax.value_and_grad(loss_fn)
  per_step = int(fit_cfg.pixels_per_step)
  n = feats.shape[0]

  def body(carry, step):
    p, st = carry
    if 0 < per_step < n:
      idx = jax.random.randint(jax.random.fold_in(key, step), (per_step,), 0, n)
      f, t = feats[idx], target[idx]
    else:
      f, t = feats, target
    value, g = grad_fn(p, f, t)
    updates, st = opt.update(g, st, p)
    return (optax.apply_updates(p, updates), st), value

  (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(steps))
  return params, losses[-1]


def make_stack_fitter(spec: mlp.FieldSpec, fit_cfg, steps: int, mesh: Mesh,
                      score: Callable | None = None):
  """jit(vmap(fit_one)) with the field axis sharded over `mesh`.

  Returns fn(params_stack, feats, targets [F, n, out], keys [F]) -> (params_stack, loss [F], score [F]).
  `feats` is either shared [n, E] (replicated) or per field [F, n, E]. `score(params, feats, target)`
  is a per-field quality number computed after fitting (e.g. PSNR); loss is returned if None.
  The number of fields F must be a multiple of the mesh's field-axis size.
  """
  def one(p, f, t, k):
    p, loss = fit_one(spec, fit_cfg, steps, p, f, t, k)
    s = score(p, f, t) if score is not None else loss
    return p, loss, s

  def fit_stack(params, feats, targets, keys):
    feats_axis = 0 if feats.ndim == 3 else None
    return jax.vmap(one, in_axes=(0, feats_axis, 0, 0))(params, feats, targets, keys)

  fields = sharding.named(mesh, 'fields')
  rep = sharding.replicated(mesh)

  def shardings_for(params, feats):
    p_sh = sharding.leading_axis_sharding(mesh, params)
    f_sh = sharding.named(mesh, 'fields', None, None) if feats.ndim == 3 else rep
    return p_sh, f_sh

  def compile_for(params, feats, targets, keys):
    p_sh, f_sh = shardings_for(params, feats)
    t_sh = sharding.named(mesh, 'fields', None, None)
    jitted = jax.jit(fit_stack, in_shardings=(p_sh, f_sh, t_sh, fields),
                     out_shardings=(p_sh, fields, fields), donate_argnums=(0,))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, feats, targets, keys))
    return jitted.lower(*abstract).compile()

  return compile_for
