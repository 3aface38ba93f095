"""Meshing (grid, marching cubes, files) and the headless mesh renderer."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nfjax import sharding
from nfjax.errors import ConfigError
from nfjax.fields import meshing, mlp
from nfjax.utils import render3d

CENTRE = np.array([0.11, -0.07, 0.05])
RADIUS = 0.25


def _grid_points(r):
  ax = meshing.grid_coords(r)
  return np.stack(np.meshgrid(ax, ax, ax, indexing='ij'), -1)        # [R, R, R, 3]


def _sphere_sdf(points, centre=CENTRE, radius=RADIUS):
  return np.linalg.norm(np.asarray(points, np.float64) - centre, axis=-1) - radius


def _face_normals(v, f):
  t = np.asarray(v, np.float64)[f]
  return np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), t.mean(1)


def _surface_centroid(v, f):
  """Area-weighted centroid of the surface (exact for a sphere; the vertex mean is not)."""
  n, c = _face_normals(v, f)
  a = np.linalg.norm(n, axis=1)
  return (c * a[:, None]).sum(0) / a.sum()


def _sphere_field(centre=CENTRE, radius=RADIUS, f=0.5, sign=1.0):
  """An exact 9-parameter MLP whose zero level is (to < 0.1%) the sphere |x - c| = r.

  hidden = relu(sum_axes (2/f^2)(1 - cos(f (x - c))) + 1), value = sign * (hidden - 1 - r^2);
  1 - cos(f(x - c)) is linear in the sin / cos features. sign=+1: signed distance-like (negative
  inside), sign=-1: occupancy-like (positive inside).
  """
  spec = mlp.FieldSpec(in_dims=3, freqs=(f,), include_input=False, hidden=(1,), activation='relu')
  k = 2.0 / f ** 2
  w0 = np.concatenate([-k * np.sin(f * centre), -k * np.cos(f * centre)])
  flat = np.concatenate([w0, [3 * k + 1.0], [sign], [-sign * (1.0 + radius ** 2)]]).astype(np.float32)
  assert flat.size == spec.num_params
  return spec, flat


def test_grid_coords_is_linspace():
  ax = meshing.grid_coords(33)
  np.testing.assert_array_equal(ax, np.linspace(-0.5, 0.5, 33).astype(np.float32))
  np.testing.assert_allclose(np.diff(ax), 1 / 32, atol=1e-7)
  np.testing.assert_allclose(meshing.index_to_coords(np.array([[0, 16, 32]]), 33), [[-0.5, 0.0, 0.5]])
  with pytest.raises(ConfigError):
    meshing.grid_coords(1)


def test_sphere_volume_meshes_centred_with_outward_normals():
  r = 48
  voxel = 1.0 / (r - 1)
  sdf = _sphere_sdf(_grid_points(r))
  for vol, inside in ((sdf, 'below'), (-sdf, 'above')):
    v, f = meshing.marching_cubes(vol, 0.0, inside)
    assert v.dtype == np.float32 and f.dtype == np.int32 and len(f) > 1000
    dist = np.linalg.norm(v - CENTRE, axis=1)
    assert np.abs(dist - RADIUS).max() < 0.02 * voxel
    # The shear test: the surface centroid sits on the centre to a small fraction of a voxel.
    assert np.abs(_surface_centroid(v, f) - CENTRE).max() < 0.01 * voxel
    n, c = _face_normals(v, f)
    assert np.all(np.sum(n * (c - CENTRE), 1) > 0), f"inward faces for inside={inside}"

  # NeF-GPT's / HyperDiffusion's sheared sampling of the same lattice is caught by this test.
  n_ = r
  a, b, c = np.meshgrid(np.arange(r), np.arange(r), np.arange(r), indexing='ij')
  sheared = np.stack([a + b / n_ + c / n_ ** 2, b + c / n_, c], -1) * voxel - 0.5
  v, f = meshing.marching_cubes(_sphere_sdf(sheared), 0.0, 'below')
  assert np.abs(_surface_centroid(v, f) - CENTRE).max() > 0.3 * voxel


def test_sphere_field_meshes_centred_with_right_radius():
  r = 40
  voxel = 1.0 / (r - 1)
  for sign, loss in ((1.0, 'mse'), (-1.0, 'bce')):
    spec, w = _sphere_field(sign=sign)
    level = meshing.level_for(spec, loss)
    inside = meshing.inside_for(spec, loss)
    assert level == 0.0 and inside == ('below' if sign > 0 else 'above')
    (v, f), = meshing.mesh_fields(spec, w[None], r, level, inside, chunk=4096)
    assert np.abs(_surface_centroid(v, f) - CENTRE).max() < 0.01 * voxel
    dist = np.linalg.norm(v - CENTRE, axis=1)
    assert abs(dist.mean() - RADIUS) < 0.002 * RADIUS
    n, c = _face_normals(v, f)
    assert np.all(np.sum(n * (c - CENTRE), 1) > 0)


def test_eval_grid_matches_apply_any_chunking():
  spec = mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0), include_input=True, hidden=(16, 16), activation='gelu',
                       output_bias=False, output_activation='tanh', init='torch_default')
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  w = np.stack([np.asarray(mlp.flatten(spec, mlp.init(spec, k))) for k in keys])
  r = 13                                                  # 2197 points: no chunk below divides it
  pts = jnp.asarray(_grid_points(r).reshape(-1, 3))
  want = np.stack([np.asarray(mlp.apply(spec, mlp.unflatten(spec, jnp.asarray(x)), pts))[:, 0] for x in w])
  want = want.reshape(3, r, r, r)
  # 2 fields per call (last call padded), 100-point chunks, 4 chunks per call (last call partial).
  got = meshing.eval_grid(spec, w, r, batch=2, chunk=100, steps=4)
  assert got.shape == (3, r, r, r) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(meshing.eval_grid(spec, w, r), got, atol=2e-6)
  raw = meshing.eval_grid(spec, w[:1], r, raw=True, chunk=512)
  np.testing.assert_allclose(np.tanh(raw), got[:1], atol=2e-6)


def test_eval_grid_layout_is_x_y_z():
  # Three fields whose value is x, y and z: volume[b, i, j, k] must be grid_coords[(i, j, k)[b]].
  spec = mlp.FieldSpec(in_dims=3, freqs=(), include_input=True, hidden=(1,), activation='relu')
  w = np.stack([np.concatenate([np.eye(3)[a], [1.0, 1.0, -1.0]]) for a in range(3)]).astype(np.float32)
  r = 11
  vol = meshing.eval_grid(spec, w, r, chunk=64, steps=3)
  ax = meshing.grid_coords(r)
  np.testing.assert_allclose(vol[0], np.broadcast_to(ax[:, None, None], (r,) * 3), atol=1e-6)
  np.testing.assert_allclose(vol[1], np.broadcast_to(ax[None, :, None], (r,) * 3), atol=1e-6)
  np.testing.assert_allclose(vol[2], np.broadcast_to(ax[None, None, :], (r,) * 3), atol=1e-6)


def test_eval_grid_sharded_matches_unsharded():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'model': 1})
  spec = mlp.FieldSpec(in_dims=3, freqs=(1.0,), include_input=True, hidden=(8,), activation='relu')
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  w = np.stack([np.asarray(mlp.flatten(spec, mlp.init(spec, k))) for k in keys])
  a = meshing.eval_grid(spec, w, 9, chunk=128)
  b = meshing.eval_grid(spec, w, 9, chunk=128, mesh=mesh)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_empty_and_bad_volumes():
  v, f = meshing.marching_cubes(np.ones((8, 8, 8), np.float32), 0.0)
  assert v.shape == (0, 3) and f.shape == (0, 3) and v.dtype == np.float32 and f.dtype == np.int32
  v, f = meshing.marching_cubes(np.full((8, 8, 8), np.nan, np.float32), 0.0)
  assert len(v) == 0 and len(f) == 0
  vol = _sphere_sdf(_grid_points(16)).astype(np.float32)
  vol[0, 0, 0] = np.nan                                   # non-finite values count as outside
  v, f = meshing.marching_cubes(vol, 0.0, 'below')
  assert len(f) > 100 and np.all(np.isfinite(v))
  with pytest.raises(ConfigError):
    meshing.marching_cubes(vol, 0.0, 'inside')
  spec = mlp.FieldSpec(in_dims=3, hidden=(4,))
  meshes = meshing.mesh_fields(spec, np.zeros((2, spec.num_params), np.float32), 8, 0.0)   # constant 0
  assert len(meshes) == 2 and all(len(v) == 0 and len(f) == 0 for v, f in meshes)


def test_levels():
  logit = mlp.FieldSpec(in_dims=3, hidden=(4,))
  tanh = mlp.FieldSpec(in_dims=3, hidden=(4,), output_activation='tanh', output_bias=False)
  sig = mlp.FieldSpec(in_dims=3, hidden=(4,), output_activation='sigmoid')
  assert meshing.level_for(logit, 'bce') == 0.0
  assert meshing.level_for(logit, 'bce', occupancy=0.8) == pytest.approx(meshing.HYPERDIFFUSION_TEST_LEVEL, abs=3e-4)
  assert meshing.level_for(sig, 'bce', occupancy=0.8) == pytest.approx(0.8, abs=1e-6)
  assert meshing.level_for(tanh, 'mse') == 0.0 and meshing.inside_for(tanh, 'mse') == 'below'
  assert meshing.level_for(sig, 'mse') == 0.5 and meshing.inside_for(sig, 'mse') == 'above'
  assert meshing.inside_for(logit, 'bce') == 'above'
  # With the fit stage's data.label: occupancy targets regressed without a sigmoid.
  assert meshing.level_for(logit, 'mse', label='occupancy') == 0.5
  assert meshing.inside_for(logit, 'l1', label='occupancy') == 'above'
  assert meshing.level_for(tanh, 'mse', label='pm1') == 0.0 and meshing.inside_for(tanh, 'mse', label='sdf') == 'below'
  with pytest.raises(ConfigError):
    meshing.inside_for(logit, 'mse', label='winding')
  with pytest.raises(ConfigError):
    meshing.level_for(logit, 'hinge')
  with pytest.raises(ConfigError):
    meshing.eval_grid(mlp.FieldSpec(in_dims=2), np.zeros((1, mlp.FieldSpec(in_dims=2).num_params)), 8)


def _parse_obj(text):
  v = [list(map(float, l.split()[1:])) for l in text.splitlines() if l.startswith('v ')]
  f = [list(map(int, l.split()[1:])) for l in text.splitlines() if l.startswith('f ')]
  return np.array(v, np.float32).reshape(-1, 3), np.array(f, np.int64).reshape(-1, 3) - 1


def _parse_ply(data):
  end = data.index(b'end_header\n') + len(b'end_header\n')
  header = data[:end].decode().splitlines()
  assert header[1] == 'format binary_little_endian 1.0'
  nv = int(next(l for l in header if l.startswith('element vertex')).split()[-1])
  nf = int(next(l for l in header if l.startswith('element face')).split()[-1])
  v = np.frombuffer(data, '<f4', nv * 3, end).reshape(nv, 3)
  rec = np.frombuffer(data, [('n', 'u1'), ('idx', '<i4', (3,))], nf, end + nv * 12)
  assert np.all(rec['n'] == 3) and end + nv * 12 + nf * 13 == len(data)
  return v, rec['idx']


def test_obj_ply_round_trip(tmp_path):
  v, f = meshing.marching_cubes(_sphere_sdf(_grid_points(12)), 0.0, 'below')
  meshing.write_obj(str(tmp_path / 'a.obj'), v, f)
  meshing.write_ply(str(tmp_path / 'a.ply'), v, f)
  vo, fo = _parse_obj((tmp_path / 'a.obj').read_text())
  np.testing.assert_array_equal(vo, v)                      # %.9g: float32 exact
  np.testing.assert_array_equal(fo, f)
  vp, fp = _parse_ply((tmp_path / 'a.ply').read_bytes())
  np.testing.assert_array_equal(vp, v)
  np.testing.assert_array_equal(fp, f)
  trimesh = pytest.importorskip('trimesh')
  m = trimesh.load(str(tmp_path / 'a.ply'), process=False)
  np.testing.assert_allclose(m.vertices, v, atol=1e-7)
  np.testing.assert_array_equal(m.faces, f)
  assert m.is_watertight and m.volume > 0                # outward winding: positive volume
  # An empty mesh is a valid file too.
  paths = meshing.write_meshes(str(tmp_path / 'm'), [meshing.empty_mesh(), (v, f)], fmt='ply')
  assert _parse_ply(open(paths[0], 'rb').read())[0].shape == (0, 3)


def _sphere_mesh(r=40, radius=0.3):
  return meshing.marching_cubes(np.linalg.norm(_grid_points(r), axis=-1) - radius, 0.0, 'below')


def test_render_sphere_silhouette_is_round():
  v, f = _sphere_mesh()
  size, extent, radius = 128, 0.5, 0.3
  img = render3d.render_mesh(v, f, size=size, extent=extent, supersample=1, azimuth=37, elevation=25)
  assert img.shape == (size, size) and img.dtype == np.uint8
  hit = img != 255
  rp = radius / extent * size / 2
  assert abs(hit.sum() / (np.pi * rp ** 2) - 1.0) < 0.03
  rows, cols = np.nonzero(hit)
  assert abs((rows.max() - rows.min() + 1) - 2 * rp) <= 2 and abs((cols.max() - cols.min() + 1) - 2 * rp) <= 2
  assert abs(rows.mean() - size / 2 + 0.5) < 0.5 and abs(cols.mean() - size / 2 + 0.5) < 0.5
  assert img[hit].std() > 10                              # shaded, not a flat disc
  # Lit from the upper left: that side is brighter than the lower right.
  q = size // 4
  assert img[size // 2 - q // 2, size // 2 - q // 2] > img[size // 2 + q // 2, size // 2 + q // 2]


def test_render_empty_grid_and_gif(tmp_path):
  assert np.all(render3d.render_mesh(np.zeros((0, 3)), np.zeros((0, 3), int), size=32) == 255)
  v, f = _sphere_mesh(20)
  render3d.mesh_grid_png(str(tmp_path / 'g.png'), [[(v, f), meshing.empty_mesh()], [None, (v * 0.5, f)]],
                         row_labels=['a', 'b'], col_labels=['1', '2'], size=48)
  g = Image.open(tmp_path / 'g.png')
  assert g.size == (90 + 2 * 50 + 2, 14 + 2 * 50 + 2)
  render3d.turntable_gif(str(tmp_path / 't.gif'), v, f, frames=6, size=32)
  gif = Image.open(io.BytesIO((tmp_path / 't.gif').read_bytes()))
  assert gif.n_frames == 6
