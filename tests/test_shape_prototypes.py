"""fit.prototypes on shapes: shapes clustered on their voxelised occupancy, a prototype field fitted to
each cluster's medoid (a mean occupancy is no shape: fit.prototype_target='mean' is refused), every shape fitted from its cluster's prototype, and the GPT conditioned
on the prototype (tokenize.condition='prototype') sampling each class through its prototypes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import load_config
from nfjax.modalities import shapes as shape_mod

SHAPES = 'configs/shapes.py'
OVERRIDES = {'fit.shared_init_index': 11, 'fit.prototypes': 2, 'tokenize.condition': 'prototype',
             'sample.settings': ((0, 1.0, 1.0),)}


def test_voxel_occupancy_is_each_voxels_inside_share():
  rng = np.random.default_rng(0)
  pts = rng.uniform(-0.5, 0.5, (2, 60000, 3)).astype(np.float32)
  inside = np.stack([np.linalg.norm(pts[0], axis=-1) < 0.3, pts[1][:, 0] > 0.0])   # a ball; a half space
  r = shape_mod.occupancy_grid_size(pts.shape[1])
  assert r == 16 and shape_mod.occupancy_grid_size(20000) == 14 and shape_mod.occupancy_grid_size(4096) == 8
  occ = shape_mod.voxel_occupancy(pts, inside, r)
  np.testing.assert_array_equal(shape_mod.voxel_occupancy(pts, inside, r, chunk=1), occ)   # chunks change nothing
  c = (np.arange(r) + 0.5) / r - 0.5
  centres = np.stack(np.meshgrid(c, c, c, indexing='ij'), -1).reshape(-1, 3)   # voxel (i, j, k)'s centre
  assert occ.shape == (2, r ** 3) and centres.shape == (r ** 3, 3)
  d = np.linalg.norm(centres, axis=-1)
  half = 0.5 * np.sqrt(3) / r                                    # a voxel's half diagonal
  assert np.all(occ[0][d < 0.3 - half] == 1.0) and np.all(occ[0][d > 0.3 + half] == 0.0)
  boundary = (d > 0.3 - half) & (d < 0.3 + half)
  assert 0.05 < occ[0][boundary].mean() < 0.95
  np.testing.assert_array_equal(occ[1] > 0.5, centres[:, 0] > 0)  # the voxel order is the centres' order
  # a voxel no point falls in reads as outside
  assert shape_mod.voxel_occupancy(np.zeros((1, 1, 3), np.float32), np.ones((1, 1)), 4).sum() == 1.0


def test_shape_prototypes_refuse_a_mean_target(tmp_path):
  from nfjax import main
  from nfjax.errors import ConfigError
  for target in ('auto', 'medoid'):   # what shapes fit (the key checked, nothing run: a bad preset stops it)
    with pytest.raises(ConfigError, match='fit.shared_init_steps'):
      main.run(load_config('smoke', SHAPES, **OVERRIDES, **{'fit.prototype_target': target,
                                                              'fit.shared_init_steps': -1}), str(tmp_path / target), 'fit')
  with pytest.raises(ConfigError, match=r"fit.prototype_target='mean'.*set fit.prototype_target='medoid'"):
    main.run(load_config('smoke', SHAPES, **OVERRIDES, **{'fit.prototype_target': 'mean'}), str(tmp_path / 'm'), 'fit')
  assert not (tmp_path / 'm' / 'fields').exists()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  from nfjax import main
  workdir = str(tmp_path_factory.mktemp('shape_prototypes'))
  config = load_config('smoke', SHAPES, **OVERRIDES)
  return workdir, config, main.run(config, workdir, 'fit,tokenize,train,sample')


def test_shapes_start_from_their_clusters_prototype_and_sample_through_them(run):
  from nfjax.fields import fitting, mlp
  from nfjax.io import fields as field_io
  from nfjax.io import files
  from nfjax.io import tokens as token_io
  workdir, config, summaries = run
  fields = field_io.load(os.path.join(workdir, 'fields'))
  proto = files.read_npz(os.path.join(workdir, 'fields', 'prototypes.npz'))
  labels = np.asarray(fields.labels)
  classes = np.unique(labels)
  # two clusters per class (each class of the 16 smoke shapes has 4), each prototype of its own class
  assert len(proto['labels']) == 2 * len(classes)
  np.testing.assert_array_equal(proto['labels'][proto['of_field']], labels)
  # each prototype is fitted to its cluster's medoid: the shape of its class nearest the cluster's mean
  r = shape_mod.occupancy_grid_size(config.data.num_uniform + config.data.num_surface)
  assert proto['means'].shape == (len(proto['labels']), r ** 3)
  data = shape_mod.load_data(config, workdir)
  vectors = shape_mod.voxel_occupancy(data.points, np.asarray(data.values) > 0.5, r)
  # its quality is its held-out IoU on that shape, and it fits that shape better than the shared init does
  spec = mlp.FieldSpec.from_dict(fields.meta['field'])
  shared = np.load(os.path.join(workdir, 'fields', 'shared_init.npy'))
  hp, ho = shape_mod.shape_data.heldout(config, shape_mod.shape_data.cache_dir(config, workdir))
  for j, (mean, c) in enumerate(zip(proto['means'], proto['labels'])):
    members = np.nonzero(labels == c)[0]
    medoid = members[np.argmin(((vectors[members] - mean) ** 2).sum(-1))]
    iou = [float(fitting.occupancy_iou(spec, 0.0, True, hp[medoid], ho[medoid], mlp.unflatten(spec, w)))
           for w in (proto['weights'][j], shared)]
    np.testing.assert_allclose(iou[0], proto['quality'][j], atol=1e-6)
    assert iou[0] > iou[1], (j, iou)
  # every shape is its own fit from its prototype: none equals its start
  assert not np.any(np.all(np.isclose(fields.weights, proto['weights'][proto['of_field']]), axis=1))
  assert os.path.exists(os.path.join(workdir, 'fields', 'prototypes.png'))
  # the GPT is conditioned on the prototype; its samples are labelled with the classes
  ds = token_io.load(os.path.join(workdir, 'tokens'))
  np.testing.assert_array_equal(ds.condition_class, proto['labels'])
  np.testing.assert_array_equal(ds.conditions(), proto['of_field'][ds.field_index])
  name = summaries['sample']['settings'][0]['name']
  sampled = np.load(os.path.join(workdir, 'samples', name, 'labels.npy'))
  assert set(sampled.tolist()) <= set(classes.tolist()) and len(set(sampled.tolist())) == len(classes)
