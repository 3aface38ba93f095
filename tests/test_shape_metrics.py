"""Shape metrics: Chamfer matrices, HyperDiffusion's normalisation and MMD / COV / 1-NNA, novelty."""

from __future__ import annotations

import numpy as np
import pytest

from nfjax import sharding
from nfjax.errors import NfjaxError
from nfjax.evaluate import shape_metrics as sm


def _brute_chamfer(x, y):
  d = ((np.asarray(x, np.float64)[:, None] - np.asarray(y, np.float64)[None]) ** 2).sum(-1)
  return d.min(1).mean() + d.min(0).mean()


def _clouds(n_clouds, n_points, seed, centre=0.0, spread=1.0):
  """Noisy ellipsoids: a family of shapes with random axes (different shapes, one distribution)."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(n_clouds, n_points, 3))
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  axes = rng.uniform(0.5, 1.5, size=(n_clouds, 1, 3)) * spread
  return (u * axes + centre + 0.01 * rng.normal(size=u.shape)).astype(np.float32)


def test_chamfer_matches_brute_force():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 40, 3)).astype(np.float32)
  b = rng.normal(size=(7, 56, 3)).astype(np.float32)
  want = np.array([[_brute_chamfer(x, y) for y in b] for x in a])
  for block in (None, 1, 3, 8):                       # tiles that do and do not divide the sets
    got = sm.chamfer_matrix(a, b, block=block)
    assert got.shape == (5, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
  self_d = sm.chamfer_matrix(a, block=2)
  np.testing.assert_allclose(self_d, self_d.T, rtol=1e-6)
  assert np.all(np.diag(self_d) == 0.0)
  np.testing.assert_allclose(sm.chamfer_matrix(b, a), want.T, rtol=1e-5)
  assert sm.chamfer_matrix(a[:0], b).shape == (0, 7)


def test_chamfer_sharded_matches_unsharded():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'model': 1})
  a, b = _clouds(10, 32, 1), _clouds(5, 32, 2)
  np.testing.assert_allclose(sm.chamfer_matrix(a, b, block=4, mesh=mesh), sm.chamfer_matrix(a, b), rtol=1e-6)


def test_normalisation():
  clouds = _clouds(4, 100, 3) * np.array([3.0, 1.0, 0.5], np.float32) + np.array([1.0, -2.0, 0.3], np.float32)
  norm, scale = sm.normalize_clouds(clouds, 'shape_unit')
  np.testing.assert_allclose(norm.mean(1), 0.0, atol=1e-5)
  # One scalar per cloud: the unbiased std of its raw (uncentred) 3n coordinates.
  want = np.array([np.std(c.astype(np.float64).ravel(), ddof=1) for c in clouds])
  np.testing.assert_allclose(scale, want, rtol=1e-6)
  np.testing.assert_allclose(norm, (clouds - clouds.mean(1, keepdims=True)) / want[:, None, None], rtol=1e-5,
                             atol=1e-6)
  # Not translation invariant (HyperDiffusion's quirk): moving a cloud changes its scale.
  _, moved = sm.normalize_clouds(clouds + np.array([5.0, 0.0, 0.0], np.float32), 'shape_unit')
  assert np.all(moved > scale * 1.5)
  g, gs = sm.normalize_clouds(clouds, 'global')
  centred = clouds - clouds.mean(1, keepdims=True)
  np.testing.assert_allclose(gs, np.std(centred.astype(np.float64), ddof=1), rtol=1e-6)
  np.testing.assert_allclose(g.mean(1), 0.0, atol=1e-5)
  assert np.std(g.astype(np.float64), ddof=1) == pytest.approx(1.0, rel=1e-5)
  same, s1 = sm.normalize_clouds(clouds, 'none')
  np.testing.assert_array_equal(same, clouds)
  with pytest.raises(NfjaxError):
    sm.normalize_clouds(clouds, 'bbox')


def test_identical_sets():
  ref = _clouds(12, 64, 4)
  m = sm.set_metrics(ref, ref)
  assert m['mmd_cd'] == 0.0 and m['mmd_cd_x100'] == 0.0 and m['cov'] == 1.0
  # Every cloud's nearest neighbour is its twin in the other set: 1-NNA = 0 (copies), as in
  # PointFlow's knn; 0.5 is the score of an independent draw of the same distribution.
  assert m['1nna'] == 0.0 and m['num_gen'] == m['num_ref'] == 12


def test_same_distribution_and_disjoint_sets():
  ref, gen = _clouds(40, 64, 5), _clouds(40, 64, 6)
  m = sm.set_metrics(gen, ref)
  assert 0.3 <= m['1nna'] <= 0.7
  assert m['cov'] > 0.4
  far = _clouds(40, 64, 7, spread=0.2) * np.array([1.0, 1.0, 8.0], np.float32)   # needles vs blobs
  m2 = sm.set_metrics(far, ref)
  assert m2['1nna'] == 1.0
  assert m2['mmd_cd'] > 2 * m['mmd_cd'] and m2['mmd_cd_x100'] == pytest.approx(100 * m2['mmd_cd'])
  # The metrics agree with image_metrics on brute-force matrices.
  gn, _ = sm.normalize_clouds(gen, 'shape_unit')
  rn, _ = sm.normalize_clouds(ref, 'shape_unit')
  d_sr = np.array([[_brute_chamfer(x, y) for y in rn] for x in gn])
  assert m['mmd_cd'] == pytest.approx(d_sr.min(0).mean(), rel=1e-5)


def test_generated_count_and_matching():
  assert sm.generated_count(606) == 666 and sm.generated_count(10) == 11
  ref = _clouds(10, 32, 8)
  gen = _clouds(11, 32, 9)
  assert sm.set_metrics(gen, ref)['num_gen'] == 10                # truncated to N_ref
  with pytest.raises(NfjaxError, match='generated_count'):
    sm.set_metrics(gen[:9], ref)
  assert sm.set_metrics(gen[:9], ref, match_ref=False)['num_gen'] == 9


def test_sample_clouds_drops_empty_meshes():
  from nfjax.fields import meshing
  cube_v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float32) - 0.5
  cube_f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
  flat = (np.zeros((3, 3), np.float32), np.array([[0, 1, 2]]))    # zero area
  meshes = [meshing.empty_mesh(), (cube_v, cube_f), None, flat, (cube_v * 2, cube_f)]
  clouds, kept = sm.sample_clouds(meshes, n=256, seed=3)
  assert clouds.shape == (2, 256, 3) and clouds.dtype == np.float32
  np.testing.assert_array_equal(kept, [1, 4])
  assert np.allclose(np.abs(clouds[0]).max(1), 0.5, atol=1e-6)     # on the cube's surface
  alone, kept_alone = sm.sample_clouds([None] * 4 + meshes[4:], n=256, seed=3)   # per-mesh rng
  np.testing.assert_array_equal(kept_alone, [4])
  np.testing.assert_array_equal(alone[0], clouds[1])
  empty, kept = sm.sample_clouds([None], n=8)
  assert empty.shape == (0, 8, 3) and len(kept) == 0


def test_bootstrap_and_novelty():
  ref, gen = _clouds(20, 32, 10), _clouds(25, 32, 11)
  b = sm.bootstrap(gen, ref, size=8, rounds=5, seed=0)
  assert b['rounds'] == 5 and b['size'] == 8
  for k in ('mmd_cd_x100', 'cov', '1nna'):
    assert np.isfinite(b[k]) and b[k + '_std'] >= 0
  assert b == sm.bootstrap(gen, ref, size=8, rounds=5, seed=0)
  copies = ref[[3, 0, 7]] + 1e-4 * np.random.default_rng(0).normal(size=(3, 32, 3)).astype(np.float32)
  dist, idx = sm.nearest_training(np.concatenate([copies, gen[:2]]), ref)
  np.testing.assert_array_equal(idx[:3], [3, 0, 7])
  assert np.all(dist[:3] < 1e-5) and np.all(dist[3:] > 1e-3)


def test_fpd():
  value, reason = sm.fpd(_clouds(4, 16, 0), _clouds(4, 16, 1))
  assert value is None and reason == sm.FPD_NOT_COMPUTED
  with pytest.raises(NfjaxError, match="'/x/best_model.pth' do not exist"):
    sm.fpd(_clouds(4, 16, 0), _clouds(4, 16, 1), pointnet_weights='/x/best_model.pth')
  f = np.random.default_rng(0).normal(size=(200, 8))
  assert sm.fpd_from_features(f, f) == pytest.approx(0.0, abs=1e-6)
  assert sm.fpd_from_features(f, f + 1.0) == pytest.approx(8.0, rel=1e-6)
