"""The stacked fit (nfjax/fields/stacked.py) against the reference jit(vmap(fit_one)).

The stacked path hand-writes the chain of matrix products of the backward pass, so every field
architecture the config allows is checked against jax.grad of the reference loss, and whole fits
against the reference fitter."""

import json
import math
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import ROOT, load_config

import jax
import jax.numpy as jnp

from nfjax import main, sharding
from nfjax.errors import ConfigError
from nfjax.fields import fitting, mlp, stack, stacked
from nfjax.data import images
from nfjax.modalities.images import PSNR, psnr_score

F, N = 6, 40


def _spec(**kw):
  base = dict(in_dims=2, freqs=(1.0, 2.0), hidden=(8, 8), activation='relu', init='torch_default')
  return mlp.FieldSpec(**{**base, **kw})


def _fit_cfg(**kw):
  return ml_collections.ConfigDict({'steps': 20, 'lr': 1e-2, 'schedule': 'cosine', 'warmup_steps': 0,
                                    'end_lr_factor': 0.1, 'b1': 0.9, 'b2': 0.999, 'loss': 'bce', 'l2': 0.0,
                                    'sdf_clamp': 0.0, **kw})


def _stack_params(spec, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), F)
  return jax.vmap(lambda k: mlp.init(spec, k))(keys)


CASES = [
    ('relu bce', {}, {'loss': 'bce'}),
    ('gelu mse tanh-out 3 layers', {'activation': 'gelu', 'hidden': (8, 8, 8), 'output_activation': 'tanh'},
     {'loss': 'mse'}),
    ('silu l1 sigmoid-out', {'activation': 'silu', 'output_activation': 'sigmoid'}, {'loss': 'l1'}),
    ('tanh no output bias, 2 outputs', {'activation': 'tanh', 'output_bias': False, 'out_dims': 2}, {'loss': 'mse'}),
    ('sine (siren) with raw input', {'activation': 'sine', 'include_input': True, 'init': 'siren', 'siren_w0': 5.0},
     {'loss': 'mse'}),
    ('mse with sdf clamp', {}, {'loss': 'mse', 'sdf_clamp': 0.3}),
    ('bce with l2 penalty', {}, {'loss': 'bce', 'l2': 0.5}),
    # fan-in >= stacked.FOLD_BIAS_MIN_FAN_IN: one point field's biases folded into the products
    ('relu bce 64 wide', {'hidden': (64, 64)}, {'loss': 'bce'}),
    ('gelu 64 wide no output bias', {'activation': 'gelu', 'hidden': (64, 64), 'output_bias': False}, {'loss': 'mse'}),
]


@pytest.mark.parametrize('layout', ['shared', 'per field', 'one field'],
                         ids=['shared inputs', 'inputs per field', 'one point field'])
@pytest.mark.parametrize('name,spec_kw,cfg_kw', CASES, ids=[c[0] for c in CASES])
def test_value_and_grad_equals_autodiff_of_the_reference_loss(name, spec_kw, cfg_kw, layout):
  """stacked.value_and_grad (a stack, features-major) and stacked.field_value_and_grad (one field on
  its own, a stack of one: what the 'blocked' fit runs for a point field) against jax.grad of the
  reference loss."""
  shared = layout == 'shared'
  spec = _spec(**spec_kw)
  cfg = _fit_cfg(**cfg_kw)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (N, spec.in_dims) if shared else (F, N, spec.in_dims)).astype(np.float32)
  feats = mlp.encode(spec, jnp.asarray(x))  # [N, E] or [F, N, E]
  lo = -1.0 if cfg.loss != 'bce' else 0.0
  target = jnp.asarray(rng.uniform(lo, 1.0, (F, N, spec.out_dims)).astype(np.float32))
  params = _stack_params(spec)

  ref_fn = jax.vmap(jax.value_and_grad(
      lambda p, f, t: fitting.field_loss(spec, cfg.loss, cfg.l2, p, f, t, cfg.sdf_clamp)),
      in_axes=(0, None if shared else 0, 0))
  ref_v, ref_g = ref_fn(params, feats, target)
  if layout == 'one field':
    v, g = jax.vmap(lambda p, f, t: stacked.field_value_and_grad(spec, cfg.loss, cfg.l2, cfg.sdf_clamp, p, f.T, t))(
        params, feats, target)
  else:
    feats_minor = feats.T if shared else jnp.swapaxes(feats, 1, 2)
    v, g = stacked.value_and_grad(spec, cfg.loss, cfg.l2, cfg.sdf_clamp, params, feats_minor, jnp.swapaxes(target, 1, 2))
  np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(g) == jax.tree.structure(ref_g)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(jax.tree.leaves(ref_g)[0]).max()) > 1e-4  # the case really has a gradient


def test_gelu_and_its_derivative_from_one_exp_are_the_exact_gelu_to_float32_rounding():
  """stacked.gelu_and_derivative (what the written-out backward passes use for GELU fields) against
  the float64 erf GELU and its derivative, from the far tails to the origin: within 4.5e-7 (under 4
  float32 ulps of 1; jax.nn.gelu's own float32 error is 3.8e-7), exactly z and 1 far right, 0 far left."""
  z = np.concatenate([np.linspace(-12, 12, 480_001), [-1e4, -40.0, -1e-30, 0.0, 1e-30, 40.0, 1e4]]).astype(np.float32)
  h, d = map(np.asarray, jax.jit(stacked.gelu_and_derivative)(jnp.asarray(z)))
  x = z.astype(np.float64)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))
  pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
  assert np.abs(h - x * cdf).max() < 4.5e-7
  assert np.abs(d - (cdf + x * pdf)).max() < 4.5e-7
  far = np.abs(z) > 20
  assert np.array_equal(h[far], np.where(z[far] > 0, z[far], 0.0)) and np.array_equal(d[far], (z[far] > 0) * 1.0)


def test_features_major_encoding_is_encode_transposed():
  spec = _spec(include_input=True, freqs=(1.0, 3.0), use_pi=True, in_dims=3)
  x = np.random.default_rng(1).uniform(-1, 1, (F, N, 3)).astype(np.float32)
  np.testing.assert_allclose(mlp.encode(spec, jnp.swapaxes(x, 1, 2), axis=-2),
                             jnp.swapaxes(mlp.encode(spec, jnp.asarray(x)), 1, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('points,per_step,anchor,width', [
    (False, -1, 0.0, 8), (False, 16, 0.0, 8), (True, 16, 0.0, 8), (True, -1, 0.0, 8), (False, -1, 50.0, 8),
    (True, 16, 50.0, 8), (True, 16, 50.0, 64)],
    ids=['grid full batch', 'grid pixel subsets', 'points subsets', 'points all', 'grid anchored', 'points anchored',
         'points anchored, biases folded'])
def test_a_short_fit_matches_the_vmap_reference(points, per_step, anchor, width):
  spec = _spec(in_dims=3 if points else 2, activation='gelu' if points else 'relu', hidden=(width, width))
  cfg = _fit_cfg(loss='mse' if points else 'bce', anchor=anchor)
  rng = np.random.default_rng(2)
  keys = stack.field_keys(0, np.arange(F))
  params = _stack_params(spec, seed=3)
  if points:
    inputs = jnp.asarray(rng.uniform(-1, 1, (F, N, 3)).astype(np.float32))
    target = jnp.asarray(rng.uniform(-1, 1, (F, N)).astype(np.float32))
    ref_one = lambda p, x, t, k: fitting.fit_points(spec, cfg, 20, p, x, t, k, per_step)
    axes = (0, 0, 0, 0)
  else:
    inputs = mlp.encode(spec, jnp.asarray(rng.uniform(0, 1, (N, 2)).astype(np.float32)))
    target = jnp.asarray(rng.uniform(0, 1, (F, N, 1)).astype(np.float32))
    ref_one = lambda p, f, t, k: fitting.fit_one(spec, cfg, 20, p, f, t, k, per_step)
    axes = (0, None, 0, 0)
  ref_p, ref_loss = jax.jit(jax.vmap(ref_one, in_axes=axes))(params, inputs, target, keys)
  new_p, new_loss = jax.jit(lambda *a: stacked.fit_stack(spec, cfg, 20, *a, per_step=per_step, points=points))(
      params, inputs, target, keys)
  found = [(new_p, new_loss)]
  if points:  # one field at a time: what the 'blocked' formulation fits a point field with
    one = lambda p, x, t, k: stacked.fit_point_field(spec, cfg, 20, p, x, t, k, per_step)
    found.append(jax.jit(jax.vmap(one))(params, inputs, target, keys))
  for got_p, got_loss in found:
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(params)))
  assert moved > 1e-2  # the fit did something
  if anchor:  # fit.anchor pulls every field back toward where it started: the plain fit moves further
    plain = dict(cfg, anchor=0.0)
    plain_p, _ = jax.jit(lambda *a: stacked.fit_stack(spec, ml_collections.ConfigDict(plain), 20, *a, per_step=per_step,
                                                      points=points))(params, inputs, target, keys)
    rms = lambda p: float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))))
    assert rms(new_p) < 0.8 * rms(plain_p)


def test_stack_fitter_formulations_give_the_same_fields_on_mnist():
  """The fit stage's fitter on real images, both formulations, 8 fake devices: per-field PSNR within
  0.01 dB after a short fit (longer fits diverge like any float perturbation: benchmarks/RESULTS.md)."""
  config = load_config('smoke', **{'data.num_fields': 16})
  data = images.load(config)
  spec = mlp.FieldSpec.from_config(config.field)
  mesh = sharding.make_mesh(config.mesh)
  feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28)))
  targets = data.images.reshape(16, 784, 1)
  shared = np.asarray(mlp.flatten(spec, mlp.init(spec, jax.random.PRNGKey(0))))
  out = {}
  for form in ('stacked', 'vmap'):
    with config.unlocked():
      config.fit.formulation = form
    fitter = stack.StackFitter(spec, config, mesh, psnr_score(spec), feats=feats)
    assert fitter.formulation == form
    out[form] = fitter.fit(60, targets, stack.field_keys(0, np.arange(16)), shared)
  (w_s, loss_s, q_s), (w_v, loss_v, q_v) = out['stacked'], out['vmap']
  np.testing.assert_allclose(q_s, q_v, atol=0.01)
  np.testing.assert_allclose(loss_s, loss_v, rtol=1e-3)
  np.testing.assert_allclose(w_s, w_v, rtol=1e-3, atol=1e-3)
  assert q_s.mean() > 12.0


@pytest.mark.parametrize('form', ['stacked', 'vmap'])
def test_every_matrix_product_of_the_fit_runs_at_fit_matmul_precision(form):
  """fit.matmul_precision reaches every dot of the compiled fit (a GPU would otherwise run them in
  TF32, which moved single fields' PSNR by up to 9.7 dB between formulations on an H200)."""
  config = load_config('smoke')
  spec = mlp.FieldSpec.from_config(config.field)
  mesh = sharding.make_mesh(config.mesh)
  feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28)))
  marked = {}
  for precision in ('highest', 'default'):
    with config.unlocked():
      config.fit.formulation, config.fit.matmul_precision = form, precision
    fitter = stack.StackFitter(spec, config, mesh, psnr_score(spec), feats=feats)
    text = fitter.compile(3, 8, np.zeros((8, 784, 1), np.float32)).as_text()
    dots = re.findall(r' dot\([^\n]*', text)
    assert dots
    marked[precision] = [('operand_precision={highest,highest}' in d) for d in dots]
  assert all(marked['highest']) and not any(marked['default'])


def test_shared_init_candidates_are_fitted_without_the_anchor():
  """The candidates start from random inits, so fit.anchor (a pull back to the start) is off for them:
  the shared init is the same with and without it; the fields after it are fitted with it."""
  targets = None
  found = {}
  for anchor in (0.0, 5.0):
    config = load_config('smoke', **{'data.num_fields': 8, 'fit.anchor': anchor, 'fit.shared_init_candidates': 1,
                                     'fit.shared_init_steps': 20})
    spec = mlp.FieldSpec.from_config(config.field)
    if targets is None:
      targets = images.load(config).images.reshape(8, 784, 1)
    feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28)))
    fitter = stack.StackFitter(spec, config, sharding.make_mesh(config.mesh), psnr_score(spec), feats=feats)
    shared, _ = stack.search_shared_init(fitter, config, targets, 0, PSNR)
    fields, _, _ = fitter.fit(20, targets, stack.field_keys(0, np.arange(8)), shared)
    found[anchor] = shared, fields
  np.testing.assert_array_equal(found[0.0][0], found[5.0][0])
  moved = {a: float(np.abs(w - s[None]).mean()) for a, (s, w) in found.items()}
  assert moved[5.0] < 0.9 * moved[0.0]


@pytest.mark.parametrize('key,value', [('fit.anchor', -0.5), ('fit.matmul_precision', 'tf32')])
def test_a_bad_fit_key_is_one_config_error(tmp_path, key, value):
  with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r}")):
    main.run(load_config('smoke', **{key: value}), str(tmp_path), 'fit')


def test_auto_picks_stacked_for_grids_and_blocks_for_points_on_a_cpu():
  assert stacked.resolve('auto', points=False) == 'stacked'
  assert stacked.resolve('auto', points=True) == 'blocked'  # the tests run on the CPU
  assert stacked.resolve('auto', points=True, backend='gpu') == 'vmap'
  assert stacked.resolve('auto', points=False, backend='tpu') == 'stacked'
  assert stacked.resolve('vmap', points=False) == 'vmap'


def _point_fitter(formulation, mesh, block_fields=0, fields=16):
  """A point-field StackFitter (the shapes modality's kind) on random points, and its data."""
  spec = _spec(in_dims=3, activation='gelu', hidden=(16, 16))
  config = ml_collections.ConfigDict({'fit': _fit_cfg(loss='mse', formulation=formulation,
                                                      block_fields=block_fields)})
  rng = np.random.default_rng(4)
  rows = (rng.uniform(-1, 1, (fields, 64, 3)).astype(np.float32), rng.uniform(-1, 1, (fields, 64)).astype(np.float32))
  score = lambda p, x, t: jnp.mean((mlp.apply(spec, p, x)[:, 0] - t) ** 2)
  fitter = stack.StackFitter(spec, config, mesh, score, points=True, per_step=16)
  shared = np.asarray(mlp.flatten(spec, mlp.init(spec, jax.random.PRNGKey(5))))
  return fitter, rows, shared


def test_blocked_fit_equals_the_reference():
  """'blocked' fits the same fields as 'vmap' (each point field by stacked.fit_point_field, the reference's
  fit with its backward written out, a block of fields per call): per-field losses equal to float
  rounding, for every block size, on 8 devices."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1}))
  keys = stack.field_keys(0, np.arange(16))
  ref_fitter, rows, shared = _point_fitter('vmap', mesh)
  w_ref, loss_ref, q_ref = ref_fitter.fit(40, rows, keys, shared)
  for block in (1, 2, 0):
    fitter, _, _ = _point_fitter('blocked', mesh, block_fields=block)
    assert fitter.formulation == 'blocked'
    w, loss, q = fitter.fit(40, rows, keys, shared)
    np.testing.assert_allclose(q, q_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w, w_ref, rtol=1e-3, atol=1e-4)
  assert float(np.abs(w_ref - shared).max()) > 1e-2  # the fit did something


def test_blocked_fit_does_not_depend_on_chunks_or_devices():
  """Blocks of 3 fields: a field's weights are bit-identical whether fitted in one stack of 16 on 8
  devices (2 per device: one padded block each) or in chunks of 5 on one device (2 blocks, the last
  padded)."""
  mesh_cfg = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
  keys = stack.field_keys(0, np.arange(16))
  fitter8, rows, shared = _point_fitter('blocked', sharding.make_mesh(mesh_cfg), block_fields=3)
  whole = fitter8.fit(30, rows, keys, shared)[0]
  fitter1, _, _ = _point_fitter('blocked', sharding.make_mesh(mesh_cfg, jax.devices()[:1]), block_fields=3)
  parts = [fitter1.fit(30, stack.take(rows, np.arange(lo, min(16, lo + 5))), keys[lo:lo + 5], shared)[0]
           for lo in range(0, 16, 5)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_block_size_keeps_a_block_in_cache_and_depends_on_the_field_only():
  spec = _spec(in_dims=3, hidden=(16, 16))
  assert stack.block_fields(spec, _fit_cfg(block_fields=3), 100, 1000) == 3
  per_field = 4 * (2 * 100 * (spec.encoded_dims + 16 + 16 + 1) + 4 * spec.num_params)
  fit = stack.BLOCK_BYTES // per_field
  assert stack.block_fields(spec, _fit_cfg(), 100, 1000) == 1 << (fit.bit_length() - 1)  # a power of two <= fit
  assert stack.block_fields(spec, _fit_cfg(), -1, 100) == stack.block_fields(spec, _fit_cfg(), 100, 1000)
  assert stack.block_fields(spec, _fit_cfg(), 8 * 100, 1000) < stack.block_fields(spec, _fit_cfg(), 100, 1000)
  # the parity shape fields are one field per block on a core's cache
  hd = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0, 4.0, 8.0), include_input=True, hidden=(128, 128, 128))
  nefgpt3d = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0), include_input=True, hidden=(32, 32, 32, 32), activation='gelu')
  assert stack.block_fields(hd, _fit_cfg(), 2048, 20000) == 1
  assert stack.block_fields(nefgpt3d, _fit_cfg(), 8192, 20000) == 1


def test_unknown_formulation_is_one_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"fit\.formulation='fast'"):
    main.run(load_config('smoke', **{'fit.formulation': 'fast'}), str(tmp_path), 'fit')


# -- CPU devices: the launcher makes one JAX device per core (nfjax/sharding.py: split_cpu) -------

@pytest.mark.parametrize('cores,expected', [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (16, 8), (96, 8)])
def test_auto_cpu_devices_is_one_per_core_as_a_power_of_two_up_to_8(cores, expected):
  assert sharding.auto_cpu_devices(cores) == expected


def test_an_explicit_device_count_in_xla_flags_wins():
  assert '--xla_force_host_platform_device_count=8' in os.environ['XLA_FLAGS']  # conftest's
  assert sharding.split_cpu(3) is None
  assert jax.device_count() == 8


def test_only_per_core_work_uses_every_device_of_a_split_cpu(monkeypatch):
  mesh_cfg = {'data': -1, 'fsdp': 1, 'model': 1}
  assert sharding.make_mesh(mesh_cfg).size == 8  # devices from XLA_FLAGS: every stage uses them all
  monkeypatch.setattr(sharding, '_PER_CORE_CPU', True)  # as split_cpu leaves it
  assert sharding.make_mesh(mesh_cfg, per_core=True).size == 8
  assert sharding.make_mesh(mesh_cfg).size == 1 and sharding.devices() == [jax.devices()[0]]
  assert sharding.mesh_shape(mesh_cfg) == (1, 1, 1)  # what the train checks divide the batch by


def test_launcher_splits_the_cpu_into_devices_and_fits_on_all_of_them(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=configs/mnist.py:smoke', f'--workdir={tmp_path}',
                        '--stages=fit,tokenize,train', '--cpu_devices=3', '--config.data.num_fields=9',
                        '--config.fit.chunk_size=9', '--config.fit.steps=5', '--config.fit.shared_init_steps=5',
                        '--config.train.steps=3', '--config.train.warmup_steps=1'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'computing on the CPU as 3 device(s): the fit runs on all' in out.stdout
  summary = json.loads((tmp_path / 'fields' / 'summary.json').read_text())
  assert summary['num_devices'] == 3 and summary['num_fields'] == 9
  train = json.loads((tmp_path / 'transformer' / 'summary.json').read_text())
  assert train['num_devices'] == 1  # one transformer: one device that uses every core
