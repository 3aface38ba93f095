"""Shapes through all five stages (configs/shapes.py:smoke), and the shape evaluator's set metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import load_config

SHAPES = 'configs/shapes.py'
# The smoke fields are poor (150 fit steps); a shared init fitted on shape 11 (a lamp) keeps the
# 6-step GPT's samples non-empty, so the headline metrics exist. Everything else is the preset.
OVERRIDES = {'fit.shared_init_index': 11}


def _config(**over):
  return load_config('smoke', SHAPES, **{**OVERRIDES, **over})


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
  from nfjax import main
  workdir = str(tmp_path_factory.mktemp('shapes_pipeline'))
  return workdir, main.run(_config(), workdir, 'all')


def _in_unit(x):
  return x is not None and 0.0 <= x <= 1.0


def test_all_five_stages_write_meshes_pictures_and_metrics(pipeline):
  from nfjax.io import fields as wds
  from nfjax.io import samples as samples_lib
  from nfjax.fields import meshing, mlp
  workdir, summaries = pipeline
  assert list(summaries) == ['fit', 'tokenize', 'train', 'sample', 'evaluate']
  fields = wds.load(os.path.join(workdir, 'fields'))
  assert fields.meta['modality'] == 'shapes'
  spec = mlp.FieldSpec.from_dict(fields.meta['field'])
  config = _config()

  s = summaries['sample']
  assert s['mesh_resolution'] == config.sample.mesh_resolution and s['surface']['inside'] == 'above'
  for st in s['settings']:
    d = os.path.join(workdir, 'samples', st['name'])
    w, lab = np.load(os.path.join(d, 'weights.npy')), np.load(os.path.join(d, 'labels.npy'))
    assert w.shape == (8, fields.params_per_field) and lab.shape == (8,)
    meshes, info = samples_lib.load_meshes(workdir, st['name'])
    assert len(meshes) == 8 and info['resolution'] == config.sample.mesh_resolution
    num_empty = sum(len(f) == 0 for _, f in meshes)
    assert s['num_empty'][st['name']] == num_empty
    assert json.load(open(os.path.join(d, 'meshes.json')))['num_empty'] == num_empty
    # The stored meshes are the decoded weights' meshes at the fields' surface level.
    again = meshing.mesh_fields(spec, w[:2], config.sample.mesh_resolution, 0.0, 'above')
    for (v0, f0), (v1, f1) in zip(meshes[:2], again):
      np.testing.assert_array_equal(f0, f1)
      np.testing.assert_allclose(v0, v1, atol=1e-6)
    assert sorted(os.listdir(os.path.join(d, 'meshes'))) == [f'sample_{i:05d}.ply' for i in range(8)]
    assert os.path.getsize(os.path.join(d, 'grid.png')) > 1000
  assert os.path.getsize(os.path.join(workdir, 'samples', 'turntable.gif')) > 1000

  ev = summaries['evaluate']
  assert ev['modality'] == 'shapes' and ev['headline_setting'] == 'topk3_t0.8'
  assert ev['fpd'] is None and ev['fpd_note'].startswith('not computed')
  assert ev['num_samples'] == 8 and ev['num_reference'] == 7 and ev['num_generated'] == 7   # floor(8 / 1.1)
  rows = {**ev['settings'], 'reference': ev['reference'], 'baseline': ev['baseline'],
          'no_structure': ev['no_structure']}
  assert set(ev['settings']) == {'topk3_t0.8', 'topk0_t1'}
  for name, r in rows.items():
    assert r['num_samples'] == 7, name
    assert r['num_evaluated'] == min(7 - r['num_empty'], 7)
    if r['num_evaluated']:
      assert np.isfinite(r['mmd_cd_x100']) and r['mmd_cd_x100'] >= 0, name
      assert _in_unit(r['cov']) and _in_unit(r['1nna']), name
      assert r['mmd_cd_x100'] == pytest.approx(100 * r['mmd_cd'])
      assert set(r['class_cov']) == {'plane', 'chair', 'table', 'lamp'}
      assert all(v is None or _in_unit(v) for v in r['class_cov'].values())
  h = ev['settings']['topk3_t0.8']
  assert ev['num_empty'] == h['num_empty'] < 7, 'the headline setting should have non-empty samples'
  for key in ('mmd_cd_x100', 'cov', '1nna'):
    assert ev[key] == h[key] and np.isfinite(ev[key])
  assert h['meshes'].startswith('reused')   # samples/ meshed at the evaluate resolution already
  # The no-structure row (per-slot histograms of the training tokens): the settings' metrics, the
  # headline setting's classes, and by how much the headline beats it (the log line's figures).
  from nfjax.evaluate import protocol
  from nfjax.modalities.shapes import evaluate as shapes
  ns = ev['no_structure']
  assert set(h) - {'top_k', 'temperature', 'top_p', 'meshes'} <= set(ns) and ns['labels_from'] == 'topk3_t0.8'
  assert ns['num_train_sequences'] == len(np.load(os.path.join(workdir, 'tokens', 'train_idx.npy')))
  line, diffs = protocol.compare(shapes.ShapeEval, h, ns)
  assert line.startswith(f"COV {h['cov']:.3f} vs ") and ' 1-NNA ' in line and ' MMD-CDx100 ' in line, line
  # ... and which settings beat it on all three figures at once (eval/settings.png plots them).
  better = {name: protocol.better_on_every_figure(shapes.ShapeEval, r, ns) for name, r in ev['settings'].items()}
  expect = {'setting': 'topk3_t0.8', **diffs, 'better_on_every_figure': better['topk3_t0.8']}
  if better['topk3_t0.8'] is not None:
    expect['settings_better_on_every_figure'] = [name for name, b in better.items() if b]
  versus = dict(ev['vs_no_structure'])
  share, ref_cov = versus.pop('coverage_of_reference', None), ev['reference']['cov']
  if all(np.isfinite(x) for x in (ns['cov'], h['cov'], ref_cov)) and ref_cov > 0:   # shares of the fields' COV
    assert share == pytest.approx({'row': ns['cov'] / ref_cov, 'headline': h['cov'] / ref_cov})
  else:
    assert share is None
  assert versus == expect
  if ns['num_evaluated']:
    assert diffs['cov'] == pytest.approx(h['cov'] - ns['cov'])
  assert ev['reference']['recon_cd_to_source']['median'] > 0 and ev['copy_threshold_cd'] > 0
  assert ev['timings']['reference'] > 0 and ev['seconds'] > 0
  evd = os.path.join(workdir, 'eval')
  for png in ('novelty.png', 'neighbours_topk3_t0.8.png', 'neighbours_reference.png', 'neighbours_baseline.png',
              'settings.png', *(f'grid_{name}.png' for name in ev['settings'])):
    assert os.path.getsize(os.path.join(evd, png)) > 1000, png
  listed = json.load(open(os.path.join(evd, 'manifest.json')))['files']
  assert {f'grid_{name}.png' for name in ev['settings']} <= set(listed)
  ps = np.load(os.path.join(evd, ev['per_sample_files']['topk3_t0.8']))
  assert ps['nonempty'].sum() == 7 - h['num_empty']
  assert np.isfinite(ps['nn_shape_cd'][ps['nonempty']]).all()


def test_rerun_skips_and_new_samples_are_evaluated_again(pipeline):
  from nfjax import main
  from nfjax.io import fields as wds
  from nfjax.errors import DataError
  from nfjax.io import samples as samples_lib
  from nfjax.evaluate import protocol
  from nfjax.stages import evaluate as stage
  workdir, summaries = pipeline
  evd = os.path.join(workdir, 'eval')
  mtime = os.path.getmtime(os.path.join(evd, 'summary.json'))
  again = main.run(_config(), workdir, 'all')
  assert json.dumps(again, sort_keys=True) == json.dumps(summaries, sort_keys=True)
  assert os.path.getmtime(os.path.join(evd, 'summary.json')) == mtime

  # An image config on shape fields: one clear error.
  with pytest.raises(DataError, match=r"fields of the 'shapes' modality but the config has data.modality='images'"):
    stage.run(load_config('smoke'), workdir)

  # New samples (exact copies of training fields, and noisy ones, no meshes.npz): re-evaluated.
  import shutil
  shutil.rmtree(os.path.join(workdir, 'samples'))
  protocol.write_fake_samples(workdir, [
      {'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'noise': 0.0},
      {'name': 'noisy', 'top_k': 5, 'temperature': 1.0, 'top_p': 1.0, 'noise': 0.3}], num_samples=8)
  ev = stage.run(_config(), workdir)
  assert set(ev['settings']) == {'topk3_t0.8', 'noisy'}
  assert not os.path.exists(os.path.join(evd, 'neighbours_topk0_t1.png'))     # no stale pictures
  assert not os.path.exists(os.path.join(evd, 'grid_topk0_t1.png'))
  assert os.path.exists(os.path.join(evd, 'grid_noisy.png'))
  assert not os.path.exists(os.path.join(evd, 'per_sample', 'topk0_t1.npz'))
  copies = ev['settings']['topk3_t0.8']
  assert copies['meshes'].startswith('meshed')
  assert copies['novelty']['nn_weight_l2']['median'] == 0.0
  assert ev['settings']['noisy']['novelty']['nn_weight_l2']['median'] > 0.0
  ps = np.load(os.path.join(evd, 'per_sample', 'topk3_t0.8.npz'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  w = np.load(os.path.join(workdir, 'samples', 'topk3_t0.8', 'weights.npy'))[:7]
  np.testing.assert_array_equal(fields.weights[ps['nn_weight_field']], w)

  # PointNet++ weights given (random ones: only the wiring is tested): FPD for every row; a file
  # that is not PointNet++ is refused before any work.
  from nfjax.evaluate import pointnet2
  pn = os.path.join(workdir, 'pointnet.npz')
  np.savez(pn, **pointnet2.random_state_dict(0))
  shutil.rmtree(evd)        # another evaluate config: a fresh eval/ (the stage refuses to mix configs)
  ev = stage.run(_config(**{'evaluate.pointnet_weights': pn}), workdir)
  assert ev['fpd'] == ev['settings']['topk3_t0.8']['fpd'] and pn in ev['fpd_note']
  for r in (*ev['settings'].values(), ev['reference'], ev['baseline']):
    assert r['fpd'] is not None and r['fpd'] >= -1e-6
  np.savez(pn, x=np.zeros(3))
  with pytest.raises(DataError, match='not a PointNet'):
    stage.run(_config(**{'evaluate.pointnet_weights': pn}), workdir)


def _procedural(classes=4, per_class=3):
  from nfjax.data import procedural
  meshes, labels = [], []
  for s in range(per_class):
    for c in range(classes):
      meshes.append(procedural.make_shape(c, s))
      labels.append(c)
  return meshes, np.array(labels, np.int32)


def test_evaluator_scores_the_references_themselves_perfectly_and_a_collapse_badly():
  from nfjax.data import procedural
  from nfjax.io import samples as samples_lib
  from nfjax.evaluate import shape_metrics as sm
  from nfjax.modalities.shapes import evaluate as shapes
  from nfjax.fields import meshing
  meshes, labels = _procedural()                      # 12 shapes: 3 of each class
  weights = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)
  raw, kept = sm.sample_clouds(meshes, 256, seed=0)
  assert len(kept) == 12
  ref_pos = np.arange(8)                              # 2 references per class
  from nfjax.evaluate import pointnet2
  pointnet = pointnet2.params_from_state_dict(pointnet2.random_state_dict(0))   # random weights: FPD wiring only
  ev = shapes.ShapeEvaluator(raw, labels, weights, ref_pos, 'shape_unit', None, procedural.CLASSES, seed=0,
                             points=256, pointnet=pointnet)
  pool = np.arange(12)

  # The references themselves (then extra shapes past N_ref, and empty meshes): identical clouds.
  empty = meshing.empty_mesh()
  own = meshes[:8] + [empty, meshes[8], empty]
  own_w = np.concatenate([weights[:8], np.full((1, 10), np.nan, np.float32), weights[8:10]])
  r, ps = ev.measure('references', own, np.concatenate([labels[:8], [0, 0, 1]]), own_w, pool)
  assert r['num_samples'] == 11 and r['num_empty'] == 2 and r['num_nonfinite'] == 1
  assert r['num_evaluated'] == 8                      # the first N_ref non-empty shapes
  assert r['mmd_cd'] == 0.0 and r['cov'] == 1.0 and r['1nna'] == 0.0   # twins: 1-NNA 0, not 0.5
  assert r['class_cov'] == {name: 1.0 for name in procedural.CLASSES}
  assert r['fpd'] == pytest.approx(0.0, abs=1e-3)     # same clouds, same seeded FPS: same features
  assert r['novelty']['nn_shape_cd']['min'] == 0.0 and r['novelty']['nn_class_accuracy'] == 1.0
  np.testing.assert_array_equal(ps['nn_shape_position'][:8], np.arange(8))
  assert list(ps['nonempty']) == [True] * 8 + [False, True, False]
  assert ps['nn_weight_l2'][:8].max() == 0.0 and np.isnan(ps['nn_weight_l2'][8])

  # A collapse onto one plane (8 resampled clouds of it): covers at most the 2 plane references,
  # is far from the others and is easily told apart.
  c, _ = ev.measure('collapse', [meshes[0]] * 8, np.zeros(8, np.int32), weights[[0] * 8], pool)
  assert c['cov'] <= 2 / 8 and c['mmd_cd'] > 10 * r['mmd_cd'] + 0.01 and c['1nna'] > 0.5
  assert c['class_cov']['plane'] >= 0.5 and [c['class_cov'][k] for k in ('chair', 'table', 'lamp')] == [0.0] * 3
  assert c['fpd'] > 0.01

  # Nothing to compare: no metrics, no crash.
  n, _ = ev.measure('empty', [empty] * 3, np.zeros(3, np.int32), weights[:3], pool)
  assert n['num_empty'] == 3 and n['num_evaluated'] == 0 and n['mmd_cd_x100'] is None and n['cov'] is None
  assert n['fpd'] is None

  # HyperDiffusion's 1.1x: N_ref = floor(S / 1.1) references for S samples.
  assert [shapes.reference_count(s) for s in (8, 100, 1000)] == [7, 90, 909]
  assert sm.generated_count(shapes.reference_count(100)) <= 100

  # meshes.npz round trip, empty meshes included.
  back, info = samples_lib.unpack_meshes(samples_lib.pack_meshes(own[6:], resolution=24, inside='above'))
  assert info == {'resolution': 24, 'inside': 'above'} and len(back) == 5
  for (v0, f0), (v1, f1) in zip(own[6:], back):
    np.testing.assert_array_equal(v0, v1)
    np.testing.assert_array_equal(f0, f1)


def test_evaluate_mesh_level_hyperdiffusion_option():
  from nfjax.errors import ConfigError
  from nfjax.modalities.shapes import evaluate as shapes
  from nfjax.fields import meshing, mlp
  spec = mlp.FieldSpec.from_dict(dict(load_config('parity_hd', SHAPES).field))
  meta = {'loss': 'bce', 'surface': {'level': 0.0, 'inside': 'above'}}
  assert shapes.mesh_level(_config(), meta, spec) == (0.0, 'above')        # 0.5: the fields' surface
  hd = load_config('parity_hd', SHAPES)
  assert hd.evaluate.mesh_resolution == meshing.HYPERDIFFUSION_TEST_RESOLUTION
  level, inside = shapes.mesh_level(hd, meta, spec)
  assert level == pytest.approx(meshing.HYPERDIFFUSION_TEST_LEVEL, abs=1e-3) and inside == 'above'
  with pytest.raises(ConfigError, match="fit.loss='mse'"):
    shapes.mesh_level(hd, {'loss': 'mse', 'surface': {'level': 0.0, 'inside': 'below'}}, spec)
  with pytest.raises(ConfigError, match='occupancy_level'):
    shapes.validate(_config(**{'evaluate.occupancy_level': 1.0}))
