"""The fit stage on 3D shapes: IoU, chunking invariance, resume, bad input, parity field sizes."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest

from conftest import apply_overrides
from nfjax.modalities import shapes as fit_shapes
from nfjax.configs import checks
from nfjax.stages import fit
from nfjax.io import fields as wds
from nfjax.errors import ConfigError, DataError
from nfjax.data.shapes import ShapeSet
from nfjax.fields import mlp, stack
from nfjax.io import files as io

def run_fit(config, workdir: str, data):
  """The fit stage (nfjax.stages.fit.run) on `data`, a ShapeSet, instead of the config's shapes."""
  original = fit_shapes.load_data
  fit_shapes.load_data = lambda config, workdir: data
  try:
    return fit.run(config, workdir)
  finally:
    fit_shapes.load_data = original


def synthetic_shapes(n: int, points: int = 2048, heldout: int = 4096, label: str = 'occupancy',
                     seed: int = 0) -> ShapeSet:
  """Spheres (class 0) and boxes (class 1) of random size and centre, with analytic labels.

  Training points: half uniform in [-0.5, 0.5]^3, half within 0.03 of the surface (rejection
  sampled); held-out points uniform.
  """
  rng = np.random.default_rng(seed)
  pts, vals, hps, hos = [], [], [], []
  for i in range(n):
    centre = rng.uniform(-0.08, 0.08, 3)
    if i % 2 == 0:
      r = rng.uniform(0.18, 0.35)
      sdf = lambda x, c=centre, r=r: np.linalg.norm(x - c, axis=-1) - r
    else:
      h = rng.uniform(0.12, 0.3, 3)

      def sdf(x, c=centre, h=h):
        q = np.abs(x - c) - h
        return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)
    pool = rng.uniform(-0.5, 0.5, (40 * points, 3))
    shell = pool[np.abs(sdf(pool)) < 0.03][:points - points // 2]
    p = np.concatenate([rng.uniform(-0.5, 0.5, (points // 2, 3)), shell]).astype(np.float32)
    d = sdf(p)
    v = {'occupancy': (d < 0).astype(np.float32), 'sdf': d.astype(np.float32),
         'pm1': np.where(d <= 0, -1.0, 1.0).astype(np.float32)}[label]
    hp = rng.uniform(-0.5, 0.5, (heldout, 3)).astype(np.float32)
    pts.append(p)
    vals.append(v)
    hps.append(hp)
    hos.append((sdf(hp) < 0).astype(np.float32))
  extra = {'meshes': None}  # no meshes to give
  return ShapeSet(points=np.stack(pts), values=np.stack(vals), heldout_points=np.stack(hps),
                  heldout_occupancy=np.stack(hos), labels=(np.arange(n) % 2).astype(np.int32),
                  source_index=np.arange(n, dtype=np.int64), names=[f'shape{i}' for i in range(n)],
                  source='synthetic:spheres+boxes', num_classes=2, class_names=['sphere', 'box'], skipped=[],
                  **extra)


def shape_config(**overrides) -> ml_collections.ConfigDict:
  """A small shapes config (every key the shape fit stage reads), with dotted-key overrides."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
  c.data = ml_collections.ConfigDict({  # nfjax.data.shapes keys; the tests pass their own ShapeSet
      'modality': 'shapes', 'source': 'procedural', 'label': 'occupancy', 'num_fields': 8, 'synsets': (),
      'mesh_dir': '', 'split_file': '', 'normalize': 'mean', 'num_uniform': 1024, 'num_surface': 1024,
      'surface_sigma': 0.01, 'num_heldout': 4096, 'cache_dir': ''})
  c.field = ml_collections.ConfigDict({
      'in_dims': 3, 'freqs': (1.0, 2.0, 4.0, 8.0), 'use_pi': False, 'include_input': True, 'hidden': (32, 32),
      'activation': 'relu', 'siren_w0': 30.0, 'out_dims': 1, 'output_bias': True, 'output_activation': 'none',
      'init': 'torch_default'})
  c.fit = ml_collections.ConfigDict({
      'steps': 300, 'lr': 1e-2, 'schedule': 'cosine', 'warmup_steps': 0, 'end_lr_factor': 0.01, 'b1': 0.9,
      'b2': 0.999, 'loss': 'bce', 'l2': 0.0, 'sdf_clamp': 0.0, 'points_per_step': 512, 'init': 'random',
      'shared_init_index': 0, 'shared_init_steps': 300, 'shared_init_candidates': 1, 'shared_init_probe': 4,
      'shared_init_l2': -1.0, 'refit_below': 0.0, 'refit_steps_factor': 2, 'chunk_size': 8, 'iou_floor': 0.5,
      'formulation': 'auto', 'block_fields': 0, 'matmul_precision': 'highest',
      'num_reconstructions': 0, 'render_resolution': 32})
  return apply_overrides(c, overrides)


def numpy_iou(spec, weights, points, occupancy, level, above):
  """IoU of flat weight vectors [N, P] on held-out points, with a plain numpy forward pass."""
  out = []
  for w, p, o in zip(weights, points, occupancy):
    params = mlp.unflatten(spec, w)
    v = np.asarray(mlp.apply(spec, params, p))[:, 0]
    inside = v > level if above else v < level
    occ = o > 0.5
    out.append((inside & occ).sum() / max((inside | occ).sum(), 1))
  return np.array(out)


@pytest.fixture(scope='module')
def shapes8():
  return synthetic_shapes(8)


def test_parity_fields_have_the_reference_sizes():
  nefgpt = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0), use_pi=False, include_input=True, hidden=(32, 32, 32, 32),
                         activation='gelu', output_bias=False, output_activation='tanh', init='torch_default')
  hyperdiffusion = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0, 4.0, 8.0), use_pi=False, include_input=True,
                                 hidden=(128, 128, 128), activation='relu', output_bias=True,
                                 output_activation='none', init='torch_default')
  assert nefgpt.encoded_dims == 15 and nefgpt.num_params == 3712
  assert hyperdiffusion.encoded_dims == 27 and hyperdiffusion.num_params == 36737
  assert nefgpt.layout[0] == {'name': 'layers.0.weight', 'shape': [32, 15], 'offset': 0, 'size': 480}
  assert nefgpt.layout[-1]['name'] == 'layers.4.weight' and nefgpt.layout[-1]['shape'] == [1, 32]
  assert hyperdiffusion.layout[0]['shape'] == [128, 27] and hyperdiffusion.layout[-1]['name'] == 'layers.3.bias'


def test_stage_fits_shapes_to_high_iou(tmp_path, shapes8):
  config = shape_config(**{'fit.num_reconstructions': 4, 'fit.render_resolution': 24})
  summary = run_fit(config, str(tmp_path), shapes8)
  for key in ('num_fields', 'params_per_field', 'iou_mean', 'iou_p10', 'iou_min', 'fields_per_sec', 'seconds',
              'quality_metric', 'quality_mean', 'device_kind', 'num_devices', 'num_flagged'):
    assert key in summary, key
  assert summary['num_fields'] == 8 and summary['quality_metric'] == 'iou'
  assert summary['iou_min'] > 0.9, summary
  ds = wds.load(str(tmp_path / 'fields'))
  assert ds.weights.shape == (8, summary['params_per_field']) and ds.meta['modality'] == 'shapes'
  assert ds.meta['quality_metric'] == 'iou' and ds.meta['class_names'] == ['sphere', 'box']
  assert ds.meta['names'][3] == 'shape3' and ds.meta['surface'] == {'level': 0.0, 'inside': 'above', 'of': 'output'}
  assert len(ds.good()) == 8 and ds.shared_init is None
  try:
    from nfjax.fields import meshing  # noqa: F401  (written in parallel; the PNG is skipped without it)
    assert os.path.getsize(tmp_path / 'fields' / 'shapes.png') > 1000
  except ImportError:
    pass
  np.testing.assert_array_equal(ds.labels, shapes8.labels)
  # The stored quality is the IoU of the stored weights (recomputed outside the fitter).
  spec = mlp.FieldSpec.from_dict(ds.meta['field'])
  iou = numpy_iou(spec, ds.weights, shapes8.heldout_points, shapes8.heldout_occupancy, 0.0, True)
  np.testing.assert_allclose(iou, ds.quality, atol=1e-3)
  # Re-run: skipped (the stage finds its summary; nothing is loaded).
  assert fit.run(config, str(tmp_path)) == summary


def test_same_weights_whatever_the_chunking_and_devices(tmp_path, shapes8):
  data = synthetic_shapes(5, points=512, heldout=512, seed=3)
  kw = {'fit.steps': 40, 'fit.points_per_step': 128, 'fit.init': 'shared', 'fit.shared_init_steps': 30}
  a = run_fit(shape_config(**kw), str(tmp_path / 'a'), data)                 # 8 devices, 1 chunk
  b = run_fit(shape_config(**kw, **{'mesh.data': 1, 'fit.chunk_size': 2}), str(tmp_path / 'b'), data)
  da, db = wds.load(str(tmp_path / 'a' / 'fields')), wds.load(str(tmp_path / 'b' / 'fields'))
  np.testing.assert_allclose(da.shared_init, db.shared_init, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(da.weights, db.weights, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(da.quality, db.quality, atol=2e-3)
  assert a['num_devices'] == 8 and b['num_devices'] == 1
  assert not np.allclose(da.weights[0], da.weights[1])


def test_kill_and_resume_reuses_finished_chunks(tmp_path, monkeypatch):
  data = synthetic_shapes(6, points=512, heldout=512, seed=5)
  config = shape_config(**{'fit.steps': 30, 'fit.points_per_step': 128, 'fit.chunk_size': 2, 'mesh.data': 2})
  real_write = io.write_npz
  written = []

  def crash_after_two(path, **arrays):
    if len(written) == 2:
      raise KeyboardInterrupt('killed')
    real_write(path, **arrays)
    written.append(path)

  monkeypatch.setattr(io, 'write_npz', crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    run_fit(config, str(tmp_path / 'killed'), data)
  monkeypatch.setattr(io, 'write_npz', real_write)
  chunks = tmp_path / 'killed' / 'fields' / 'chunks'
  assert sorted(os.listdir(chunks)) == ['chunk_00000.npz', 'chunk_00001.npz']
  with pytest.raises(DataError, match='incomplete'):
    wds.load(str(tmp_path / 'killed' / 'fields'))
  # Resume: only chunk 2 is fitted (the others are read back untouched).
  resumed_writes = []
  monkeypatch.setattr(io, 'write_npz', lambda path, **a: (resumed_writes.append(path), real_write(path, **a)))
  summary = run_fit(config, str(tmp_path / 'killed'), data)
  assert [os.path.basename(p) for p in resumed_writes] == ['chunk_00002.npz']
  assert summary['fields_fitted_this_run'] == 2
  monkeypatch.setattr(io, 'write_npz', real_write)
  run_fit(config, str(tmp_path / 'full'), data)
  a, b = wds.load(str(tmp_path / 'killed' / 'fields')), wds.load(str(tmp_path / 'full' / 'fields'))
  for k in wds.ARRAYS:
    np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


@pytest.mark.parametrize('label,loss,field,extra', [
    # NeF-GPT: tanh output vs +-1 labels (-1 inside), MSE; its L2 term on the shared init only.
    ('pm1', 'mse', {'activation': 'gelu', 'output_bias': False, 'output_activation': 'tanh'},
     {'fit.init': 'shared', 'fit.shared_init_l2': 5.0, 'fit.lr': 1e-2}),
    # Truncated SDF with L1.
    ('sdf', 'l1', {}, {'fit.sdf_clamp': 0.1, 'fit.lr': 1e-2}),
])
def test_label_modes_fit_and_score_consistently(tmp_path, label, loss, field, extra):
  data = synthetic_shapes(4, points=2048, heldout=2048, label=label, seed=7)
  config = shape_config(**{'data.label': label, 'fit.loss': loss, **{f'field.{k}': v for k, v in field.items()},
                           **extra})
  summary = run_fit(config, str(tmp_path), data)
  ds = wds.load(str(tmp_path / 'fields'))
  assert ds.meta['surface']['inside'] == 'below' and ds.meta['label'] == label
  spec = mlp.FieldSpec.from_dict(ds.meta['field'])
  iou = numpy_iou(spec, ds.weights, data.heldout_points, data.heldout_occupancy, 0.0, False)
  np.testing.assert_allclose(iou, ds.quality, atol=1e-3)
  assert summary['iou_min'] > 0.85, summary
  if config.fit.init == 'shared':
    info = io.read_json(str(tmp_path / 'fields' / 'shared_init.json'))
    assert 'candidate_iou' in info and ds.shared_init.shape == (spec.num_params,)


def test_low_iou_fields_are_flagged(tmp_path):
  data = synthetic_shapes(2, points=256, heldout=256)
  summary = run_fit(shape_config(**{'fit.steps': 5, 'fit.points_per_step': 64, 'fit.iou_floor': 0.999}),
                           str(tmp_path), data)
  ds = wds.load(str(tmp_path / 'fields'))
  assert summary['num_flagged'] == 2 and np.all(ds.flags & wds.FLAG_LOW_QUALITY) and len(ds.good()) == 0


def test_bad_input_fails_with_one_clear_error_before_compiling(tmp_path, monkeypatch, shapes8):
  def no_compile(*a, **k):
    raise AssertionError('compiled before the config error')
  monkeypatch.setattr(stack.StackFitter, 'compile', no_compile)
  with pytest.raises(ConfigError, match=r'field.in_dims=2'):
    fit.run(shape_config(**{'field.in_dims': 2}), str(tmp_path))
  with pytest.raises(ConfigError, match=r'fit.points_per_step=4096 .* 2048 training points'):
    run_fit(shape_config(**{'fit.points_per_step': 4096}), str(tmp_path / 'p'), shapes8)
  with pytest.raises(ConfigError, match=r"fit.loss='bce' .* data.label='occupancy'"):
    checks.validate(shape_config(**{'data.label': 'sdf'}), ('fit',))
  with pytest.raises(ConfigError, match=r"output_activation='sigmoid'"):
    checks.validate(shape_config(**{'data.label': 'pm1', 'fit.loss': 'mse', 'field.output_activation': 'sigmoid'}), ('fit',))
  with pytest.raises(ConfigError, match=r'fit.iou_floor=1.5'):
    checks.validate(shape_config(**{'fit.iou_floor': 1.5}), ('fit',))
  with pytest.raises(ConfigError, match=r"data.modality='voxels' is not a registered modality"):
    fit.run(shape_config(**{'data.modality': 'voxels'}), str(tmp_path))
  with pytest.raises(ConfigError, match=r'fit.shared_init_index=8'):
    run_fit(shape_config(**{'fit.init': 'shared', 'fit.shared_init_index': 8}), str(tmp_path / 's'),
                   shapes8)
  assert not (tmp_path / 'fields').exists()


def test_labels_with_the_other_sign_convention_are_refused(tmp_path, monkeypatch):
  data = synthetic_shapes(4, points=2048, heldout=256, label='pm1')
  data.values = -data.values  # +1 inside: every IoU would be ~0
  monkeypatch.setattr(stack.StackFitter, 'compile', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(DataError, match=r"data.label='pm1'.* -1 inside, \+1 outside"):
    run_fit(shape_config(**{'data.label': 'pm1', 'fit.loss': 'mse', 'field.output_activation': 'tanh'}),
                   str(tmp_path), data)


def test_fit_run_dispatches_shape_configs_to_the_shape_data(tmp_path):
  """The launcher's path: fit.run -> the shapes modality -> nfjax.data.shapes.load (procedural meshes)."""
  config = shape_config(**{'data.num_fields': 2, 'data.num_uniform': 512, 'data.num_surface': 512,
                           'data.num_heldout': 1024, 'fit.steps': 20, 'fit.points_per_step': 256})
  summary = fit.run(config, str(tmp_path))
  ds = wds.load(str(tmp_path / 'fields'))
  assert summary['num_fields'] == 2 and ds.meta['modality'] == 'shapes' and ds.meta['points_per_shape'] == 1024
  assert ds.meta['source'].startswith('procedural') and len(ds.meta['names']) == 2
  assert os.path.isdir(tmp_path / 'shape_data')  # the point cache lives in the workdir


def test_points_travel_as_coordinates_not_features():
  """The compiled fitter's per-field input is [F, n, 3] (float16 allowed), never [F, n, E]."""
  from nfjax import sharding
  config = shape_config(**{'fit.steps': 3, 'fit.points_per_step': 64})
  spec = mlp.FieldSpec.from_config(config.field)
  data = synthetic_shapes(2, points=256, heldout=128)
  rows = fit_shapes.check_data(config, spec, data)
  rows = (rows[0].astype(np.float16),) + rows[1:]
  fitter = fit_shapes.Shapes().make_fitter(spec, config, sharding.make_mesh(config.mesh), None)
  compiled = fitter.compile(3, 8, rows)
  shapes = [a.shape for a in jax.tree.leaves(compiled.args_info)]
  assert (8, 256, 3) in shapes and (8, 256, spec.encoded_dims) not in shapes
  w, loss, iou = fitter.fit(3, rows, stack.field_keys(0, np.arange(2)), None)
  assert w.shape == (2, spec.num_params) and np.isfinite(loss).all() and ((0 <= iou) & (iou <= 1)).all()


def test_a_fitted_sphere_meshes_to_that_sphere(tmp_path, shapes8):
  """Fit stage -> marching cubes on the grid -> the surface lies on the analytic sphere (both ways)."""
  from nfjax import geometry
  from nfjax.fields import meshing
  config = shape_config(**{'fit.num_reconstructions': 0})
  run_fit(config, str(tmp_path), synthetic_shapes(2))
  ds = wds.load(str(tmp_path / 'fields'))
  rng = np.random.default_rng(0)                      # shape 0 of synthetic_shapes(seed=0): its sphere
  centre, r = rng.uniform(-0.08, 0.08, 3), rng.uniform(0.18, 0.35)
  spec = mlp.FieldSpec.from_dict(ds.meta['field'])
  (v, f), = meshing.mesh_fields(spec, ds.weights[:1], resolution=48, level=0.0, inside='above')
  assert len(f) > 100
  on_mesh, _ = geometry.sample_surface(v, f, 4000, 0)
  mesh_to_sphere = np.abs(np.linalg.norm(on_mesh - centre, axis=-1) - r)
  d = rng.normal(size=(2000, 3))
  on_sphere = (centre + r * d / np.linalg.norm(d, axis=-1, keepdims=True)).astype(np.float32)
  sphere_to_mesh = geometry.unsigned_distance(on_sphere, v, f)
  chamfer = float(np.mean(mesh_to_sphere ** 2) + np.mean(sphere_to_mesh ** 2))
  assert chamfer < 2e-4, chamfer                      # RMS error under ~1 voxel (1/47) of the grid
  assert mesh_to_sphere.mean() < 0.015 and sphere_to_mesh.mean() < 0.015
