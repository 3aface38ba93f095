"""The stacked fit: a whole chunk of fields as one computation, laid out for big matrix products.

`fitting.fit_one` fits one field and `jax.vmap` turns it into a fitter for a stack: every layer of
every field is then its own tiny matrix product ([784 pixels x 16] @ [16 x 16] for the MNIST
field), which no CPU or GPU runs near its peak. This module computes the same fit for the whole
stack at once, arranged so that the work lands in few, large products:

* features-major activations: a layer's activations are [F, width, points] (points on the minor
  axis), so each field's product is [out x in] @ [in x points], a long, well-shaped GEMM, and the
  elementwise work between layers streams contiguous memory;
* when every field shares its inputs (images: the pixel grid), the first layer of all F fields is
  one GEMM, [F*out x in] @ [in x points], and so is its weight gradient, [F*out x points] @
  [points x in];
* the backward pass is written out (matrix products by hand, each activation's and the loss's
  derivative by `jax.vjp` of the same functions the reference uses), so nothing is stored or
  transposed that the products do not need; GELU's value and derivative come from one exp
  (`gelu_and_derivative`, within 4.5e-7 of the exact GELU), where the reference's erfc and its
  derivative cost as much as the NeF-GPT field's products on a CPU.

Point fields (shapes) draw their own points every step, so nothing is shared between fields and
a stack of them buys little; `fit_point_field` fits one such field on its own in the same
features-major layout (a stack of one): its weight gradients take the activations as they are
([out x n] @ [in x n]^T, no [n x width] transposes as in the reference's points-major layout), the
narrow layers of the shapes presets put the points on the long side of every product, the biases of
wide layers (fan-in >= `FOLD_BIAS_MIN_FAN_IN`) are folded into their products ([W | b] @ [h; 1], so the
bias gradient is the weight gradient's last column), every point is encoded once rather than each
step's draw, and the loss value is computed at the last step only: what the 'blocked' formulation runs
for each field of a block.

The loss, the per-step input subsets (`fold_in(key, step)` per field, as `fitting._fit_loop`
draws them), the l2 and anchor penalties and Adam are those of the reference path, so the results agree with
it within float rounding, a few float32 ulps for GELU fields (tests/test_fit_stacked.py);
`fit.formulation='vmap'` keeps the reference, and 'auto' (the default) picks per kind of field what
measured faster (`resolve`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from nfjax.errors import ConfigError
from nfjax.fields import fitting, mlp


def resolve(formulation: str, points: bool, backend: str | None = None) -> str:
  """`fit.formulation` -> the one used. 'auto' is what measured faster (benchmarks/RESULTS.md):
  'stacked' where every field shares its inputs (a grid: images); for point fields (each field its
  own random points per step), where the stacked layout did not pay, cache-sized blocks of fields
  fitted by `fit_point_field` ('blocked') on a CPU and the reference on the whole stack at once ('vmap') on
  an accelerator (`backend`: default jax.default_backend())."""
  if formulation not in fitting.FORMULATIONS:
    choices = ', '.join(map(repr, fitting.FORMULATIONS))
    raise ConfigError(f"config key fit.formulation={formulation!r} is not one of {choices}")
  if formulation == 'auto':
    if not points:
      return 'stacked'
    return 'blocked' if (backend or jax.default_backend()) == 'cpu' else 'vmap'
  return formulation


def _layer(weight, bias, h, shared: bool):
  """weight [F, o, i], bias [F, o] or None, h [i, n] (shared) or [F, i, n] -> [F, o, n]."""
  if shared:
    f, o, i = weight.shape
    z = (weight.reshape(f * o, i) @ h).reshape(f, o, -1)
  else:
    z = jnp.einsum('foi,fin->fon', weight, h)
  return z if bias is None else z + bias[..., None]


# A layer's bias is folded into its matrix product ([W | b] @ [h; 1]: the bias gradient is then the
# product's last column, no separate sum over the points) in `field_value_and_grad` where the layer's
# fan-in is at least this: on a CPU that made HyperDiffusion's 128-wide field's fit 1.05x faster and a
# 64-wide one 1.06x, while at 32 and 24 wide the extra row costs more than the sum it saves (0.99x,
# 0.93x; benchmarks/RESULTS.md, issue 19).
FOLD_BIAS_MIN_FAN_IN = 64


def forward(spec: mlp.FieldSpec, params, feats, fold_bias: bool = False):
  """Stacked params ([F, ...] leaves) on features-major inputs: `feats` [E, n] shared by every
  field or [F, E, n] per field. Returns (pre-activations, layer inputs, what `_activation_vjp` needs of
  each hidden layer): the raw output is the last pre-activation, [F, out, n]. With `fold_bias`, the
  layers `_folds` picks take their input with a row of ones below it ([F, in + 1, n]) and add their
  bias inside the product."""
  zs, hs, ds = [], [], []
  h, last = feats, len(params) - 1
  for i, layer in enumerate(params):
    weight, bias = layer['weight'], layer.get('bias')
    if fold_bias and _folds(layer):
      h = jnp.concatenate([h, jnp.ones(h.shape[:-2] + (1, h.shape[-1]), h.dtype)], axis=-2)
      weight, bias = jnp.concatenate([weight, bias[..., None]], axis=-1), None
    hs.append(h)
    z = _layer(weight, bias, h, shared=(i == 0 and feats.ndim == 2))
    zs.append(z)
    if i < last:
      h, d = _activate(spec, z, first=(i == 0))
      ds.append(d)
  return zs, hs, ds


def _folds(layer) -> bool:
  """Whether `forward(fold_bias=True)` folds this layer's bias into its product."""
  return 'bias' in layer and layer['weight'].shape[-1] >= FOLD_BIAS_MIN_FAN_IN


# Abramowitz & Stegun 7.1.26: erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-a^2), t = 1 / (1 + p a), for
# a >= 0, with |error| <= 1.5e-7.
_ERFC_P = 0.3275911
_ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_and_derivative(z):
  """The exact (erf) GELU, z Phi(z), and its derivative Phi(z) + z phi(z), from one exp: Phi by
  Abramowitz & Stegun's erfc, which is exp(-z^2/2) times a polynomial, and phi(z) is that same exp
  over sqrt(2 pi). jax.nn.gelu(approximate=False) computes XLA's erfc (two rational branches, its own
  exp) and its derivative another exp: on a CPU the activation then costs as much as the NeF-GPT
  field's matrix products. Both values are within 4.5e-7 of the float64 truth (XLA's: 3.8e-7 and
  1.4e-7; tests/test_fit_stacked.py), i.e. within 4 float32 ulps of 1."""
  a = jnp.abs(z) * (1 / math.sqrt(2))
  e = jnp.exp(-a * a)
  t = 1.0 / (1.0 + _ERFC_P * a)
  p1, p2, p3, p4, p5 = _ERFC_A
  tail = 0.5 * e * (t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5)))))  # Phi(-|z|)
  cdf = jnp.where(z >= 0, 1.0 - tail, tail)
  return z * cdf, cdf + z * e * (1 / math.sqrt(2 * math.pi))


def _activate(spec: mlp.FieldSpec, z, first: bool):
  """(mlp._act(z), what `_activation_vjp` needs of the forward pass): GELU's derivative, computed
  with its value (`gelu_and_derivative`); None for the others, whose derivatives `jax.vjp` of
  mlp._act gives in the backward pass."""
  if spec.activation == 'gelu':
    return gelu_and_derivative(z)
  return mlp._act(spec, z, first=first), None


def _activation_vjp(spec: mlp.FieldSpec, z, derivative, dh, first: bool):
  """The gradient at the pre-activation z from the gradient dh at the activation."""
  if derivative is not None:
    return dh * derivative
  _, act_vjp = jax.vjp(functools.partial(mlp._act, spec, first=first), z)
  return act_vjp(dh)[0]


def value_and_grad(spec: mlp.FieldSpec, loss: str, l2: float, clamp: float, params, feats, target,
                   anchor: float = 0.0, start=None, fold_bias: bool = False):
  """Per-field losses [F] and their gradients (stacked like params) of `fitting.field_loss` for
  every field at once, plus `fitting.anchor_penalty` toward `start` (stacked like params) when
  anchor > 0. feats and fold_bias as in `forward`; target [F, out, n]."""
  zs, hs, ds = forward(spec, params, feats, fold_bias)
  raw = zs[-1]
  per_field = lambda r: jax.vmap(lambda rr, tt: fitting.output_loss(spec, loss, rr.T, tt.T, clamp))(r, target)
  values, loss_vjp = jax.vjp(per_field, raw)
  (g,) = loss_vjp(jnp.ones_like(values))
  grads = [None] * len(params)
  for i in reversed(range(len(params))):
    h = hs[i]
    if i == 0 and h.ndim == 2:  # shared inputs: one GEMM for every field's weight gradient
      f, o, n = g.shape
      dw = (g.reshape(f * o, n) @ h.T).reshape(f, o, -1)
    else:
      dw = jnp.einsum('fon,fin->foi', g, h)
    if fold_bias and _folds(params[i]):   # [dW | db]: the bias's column is the product's last
      grads[i] = {'weight': dw[..., :-1], 'bias': dw[..., -1]}
    else:
      grads[i] = {'weight': dw}
      if 'bias' in params[i]:
        grads[i]['bias'] = g.sum(-1)
    if i > 0:
      dh = jnp.einsum('foi,fon->fin', params[i]['weight'], g)
      g = _activation_vjp(spec, zs[i - 1], ds[i - 1], dh, first=(i - 1 == 0))
  return _penalised(spec, l2, anchor, params, start, values, grads, stacked=True)


def _penalised(spec: mlp.FieldSpec, l2: float, anchor: float, params, start, values, grads, stacked: bool):
  """`values` and `grads` of the data term plus `fitting.l2_penalty` and `fitting.anchor_penalty`
  (toward `start`) where they are on; params stacked ([F, ...] leaves) or one field's."""
  per = (lambda fn: jax.vmap(fn)) if stacked else (lambda fn: fn)
  penalties = []
  if l2:
    penalties.append(lambda p: per(lambda q: fitting.l2_penalty(spec, l2, q))(p))
  if anchor:
    penalties.append(lambda p: per(lambda q, s: fitting.anchor_penalty(spec, anchor, q, s))(p, start))
  for penalty in penalties:
    extra, penalty_vjp = jax.vjp(penalty, params)
    (g_extra,) = penalty_vjp(jnp.ones_like(extra))
    values = values + extra
    grads = jax.tree.map(jnp.add, grads, g_extra)
  return values, grads


def field_value_and_grad(spec: mlp.FieldSpec, loss: str, l2: float, clamp: float, params, feats, target,
                         anchor: float = 0.0, start=None):
  """One field's loss and gradient: `value_and_grad` on a stack of one, the biases of wide layers folded
  into their products (`FOLD_BIAS_MIN_FAN_IN`). feats [E, n] and target [n, out] (one field's step),
  params and start one field's."""
  up = lambda tree: jax.tree.map(lambda a: a[None], tree)   # noqa: E731
  values, grads = value_and_grad(spec, loss, l2, clamp, up(params), feats, target.T[None], anchor,
                                 None if start is None else up(start), fold_bias=True)
  return values[0], jax.tree.map(lambda a: a[0], grads)


def fit_point_field(spec: mlp.FieldSpec, fit_cfg, steps: int, params, coords, values, key, per_step: int = -1):
  """One point field; the same fit as `fitting.fit_points` (its draws from `fold_in(key, step)`, loss,
  penalties and Adam; equal to float rounding) computed with less around the matrix products: the
  backward pass written out features-major (`field_value_and_grad`), every point encoded once instead of
  each step's draw every step, and the loss value at the last step only. What the 'blocked' formulation
  runs for each field (benchmarks/RESULTS.md, issue 19). coords [n, d], values [n] or [n, out].
  Returns (params, final loss)."""
  if values.ndim == 1:
    values = values[:, None]
  target = values.astype(jnp.float32)
  feats_all = mlp.encode(spec, coords.astype(jnp.float32))  # [n, E], once
  n = feats_all.shape[0]
  if not 0 < per_step < n:   # every point every step: transposed once
    every_point = (feats_all.T, target)
    batch = lambda step: every_point   # noqa: E731
  else:
    def batch(step):
      idx = jax.random.randint(jax.random.fold_in(key, step), (per_step,), 0, n)
      return feats_all[idx].T, target[idx]

  return _adam(spec, fit_cfg, steps, params, batch, field_value_and_grad)


def _adam(spec: mlp.FieldSpec, fit_cfg, steps: int, params, batch, value_and_grad_fn):
  """The reference's Adam over `steps` from `params` (fit.* optimiser, loss, l2, sdf_clamp and the
  anchor toward `params`), each step on `batch(step)` -> (inputs, target) with the gradient of
  `value_and_grad_fn` (`value_and_grad` or `field_value_and_grad`). Returns (params, the last step's loss)."""
  opt = fitting.make_optimizer(fit_cfg, steps)
  clamp = float(fit_cfg.get('sdf_clamp', 0.0) or 0.0)
  anchor, start = fitting.anchor_of(fit_cfg), params

  def step(carry, i):
    p, st = carry
    f, t = batch(i)
    values, g = value_and_grad_fn(spec, fit_cfg.loss, float(fit_cfg.l2), clamp, p, f, t, anchor, start)
    updates, st = opt.update(g, st, p)
    return (optax.apply_updates(p, updates), st), values

  # Only the last step's loss is returned, so only the last step computes it: the loss value
  # (logs and exps over every point of every field) would cost as much as a third of each step.
  carry, _ = jax.lax.scan(lambda c, i: (step(c, i)[0], None), (params, opt.init(params)), jnp.arange(steps - 1))
  (params, _), values = step(carry, steps - 1)
  return params, values


def fit_stack(spec: mlp.FieldSpec, fit_cfg, steps: int, params, inputs, target, keys, per_step: int = -1,
              points: bool = False):
  """Fit a stack of fields; the same result as `jax.vmap(fitting.fit_one | fitting.fit_points)`.

  Images (points=False): `inputs` are encoded features [n, E] shared by every field (or [F, n, E],
  one set per field); target [F, n, out]. Points: raw coordinates [F, n, d] per field (encoded per
  drawn batch); target [F, n] or [F, n, out]. keys [F]. Returns (params, final loss [F]).
  """
  if target.ndim == 2:
    target = target[..., None]
  target = jnp.swapaxes(target.astype(jnp.float32), 1, 2)  # [F, out, n]
  n = target.shape[-1]
  subset = 0 < per_step < n
  if points:
    inputs = inputs.astype(jnp.float32)
    feats_all = None if subset else mlp.encode(spec, jnp.swapaxes(inputs, 1, 2), axis=-2)  # encoded once
  else:
    feats_all = inputs.T if inputs.ndim == 2 else jnp.swapaxes(inputs, 1, 2)  # [E, n] or [F, E, n]

  def batch(step):
    if not subset:
      return feats_all, target
    idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, step), (per_step,), 0, n))(keys)  # [F, k]
    t = jnp.take_along_axis(target, idx[:, None, :], axis=2)
    if points:
      x = jnp.take_along_axis(inputs, idx[..., None], axis=1)  # [F, k, d]
      return mlp.encode(spec, jnp.swapaxes(x, 1, 2), axis=-2), t
    if inputs.ndim == 3:
      return jnp.swapaxes(jnp.take_along_axis(inputs, idx[..., None], axis=1), 1, 2), t
    return jnp.swapaxes(inputs[idx], 1, 2), t  # [F, E, k]

  return _adam(spec, fit_cfg, steps, params, batch, value_and_grad)
