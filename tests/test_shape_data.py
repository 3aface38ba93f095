"""Shape data: winding numbers and distances, mesh files and layouts, the procedural family, the
cached shape source."""

import collections
import os

import ml_collections
import numpy as np
import pytest

from nfjax import geometry
from nfjax.data import meshes as mesh_io
from nfjax.data import procedural, shapes
from nfjax.errors import ConfigError, DataError

CUBE_V = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], np.float32) - 0.5
CUBE_OBJ = """# unit cube, quads
v -0.5 -0.5 -0.5
v 0.5 -0.5 -0.5
v -0.5 0.5 -0.5
v 0.5 0.5 -0.5
v -0.5 -0.5 0.5
v 0.5 -0.5 0.5
v -0.5 0.5 0.5
v 0.5 0.5 0.5
f 1 5 7 3
f 2 4 8 6
f 1 2 6 5
f 3 7 8 4
f 1 3 4 2
f 5 6 8 7
"""
CUBE_QUADS = ((0, 4, 6, 2), (1, 3, 7, 5), (0, 1, 5, 4), (2, 6, 7, 3), (0, 2, 3, 1), (4, 5, 7, 6))


def _vertex_lines():
  return '\n'.join(f"{x} {y} {z}" for x, y, z in CUBE_V)


def _write_cube(path):
  ext = os.path.splitext(path)[1]
  if ext == '.obj':
    text = CUBE_OBJ
  elif ext == '.off':
    text = "OFF\n8 6 0\n" + _vertex_lines() + '\n' + '\n'.join('4 ' + ' '.join(map(str, q)) for q in CUBE_QUADS) + '\n'
  else:
    text = ("ply\nformat ascii 1.0\nelement vertex 8\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 6\nproperty list uchar int vertex_indices\nend_header\n" + _vertex_lines() + '\n'
            + '\n'.join('4 ' + ' '.join(map(str, q)) for q in CUBE_QUADS) + '\n')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def _icosphere(radius=0.4, subdivisions=2):
  import trimesh
  m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
  return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int32)


def _write_obj(path, v, f):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as fh:
    fh.write(''.join(f"v {a} {b} {c}\n" for a, b, c in v) + ''.join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in f))


def _directions(n, seed=0):
  d = np.random.default_rng(seed).normal(size=(n, 3))
  return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def _config(**data):
  d = dict(source='procedural', mesh_dir='', synsets=(), split_file='', num_fields=6, normalize='mean',
           num_uniform=1000, num_surface=1000, surface_sigma=0.01, label='occupancy', num_heldout=500,
           cache_chunk=4)
  d.update(data)
  return ml_collections.ConfigDict({'seed': 0, 'data': d})


def _closed_and_consistent(f):
  """Every directed edge appears once and its reverse once: closed, consistently oriented."""
  edges = collections.Counter((int(a), int(b)) for t in f for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
  return all(n == 1 and edges.get((b, a), 0) == 1 for (a, b), n in edges.items())


# ---------------------------------------------------------------------------------------------
# Geometry.

def test_sphere_winding_occupancy_and_sdf():
  r = 0.4
  v, f = _icosphere(r)
  d = _directions(200)
  inner, outer = d * 0.5 * r, d * 1.5 * r
  pts = np.concatenate([inner, outer])
  wn = geometry.winding_number(pts, v, f)
  np.testing.assert_allclose(wn[:200], 1.0, atol=1e-3)
  np.testing.assert_allclose(wn[200:], 0.0, atol=1e-3)
  occ = geometry.occupancy(pts, v, f)
  assert occ[:200].all() and not occ[200:].any()
  sdf = geometry.signed_distance(pts, v, f)
  # The icosphere is inscribed in the sphere; its faces lie at most ~1.5% of r inside it.
  np.testing.assert_allclose(sdf, np.linalg.norm(pts, axis=1) - r, atol=0.02 * r)
  assert (sdf[:200] < 0).all() and (sdf[200:] > 0).all()
  np.testing.assert_allclose(geometry.unsigned_distance(pts, v, f), np.abs(sdf), rtol=1e-6)
  # Blocks of several faces (the accelerator layout; 7 does not divide 320) and small point chunks
  # give the same answers as the CPU default of one face per step.
  np.testing.assert_allclose(geometry.winding_number(pts, v, f, chunk=128, face_chunk=7), wn, atol=1e-5)
  np.testing.assert_allclose(geometry.unsigned_distance(pts, v, f, chunk=128, face_chunk=7), np.abs(sdf),
                             rtol=1e-6)


def test_winding_number_overlaps_and_open_meshes():
  a = procedural.box((0, 0, 0), (0.4, 0.4, 0.4))
  b = procedural.box((0.15, 0, 0), (0.4, 0.4, 0.4))
  v, f = procedural.combine([a, b])
  wn = geometry.winding_number(np.array([[0.1, 0, 0], [-0.15, 0, 0], [0.3, 0, 0], [0.45, 0, 0]]), v, f)
  np.testing.assert_allclose(wn, [2.0, 1.0, 1.0, 0.0], atol=1e-4)  # union: > 0.5 everywhere inside
  # A sphere with a few faces removed still reads as inside near its centre.
  sv, sf = _icosphere()
  wn = geometry.winding_number(np.zeros((1, 3)), sv, sf[10:])
  assert 0.9 < wn[0] < 1.0


def test_point_triangle_distance_regions():
  v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
  f = np.array([[0, 1, 2]])
  cases = {  # point: exact distance
      (0.2, 0.2, 0.5): 0.5,                  # face interior (above)
      (0.25, 0.25, -0.3): 0.3,               # face interior (below)
      (-1.0, -1.0, 0.0): np.sqrt(2),         # vertex a
      (2.0, -1.0, 0.0): np.sqrt(2),          # vertex b
      (-0.5, 2.0, 0.5): np.sqrt(1.5),        # vertex c
      (0.5, -1.0, 1.0): np.sqrt(2),          # edge ab
      (1.0, 1.0, 0.0): np.sqrt(0.5),         # edge bc
      (-1.0, 0.5, 0.0): 1.0,                 # edge ca
      (0.3, 0.3, 0.0): 0.0,                  # on the face
  }
  pts = np.array(list(cases), np.float32)
  np.testing.assert_allclose(geometry.unsigned_distance(pts, v, f), list(cases.values()), atol=1e-6)
  # A degenerate (collinear) triangle measures as its segment, never closer.
  dv = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], np.float32)
  d = geometry.unsigned_distance(np.array([[1, 1, 0], [3, 0, 0], [1, 0, 1]], np.float32), dv, f)
  np.testing.assert_allclose(d, [1, 1, 1], atol=1e-6)
  # Chunking and padding: many points, fewer than one chunk or several chunks, same answers.
  p = np.random.default_rng(0).uniform(-2, 2, (3000, 3)).astype(np.float32)
  np.testing.assert_allclose(geometry.unsigned_distance(p, v, f, chunk=1024),
                             geometry.unsigned_distance(p, v, f), rtol=1e-6)


def test_normalize_modes():
  v = np.random.default_rng(0).uniform(-3, 5, (50, 3)).astype(np.float32) * [1, 2, 0.5]
  m = mesh_io.normalize(v, 'mean')
  np.testing.assert_allclose(m.mean(0), 0, atol=1e-6)
  assert np.abs(m).max() == pytest.approx(0.475, rel=1e-6)
  b = mesh_io.normalize(v, 'bbox', extent=0.5)
  np.testing.assert_allclose(b.min(0) + b.max(0), 0, atol=1e-6)
  assert np.abs(b).max() == pytest.approx(0.5, rel=1e-6)
  with pytest.raises(ValueError):
    mesh_io.normalize(v, 'unit')


# ---------------------------------------------------------------------------------------------
# Mesh files and layouts.

@pytest.mark.parametrize('ext', ['.obj', '.ply', '.off'])
def test_load_cube_formats(tmp_path, ext):
  path = str(tmp_path / f"cube{ext}")
  _write_cube(path)
  v, f = mesh_io.load_mesh(path)
  assert v.dtype == np.float32 and f.dtype == np.int32
  assert v.shape == (8, 3) and f.shape == (12, 3)
  assert geometry.signed_volume(v, f) == pytest.approx(1.0, rel=1e-6)
  wn = geometry.winding_number(np.array([[0, 0, 0], [0.9, 0, 0]]), v, f)
  np.testing.assert_allclose(wn, [1, 0], atol=1e-5)


def test_bad_mesh_files(tmp_path):
  (tmp_path / 'empty.obj').write_text('')
  (tmp_path / 'nofaces.obj').write_text('v 0 0 0\nv 1 0 0\nv 0 1 0\n')
  (tmp_path / 'nan.obj').write_text('v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n')
  (tmp_path / 'garbage.ply').write_bytes(b'ply\nformat binary_little_endian 1.0\nelement vertex 99\n\x00\x01')
  for name in ('empty.obj', 'nofaces.obj', 'nan.obj', 'garbage.ply', 'missing.off'):
    with pytest.raises(mesh_io.MeshError, match=name.split('.')[0]):
      mesh_io.load_mesh(str(tmp_path / name))
  assert issubclass(mesh_io.MeshError, DataError)


def test_corrupt_and_empty_meshes_are_skipped(tmp_path):
  root = tmp_path / 'meshes'
  for name in ('a.obj', 'b.off', 'd.ply'):
    _write_cube(str(root / name))
  (root / 'c_empty.obj').write_text('')
  (root / 'e_corrupt.off').write_text('OFF\n8 6 0\n0 0 oops\n')
  data = shapes.load(_config(source='meshes', mesh_dir=str(root), num_fields=-1))
  assert data.names == ['a', 'b', 'd']
  assert [s['name'] for s in data.skipped] == ['c_empty', 'e_corrupt']
  assert all('empty' in s['reason'] or 'e_corrupt.off' in s['reason'] for s in data.skipped)
  np.testing.assert_array_equal(data.source_index, [0, 1, 3])
  assert data.points.shape == (3, 2000, 3) and data.values.shape == (3, 2000)
  # Cube normalised by its mean: |x| <= 0.475 inside, so the occupancy is exact up to float16.
  inside = (np.abs(data.points) < 0.475 - 1e-3).all(-1)
  outside = (np.abs(data.points) > 0.475 + 1e-3).any(-1)
  assert (data.values[inside] == 1).all() and (data.values[outside] == 0).all()
  (root / 'a.obj').write_text('')
  (root / 'b.off').write_text('')
  (root / 'd.ply').write_text('')
  with pytest.raises(DataError, match='no usable shape'):
    shapes.load(_config(source='meshes', mesh_dir=str(root), num_fields=-1))


def test_shapenet_layout_and_split_files(tmp_path):
  root = tmp_path / 'ShapeNetCore'
  for model in ('p1', 'p2', 'p3'):
    _write_cube(str(root / '02691156' / model / 'models' / 'model_normalized.obj'))
  for model in ('c1', 'c2'):
    _write_cube(str(root / '03001627' / model / 'model.obj'))
  (root / '03001627' / 'notes').mkdir()  # a folder without a model is ignored
  (root / 'taxonomy.json').write_text('{}')
  entries = mesh_io.find_meshes(str(root))
  assert [(e.synset, e.model_id, e.label) for e in entries] == [
      ('02691156', 'p1', 0), ('02691156', 'p2', 0), ('02691156', 'p3', 0), ('03001627', 'c1', 1),
      ('03001627', 'c2', 1)]
  assert entries[0].path.endswith(os.path.join('p1', 'models', 'model_normalized.obj'))
  assert entries[0].name == '02691156/p1'
  chairs_first = mesh_io.find_meshes(str(root), synsets=('chair', 'airplane'))
  assert [(e.model_id, e.label) for e in chairs_first][:3] == [('c1', 0), ('c2', 0), ('p1', 1)]
  lst = tmp_path / 'train_split.lst'
  lst.write_text('p1\np3.obj\n03001627/c2\nunknown\n')
  assert [e.model_id for e in mesh_io.find_meshes(str(root), split_file=str(lst))] == ['p1', 'p3', 'c2']
  csv_file = tmp_path / 'all.csv'
  csv_file.write_text('id,synsetId,subSynsetId,modelId,split\n1,02691156,x,p2,train\n2,03001627,y,c1,test\n')
  assert [e.model_id for e in mesh_io.find_meshes(str(root), split_file=str(csv_file))] == ['p2', 'c1']
  headerless = tmp_path / 'ids.csv'
  headerless.write_text('0,p3\n1,c1\n')
  assert [e.model_id for e in mesh_io.find_meshes(str(root), split_file=str(headerless))] == ['p3', 'c1']
  # A flat directory and a directory of class folders.
  flat = tmp_path / 'flat'
  _write_cube(str(flat / 'x.obj'))
  _write_cube(str(flat / 'y.OFF'))
  assert [(e.model_id, e.label, e.synset) for e in mesh_io.find_meshes(str(flat))] == [('x', 0, ''), ('y', 0, '')]
  data = shapes.load(_config(source='meshes', mesh_dir=str(root), synsets=('02691156',), num_fields=2,
                             split_file=str(lst)))
  assert data.names == ['02691156/p1', '02691156/p3'] and data.class_names == ['airplane']
  v, f = data.meshes[1]
  assert np.abs(v).max() == pytest.approx(0.475) and len(f) == 12


def test_layout_errors(tmp_path):
  with pytest.raises(DataError, match='not a directory'):
    mesh_io.find_meshes(str(tmp_path / 'nope'))
  (tmp_path / 'readme.txt').write_text('hi')
  with pytest.raises(DataError, match=r'\.obj/\.ply/\.off'):
    mesh_io.find_meshes(str(tmp_path))
  _write_cube(str(tmp_path / 'cls' / 'a.obj'))
  with pytest.raises(DataError, match='lamp'):
    mesh_io.find_meshes(str(tmp_path), synsets=('lamp',))
  split = tmp_path / 'split.lst'
  split.write_text('zzz\n')
  with pytest.raises(DataError, match='keeps none'):
    mesh_io.find_meshes(str(tmp_path), split_file=str(split))


# ---------------------------------------------------------------------------------------------
# The procedural family.

def test_procedural_shapes_closed_outward_and_deterministic():
  rng = np.random.default_rng(0)
  for c in range(len(procedural.CLASSES)):
    for seed in (0, 1):
      v, f = procedural.make_shape(c, seed)
      assert v.dtype == np.float32 and f.dtype == np.int32
      assert 50 <= len(f) <= 2000
      assert np.abs(v).max() <= procedural.EXTENT + 1e-6
      assert _closed_and_consistent(f)
      assert geometry.signed_volume(v, f) > 0
      # Just inside random faces (against their normal) the winding number is >= 1; far away 0.
      t = geometry.triangles(v, f)[rng.choice(len(f), 40)]
      n = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
      n /= np.linalg.norm(n, axis=1, keepdims=True)
      inner = t.mean(1) - 1e-4 * n
      wn = geometry.winding_number(np.concatenate([inner, [[0.49, 0.49, 0.49], [-0.49, 0.49, -0.49]]]), v, f)
      assert (wn[:-2] > 0.98).all() and np.abs(wn[-2:]).max() < 0.02
    a, b = procedural.make_shape(c, 7), procedural.make_shape(c, 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = procedural.make_shape(c, 8)
    assert other[0].shape != a[0].shape or np.abs(other[0] - a[0]).max() > 0.01
  with pytest.raises(ValueError):
    procedural.make_shape(len(procedural.CLASSES), 0)


# ---------------------------------------------------------------------------------------------
# The shape source.

def test_procedural_source_labels_and_points():
  data = shapes.load(_config(num_fields=5, label='pm1'))
  assert data.points.shape == (5, 2000, 3) and data.points.dtype == np.float32
  assert data.heldout_points.shape == (5, 500, 3) and data.heldout_occupancy.shape == (5, 500)
  assert np.abs(data.points).max() <= 0.5 and np.abs(data.heldout_points).max() <= 0.5
  assert set(np.unique(data.values)) == {-1.0, 1.0}
  np.testing.assert_array_equal(data.labels, [0, 1, 2, 3, 0])
  assert data.names[:2] == ['plane_00000', 'chair_00001'] and data.num_classes == 4
  assert data.source == 'procedural:4-classes' and data.skipped == []
  # Near-surface points are about half inside; uniform points rarely.
  surface_inside = (data.values[:, 1000:] < 0).mean()   # pm1: -1 inside (NeF-GPT)
  assert 0.3 < surface_inside < 0.7 and (data.values[:, :1000] < 0).mean() < surface_inside
  # Labels agree with the reference meshes the evaluate stage gets.
  v, f = data.meshes[3]
  assert np.abs(v).max() == pytest.approx(0.475, rel=1e-5)
  occ = geometry.occupancy(data.points[3], v, f)
  np.testing.assert_array_equal(np.where(occ, -1.0, 1.0), data.values[3])
  # A shape's points do not depend on which other shapes are loaded.
  few = shapes.load(_config(num_fields=2, label='pm1'))
  np.testing.assert_array_equal(few.points[1], data.points[1])
  np.testing.assert_array_equal(few.heldout_points[1], data.heldout_points[1])
  chairs = shapes.load(_config(num_fields=2, synsets=('chair', 'lamp')))
  assert chairs.names == ['chair_00000', 'lamp_00001'] and chairs.class_names == ['chair', 'lamp']


def test_sdf_and_occupancy_labels_on_a_sphere(tmp_path):
  v, f = _icosphere(1.0)
  _write_obj(str(tmp_path / 'm' / 'ball.obj'), v, f)
  sdf = shapes.load(_config(source='meshes', mesh_dir=str(tmp_path / 'm'), num_fields=-1, label='sdf'))
  occ = shapes.load(_config(source='meshes', mesh_dir=str(tmp_path / 'm'), num_fields=-1))
  nv, _ = sdf.meshes[0]
  r = np.linalg.norm(nv, axis=1).max()
  p = sdf.points[0]
  np.testing.assert_allclose(sdf.values[0], np.linalg.norm(p, axis=1) - r, atol=0.02 * r)
  np.testing.assert_array_equal(occ.values[0], (sdf.values[0] < 0).astype(np.float32))
  np.testing.assert_array_equal(occ.heldout_occupancy, sdf.heldout_occupancy)
  # NeF-GPT's +-1 labels with its inflation shell (sd <= shell -> -1), here a thick one to see it.
  pm1 = shapes.load(_config(source='meshes', mesh_dir=str(tmp_path / 'm'), num_fields=-1, label='pm1',
                            pm1_shell=0.05))
  np.testing.assert_array_equal(pm1.values[0], np.where(sdf.values[0] <= 0.05, -1.0, 1.0))
  shell = (pm1.values[0] < 0) & (occ.values[0] == 0)
  assert shell.sum() > 50 and np.all(np.abs(np.linalg.norm(p[shell], axis=1) - r) < 0.05 + 0.02 * r)
  np.testing.assert_array_equal(pm1.heldout_occupancy, occ.heldout_occupancy)   # IoU stays on the shape
  rad = np.linalg.norm(occ.heldout_points[0], axis=1)
  assert (occ.heldout_occupancy[0][rad < 0.9 * r] == 1).all() and (occ.heldout_occupancy[0][rad > r] == 0).all()


def test_the_cache_dir_key_expands_tilde_and_defaults_to_the_workdir(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  assert shapes.cache_dir(_config(cache_dir=''), 'wd') == os.path.join('wd', 'shape_data')
  cache = shapes.cache_dir(_config(cache_dir='~/points'), 'wd')
  assert cache == str(tmp_path / 'home' / 'points')
  shapes.load(_config(num_fields=2, cache_dir='~/points'), cache)
  assert 'manifest.json' in os.listdir(tmp_path / 'home' / 'points') and not os.path.exists(tmp_path / '~')


def test_cache_resume_and_fingerprint(tmp_path, monkeypatch):
  calls = []
  real = shapes._label
  monkeypatch.setattr(shapes, '_label', lambda *a: calls.append(1) or real(*a))
  cache = str(tmp_path / 'cache')
  first = shapes.load(_config(num_fields=6), cache)
  assert len(calls) == 6
  files = sorted(os.listdir(cache))
  assert files == ['chunk_00000.npz', 'chunk_00001.npz', 'manifest.json']
  with np.load(os.path.join(cache, 'chunk_00000.npz')) as z:
    assert z['points'].dtype == np.float16 and z['occupancy'].dtype == np.uint8
  mtimes = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in files}
  again = shapes.load(_config(num_fields=6), cache)
  assert len(calls) == 6
  assert {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in files} == mtimes
  np.testing.assert_array_equal(again.points, first.points)
  np.testing.assert_array_equal(again.values, first.values)
  # Uncached results are the same as cached ones.
  np.testing.assert_array_equal(shapes.load(_config(num_fields=6)).values, first.values)
  assert len(calls) == 12
  # Resume: a lost chunk is recomputed, the other reused.
  os.remove(os.path.join(cache, 'chunk_00001.npz'))
  shapes.load(_config(num_fields=6), cache)
  assert len(calls) == 14
  # Other settings: the cache is rebuilt, not reused.
  changed = shapes.load(_config(num_fields=6, surface_sigma=0.02), cache)
  assert len(calls) == 20
  assert not np.array_equal(changed.points, first.points)



def _assert_same_shapes(cat, data):
  assert isinstance(cat, shapes.ShapeCatalog) and len(cat) == len(data)
  assert cat.names == data.names and cat.skipped == data.skipped and cat.source == data.source
  assert cat.class_names == data.class_names and cat.num_classes == data.num_classes
  assert cat.label_mode == data.label_mode
  np.testing.assert_array_equal(cat.labels, data.labels)
  np.testing.assert_array_equal(cat.source_index, data.source_index)
  assert cat.labels.dtype == data.labels.dtype and cat.source_index.dtype == data.source_index.dtype
  for i in (0, len(data) - 1):
    for a, b in zip(cat.meshes[i], data.meshes[i]):
      np.testing.assert_array_equal(a, b)


def _no_points_read(monkeypatch):
  """Fails on any read of a cached chunk's points; returns the keys read from .npz files."""
  read = []
  real = np.lib.npyio.NpzFile.__getitem__

  def getitem(self, key):
    read.append(key)
    return real(self, key)

  def full_read(*a):
    raise AssertionError('the catalog read a whole cache chunk')

  monkeypatch.setattr(np.lib.npyio.NpzFile, '__getitem__', getitem)
  monkeypatch.setattr(shapes, '_read_chunk', full_read)
  monkeypatch.setattr(shapes, '_process_chunk', full_read)
  return read


def test_catalog_is_the_cached_selection_without_points(tmp_path, monkeypatch):
  cache = str(tmp_path / 'cache')
  config = _config(num_fields=6, label='pm1')
  data = shapes.load(config, cache)
  with monkeypatch.context() as m:
    read = _no_points_read(m)
    cat = shapes.catalog(config, cache, stage='evaluate')
  assert read and set(read) <= set(shapes.CATALOG_KEYS)
  _assert_same_shapes(cat, data)
  assert not hasattr(cat, 'points')


def test_catalog_keeps_skipped_meshes(tmp_path, monkeypatch):
  root = tmp_path / 'meshes'
  for name in ('a.obj', 'b.off', 'd.ply'):
    _write_cube(str(root / name))
  (root / 'c_empty.obj').write_text('')
  (root / 'e_corrupt.off').write_text('OFF\n8 6 0\n0 0 oops\n')
  config = _config(source='meshes', mesh_dir=str(root), num_fields=-1, cache_chunk=2)
  cache = str(tmp_path / 'cache')
  data = shapes.load(config, cache)
  with monkeypatch.context() as m:
    read = _no_points_read(m)
    cat = shapes.catalog(config, cache)
  assert set(read) <= set(shapes.CATALOG_KEYS)
  _assert_same_shapes(cat, data)
  assert [s['name'] for s in cat.skipped] == ['c_empty', 'e_corrupt']
  np.testing.assert_array_equal(cat.source_index, [0, 1, 3])


def test_catalog_needs_a_finished_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(shapes, '_process_chunk', lambda *a: pytest.fail('the catalog computed points'))
  cache = str(tmp_path / 'cache')
  with pytest.raises(DataError, match='fit stage'):
    shapes.catalog(_config(num_fields=6), cache)
  monkeypatch.undo()
  shapes.load(_config(num_fields=6), cache)
  with pytest.raises(DataError, match=r'other settings \(.*num_uniform.*fit stage'):
    shapes.catalog(_config(num_fields=6, num_uniform=999), cache)
  os.remove(os.path.join(cache, 'chunk_00001.npz'))
  with pytest.raises(DataError, match=r'chunk_00001\.npz is missing.*fit stage'):
    shapes.catalog(_config(num_fields=6), cache)
  with open(os.path.join(cache, 'chunk_00001.npz'), 'wb') as f:
    f.write(b'not a zip file')
  with pytest.raises(DataError, match='unreadable.*fit stage'):
    shapes.catalog(_config(num_fields=6), cache)

def test_validate_errors():
  shapes.validate(_config())
  bad = [dict(label='logits'), dict(normalize='unit'), dict(source='tfds'), dict(synsets=('car',)),
         dict(num_fields=-1), dict(num_fields=0), dict(source='meshes', mesh_dir=''), dict(num_uniform=-1),
         dict(num_uniform=0, num_surface=0), dict(split_file='x.lst'), dict(surface_sigma=0.5), dict(cache_chunk=0)]
  for overrides in bad:
    with pytest.raises(ConfigError, match='data.'):
      shapes.validate(_config(**overrides))
  with pytest.raises(DataError, match='not a directory'):
    shapes.load(_config(source='meshes', mesh_dir='/nonexistent/meshes'))


def test_heldout_from_the_cache_equals_the_full_load(tmp_path):
  cache = str(tmp_path / 'cache')
  full = shapes.load(_config(num_fields=5), cache)
  hp, ho = shapes.heldout(_config(num_fields=5), cache)
  np.testing.assert_array_equal(hp, full.heldout_points)
  np.testing.assert_array_equal(ho, full.heldout_occupancy)
  with pytest.raises(DataError, match='fit stage'):
    shapes.heldout(_config(num_fields=5), str(tmp_path / 'none'))
