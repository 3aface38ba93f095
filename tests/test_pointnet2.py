"""PointNet++ SSG in JAX (FPD's feature extractor) against a direct NumPy transcription of the
PyTorch model's inference, checkpoint checks, and FPD through the shape metrics."""

from __future__ import annotations

import numpy as np
import pytest

from nfjax.errors import DataError
from nfjax.evaluate import pointnet2


# A loop-by-loop NumPy version of the reference network, in its [channels, neighbours, centres]
# layout with explicit (unfolded) BatchNorm, in float64 after the float32 sampling steps.

def _fps(xyz, num, start):
  dist = np.full(len(xyz), 1e10, np.float32)
  far, out = int(start), []
  for _ in range(num):
    out.append(far)
    d = ((xyz - xyz[far]) ** 2).sum(-1)
    dist = np.where(d < dist, d, dist)
    far = int(np.argmax(dist))
  return np.array(out)


def _ball(xyz, centres, radius, nsample):
  groups = []
  for c in centres:
    sq = (c ** 2).sum() + (xyz ** 2).sum(-1) - 2.0 * (xyz @ c)
    order = np.where(sq > radius ** 2, len(xyz), np.arange(len(xyz)))
    idx = np.sort(order)[:nsample]
    idx[idx == len(xyz)] = idx[0]
    groups.append(idx)
  return np.array(groups)


def _conv_bn_relu(sd, conv, bn, x):
  """x [C_in, ...] -> relu(BN(W x + b)) [C_out, ...]."""
  w = sd[f'{conv}.weight'].astype(np.float64).reshape(sd[f'{conv}.weight'].shape[0], -1)
  y = np.tensordot(w, x, axes=(1, 0)) + sd[f'{conv}.bias'][(...,) + (None,) * (x.ndim - 1)]
  shape = (-1,) + (1,) * (x.ndim - 1)
  y = (y - sd[f'{bn}.running_mean'].reshape(shape)) / np.sqrt(sd[f'{bn}.running_var'].reshape(shape) + 1e-5)
  return np.maximum(y * sd[f'{bn}.weight'].reshape(shape) + sd[f'{bn}.bias'].reshape(shape), 0.0)


def _reference(sd, cloud, starts):
  xyz, feats = cloud.astype(np.float32), None          # feats [C, N]
  for level, (num, radius, nsample, widths) in enumerate(pointnet2.SSG_LEVELS, start=1):
    if num is None:
      x = xyz.T.astype(np.float64)[:, :, None]          # [3, N, 1]: absolute xyz, then features
      if feats is not None:
        x = np.concatenate([x, feats[:, :, None]], 0)
    else:
      centres = xyz[_fps(xyz, num, starts[level - 1])]
      idx = _ball(xyz, centres, radius, nsample)         # [S, K]
      rel = (xyz[idx] - centres[:, None, :]).astype(np.float64)   # [S, K, 3]
      x = rel.transpose(2, 1, 0)                        # [3, K, S]
      if feats is not None:
        x = np.concatenate([x, feats[:, idx].transpose(0, 2, 1)], 0)
    for j in range(len(widths)):
      x = _conv_bn_relu(sd, f'sa{level}.mlp_convs.{j}', f'sa{level}.mlp_bns.{j}', x)
    feats = x.max(1)                                    # [C, S]
    if num is not None:
      xyz = centres
  h = feats[:, 0]
  for i in (1, 2):
    h = _conv_bn_relu(sd, f'fc{i}', f'bn{i}', h[:, None])[:, 0]
  return h, sd['fc3.weight'].astype(np.float64) @ h + sd['fc3.bias']


def _clouds(n, points, seed):
  """Noisy ellipsoid shells with unit-ish spread, like 'shape_unit'-normalised clouds."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(n, points, 3))
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  axes = rng.uniform(0.6, 1.6, size=(n, 1, 3))
  return (d * axes + 0.03 * rng.normal(size=d.shape)).astype(np.float32)


def test_matches_the_reference_network_features_and_logits():
  sd = pointnet2.random_state_dict(0)
  params = pointnet2.params_from_state_dict(sd)
  clouds = _clouds(3, 600, 1)
  starts = np.array([[5, 0], [17, 300], [599, 511]], np.int32)
  feats, logits = pointnet2.apply(params, clouds, batch=2, starts=starts)   # 2 + a padded batch of 1
  assert feats.shape == (3, pointnet2.FEATURE_DIM) and logits.shape == (3, 40)
  for i in range(3):
    f, lg = _reference(sd, clouds[i], starts[i])
    np.testing.assert_allclose(feats[i], f, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(logits[i], lg, rtol=2e-4, atol=2e-5)
  assert np.abs(feats).max() > 1e-3 and (feats > 0).mean() > 0.1      # not a dead network
  # Other starts give other centres, hence (slightly) other features; seeded starts repeat.
  f2, _ = pointnet2.apply(params, clouds, starts=starts[::-1].copy())
  assert not np.allclose(f2[0], feats[0])
  np.testing.assert_array_equal(pointnet2.features(params, clouds, seed=3), pointnet2.features(params, clouds, seed=3))


def test_small_clouds_and_grouping():
  import jax.numpy as jnp
  xyz = jnp.asarray(np.array([[0, 0, 0], [1, 0, 0], [0.1, 0, 0], [0, 0.15, 0], [3, 3, 3]], np.float32))
  idx = np.asarray(pointnet2.ball_query(xyz, xyz[:2], 0.2, 3))
  np.testing.assert_array_equal(idx, [[0, 2, 3], [1, 1, 1]])     # lowest indices in radius, padded with the first
  np.testing.assert_array_equal(np.asarray(pointnet2.farthest_point_sample(xyz, 3, jnp.int32(0))), [0, 4, 1])
  # Fewer points than centres and neighbours (the reference repeats points): still defined.
  params = pointnet2.params_from_state_dict(pointnet2.random_state_dict(1))
  f = pointnet2.features(params, _clouds(2, 40, 2))
  assert f.shape == (2, 256) and np.isfinite(f).all()


def test_checkpoint_checks_and_npz(tmp_path):
  sd = pointnet2.random_state_dict(2)
  with pytest.raises(DataError, match=r'1 missing \(sa2.mlp_convs.1.weight\)'):
    pointnet2.params_from_state_dict({k: v for k, v in sd.items() if k != 'sa2.mlp_convs.1.weight'})
  bad = dict(sd, **{'fc1.weight': np.zeros((512, 1027), np.float32)})
  with pytest.raises(DataError, match=r'fc1.weight \(512, 1027\) \(expected \(512, 1024\)\)'):
    pointnet2.params_from_state_dict(bad)
  with pytest.raises(DataError, match='non-finite'):
    pointnet2.params_from_state_dict(dict(sd, **{'bn2.running_var': np.full(256, np.nan, np.float32)}))
  with pytest.raises(DataError, match='do not exist'):
    pointnet2.load(str(tmp_path / 'nope.pth'))
  # DataParallel names in an .npz; no classifier layer (features only).
  path = tmp_path / 'pn.npz'
  np.savez(path, **{'module.' + k: v for k, v in sd.items() if not k.startswith('fc3')})
  params = pointnet2.load(str(path))
  assert params.logits is None
  clouds = _clouds(2, 300, 3)
  feats, logits = pointnet2.apply(params, clouds)
  assert logits is None
  np.testing.assert_allclose(feats, pointnet2.features(pointnet2.params_from_state_dict(sd), clouds), rtol=1e-6)


def test_fpd_of_clouds(tmp_path):
  from nfjax.evaluate import shape_metrics as sm
  path = str(tmp_path / 'pn.npz')
  np.savez(path, **pointnet2.random_state_dict(3))
  a, b = _clouds(12, 256, 4), _clouds(12, 256, 5)
  same, note = sm.fpd(a, a.copy(), path)
  assert same == pytest.approx(0.0, abs=1e-3) and 'PointNet++' in note
  other, _ = sm.fpd(a, b, path)
  flat = a.copy()
  flat[..., 2] *= 0.05                                # squashed shapes: far in feature space
  squashed, _ = sm.fpd(flat, b, path)
  assert 0.0 < other < squashed
  assert sm.fpd(a, b) == (None, sm.FPD_NOT_COMPUTED)


def test_torch_checkpoint_when_torch_is_installed(tmp_path):
  """The real file format (torch.save of a training-script dict), where torch is at hand."""
  torch = pytest.importorskip('torch')
  sd = pointnet2.random_state_dict(4)
  state = {'epoch': 7, 'instance_acc': 0.92,
           'model_state_dict': {k: torch.from_numpy(v) for k, v in sd.items()}}
  state['model_state_dict']['bn1.num_batches_tracked'] = torch.tensor(100)
  path = str(tmp_path / 'best_model.pth')
  torch.save(state, path)
  clouds = _clouds(2, 300, 6)
  np.testing.assert_allclose(pointnet2.features(pointnet2.load(path), clouds),
                             pointnet2.features(pointnet2.params_from_state_dict(sd), clouds), rtol=1e-6)
