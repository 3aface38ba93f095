"""nfjax.analysis (weight views, neuron permutations, alignment) and nfjax.notebook helpers."""

import json

import jax
import numpy as np
import pytest

from conftest import load_config
from nfjax import analysis, notebook
from nfjax.fields import mlp

SHAPE = (28, 28)


def _spec(**kw):
  base = dict(freqs=(1.0, 2.0, 4.0, 8.0), hidden=(16, 16))
  base.update(kw)
  return mlp.FieldSpec(**base)


def _fields(spec, n, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return np.stack([np.asarray(mlp.flatten(spec, mlp.init(spec, k))) for k in keys])


SPECS = [_spec(), _spec(hidden=(8, 12, 6), activation='tanh'), _spec(hidden=(10,), activation='sine', init='siren',
                                                                     output_bias=False)]


def test_tensors_are_views_of_the_layout():
  spec = _spec()
  w = _fields(spec, 3)
  views = analysis.tensors(spec.layout, w)
  params = mlp.unflatten(spec, w)
  assert list(views) == [e['name'] for e in spec.layout]
  np.testing.assert_array_equal(views['layers.1.weight'], params[1]['weight'])
  np.testing.assert_array_equal(views['layers.2.bias'], params[2]['bias'])
  assert analysis.tensors(spec.layout, w[0])['layers.0.weight'].shape == (16, 16)


@pytest.mark.parametrize('spec', SPECS, ids=['relu16x16', 'tanh8x12x6', 'siren10'])
def test_permuting_hidden_neurons_leaves_the_image_unchanged(spec):
  w = _fields(spec, 2)
  rng = np.random.default_rng(1)
  perms = analysis.random_permutations(spec, rng)
  wp = analysis.permute_hidden(spec, w, perms)
  assert wp.shape == w.shape
  assert np.abs(wp - w).max() > 1e-2   # different weights ...
  before, after = mlp.render_weights(spec, w, *SHAPE), mlp.render_weights(spec, wp, *SHAPE)
  np.testing.assert_allclose(after, before, atol=2e-6)   # ... same images
  np.testing.assert_allclose(analysis.permute_hidden(spec, wp, analysis.invert(perms)), w, atol=0)
  # Pre-activations are permuted the same way.
  z, zp = analysis.preactivations(spec, w[:1], SHAPE), analysis.preactivations(spec, wp[:1], SHAPE)
  for l, p in enumerate(perms):
    np.testing.assert_allclose(zp[l][0], z[l][0][:, p], atol=1e-5)


@pytest.mark.parametrize('spec', SPECS, ids=['relu16x16', 'tanh8x12x6', 'siren10'])
@pytest.mark.parametrize('method,use_shape', [('weights', True), ('weights', False), ('activations', True)])
def test_align_recovers_the_permutation(spec, method, use_shape):
  w = _fields(spec, 1, seed=3)[0]
  perms = analysis.random_permutations(spec, np.random.default_rng(7))
  wp = analysis.permute_hidden(spec, w, perms)
  aligned, found = analysis.align(spec, w, wp, SHAPE if use_shape else None, method=method)
  for f, p in zip(found, analysis.invert(perms)):
    np.testing.assert_array_equal(f, p)
  np.testing.assert_allclose(aligned, w, atol=1e-6)
  np.testing.assert_array_equal(aligned, analysis.permute_hidden(spec, wp, found))


def test_align_never_moves_a_field_further_away_and_keeps_its_image():
  spec = _spec()
  a, b = _fields(spec, 2, seed=11)
  aligned, perms = analysis.align(spec, a, b, SHAPE)
  assert np.linalg.norm(a - aligned) <= np.linalg.norm(a - b) + 1e-6
  assert np.linalg.norm(a - aligned) < 0.95 * np.linalg.norm(a - b)   # unrelated inits: a real improvement
  imgs = mlp.render_weights(spec, np.stack([b, aligned]), *SHAPE)
  np.testing.assert_allclose(imgs[0], imgs[1], atol=2e-6)
  with pytest.raises(ValueError, match='activations'):
    analysis.align(spec, a, b, None, method='activations')


def test_neuron_correlation_of_a_permuted_copy_is_the_permutation():
  spec = _spec()
  w = _fields(spec, 1, seed=5)[0]
  perms = analysis.random_permutations(spec, np.random.default_rng(2))
  wp = analysis.permute_hidden(spec, w, perms)
  for layer in (0, 1):
    c = analysis.neuron_correlation(spec, w, wp, SHAPE, layer)
    # neuron perms[layer][j] of w is neuron j of the copy
    np.testing.assert_allclose(c[perms[layer], np.arange(16)], 1.0, atol=1e-5)
  agree = analysis.neuron_agreement(spec, np.stack([w, wp]), SHAPE, matched=True)
  np.testing.assert_allclose(agree, 1.0, atol=1e-5)


def test_pairwise_distances():
  spec = _spec()
  w = _fields(spec, 3, seed=9)
  d = analysis.pairwise_distances(spec, w, SHAPE)
  np.testing.assert_allclose(d['raw'], d['raw'].T, rtol=1e-6)
  assert np.all(np.diag(d['raw']) == 0) and np.all(np.diag(d['aligned']) == 0)
  off = ~np.eye(3, dtype=bool)
  assert np.all(d['aligned'][off] <= d['raw'][off] + 1e-5)
  np.testing.assert_allclose(d['raw'][0, 1], np.linalg.norm(w[0] - w[1]), rtol=1e-5)
  # A field and a copy with its hidden neurons permuted: far apart raw, identical once aligned.
  perms = analysis.random_permutations(spec, np.random.default_rng(3))
  assert all((p != np.arange(len(p))).any() for p in perms)
  permuted = analysis.permute_hidden(spec, w[0], perms)
  d = analysis.pairwise_distances(spec, np.stack([w[0], permuted, w[1]]), SHAPE)
  scale = np.linalg.norm(w[0])
  assert d['raw'][0, 1] > 0.5 * scale and d['raw'][1, 0] > 0.5 * scale
  assert d['aligned'][0, 1] < 1e-4 * scale and d['aligned'][1, 0] < 1e-4 * scale
  # Unrelated fields stay apart after alignment.
  assert d['aligned'][0, 2] > 0.1 * d['raw'][0, 2] > 0


def test_pick_per_class():
  labels = np.array([3, 3, 1, 0, 1, 0, 2])
  assert analysis.pick_per_class(labels, 4).tolist() == [0, 2, 3, 6]
  assert analysis.pick_per_class(labels, 100).tolist() == list(range(7))


def test_symmetry_experiment_on_a_few_images():
  """Fits from one shared init stay aligned (permuting helps little); random inits are far apart and
  alignment brings them closer."""
  from nfjax.data import images as image_data
  config = load_config('smoke', **{'fit.steps': 40})
  data = image_data.load(config)
  idx = analysis.pick_per_class(data.labels, 4)
  spec = mlp.FieldSpec.from_config(config.field)
  shared = _fields(spec, 1, seed=1)[0]
  r = analysis.symmetry_experiment(config, data.images[idx], data.labels[idx], shared_init=shared)
  assert set(r.fits) == {'shared', 'random'}
  assert r.fits['random'].weights.shape == (4, spec.num_params)
  rows = {row['init']: row for row in r.table()}
  assert np.isfinite([rows[k]['psnr_mean'] for k in rows]).all()
  assert rows['shared']['distance_raw'] < rows['random']['distance_raw']
  assert rows['random']['distance_aligned'] < 0.95 * rows['random']['distance_raw']
  assert rows['shared']['aligned_over_raw'] > rows['random']['aligned_over_raw']
  assert rows['shared']['neuron_corr_raw'] > rows['random']['neuron_corr_raw']
  assert rows['random']['neuron_corr_matched'] > rows['random']['neuron_corr_raw']
  # The fields really are the images: the same fitter as the fit stage.
  imgs = mlp.render_weights(spec, r.fits['shared'].weights, *SHAPE)
  psnr = -10 * np.log10(((imgs - data.images[idx]) ** 2).mean((1, 2)))
  np.testing.assert_allclose(psnr, r.fits['shared'].psnr, atol=1e-3)
  # The figures draw.
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  for fig in (analysis.plot_distances(r), analysis.plot_neuron_correlations(r), analysis.plot_weight_matrices(r, fields=3),
              analysis.plot_layer_histograms(r.fits['random'].weights, spec.layout, shared),
              analysis.plot_quality(r.fits['random'].psnr, data.labels[idx], floor=5.0)):
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# nfjax.notebook


def test_get_config_is_the_launchers_config_with_overrides():
  config = notebook.get_config('smoke', 'configs/mnist.py', {'fit.steps': 7, 'sample.settings': [[3, 0.5, 1.0]]})
  ref = load_config('smoke', **{'fit.steps': 7})
  assert config.fit.steps == 7 and config.sample.settings == ((3, 0.5, 1.0),)
  assert config.data.to_dict() == ref.data.to_dict() and config.preset == 'smoke'
  assert notebook.get_config('configs/mnist.py:quick').preset == 'quick'
  with pytest.raises(KeyError, match='fit.stepz'):
    notebook.get_config('smoke', overrides={'fit.stepz': 1})
  with pytest.raises(FileNotFoundError, match='nope.py'):
    notebook.get_config('smoke', 'configs/nope.py')


def test_resolve_workdir(tmp_path):
  assert notebook.resolve_workdir(str(tmp_path / 'w'), 'smoke') == str(tmp_path / 'w')
  assert notebook.resolve_workdir('', 'smoke').endswith(('workdirs/smoke'))


def test_tables(tmp_path):
  t = notebook.Table([{'a': 1, 'b': 0.123456}, {'a': 20000, 'c': 'x<y'}], title='T')
  assert t.columns == ['a', 'b', 'c']
  assert '0.1235' in str(t) and '20,000' in str(t)
  assert '<table>' in t._repr_html_() and 'x&lt;y' in t._repr_html_()
  e = {'headline_setting': 's1',
       'reference': {'class_accuracy': 0.9, 'num_evaluated': 5, 'novelty': {'copy_fraction': 0.2,
                                                                          'nn_image_l2': {'median': 3.0}}},
       'settings': {'s1': {'class_accuracy': 0.5, 'frechet_distance': 10.0}, 's2': {'class_accuracy': 0.4}},
       'nefgpt_reported': {'class_accuracy': 0.984}}
  rows = notebook.eval_table(e).rows
  assert [r['set'] for r in rows] == ['reference (ceiling)', 's1 *', 's2', 'NeF-GPT (reported)']
  assert rows[0]['copy_fraction'] == 0.2 and rows[0]['nn_image_l2_median'] == 3.0
  (tmp_path / 'fields').mkdir()
  (tmp_path / 'fields' / 'summary.json').write_text(json.dumps({'num_fields': 3, 'psnr_mean': 30.0, 'other': 1}))
  rows = notebook.summaries_table(str(tmp_path)).rows
  assert rows == [{'stage': 'fit', 'figure': 'num_fields', 'value': 3}, {'stage': 'fit', 'figure': 'psnr_mean',
                                                                          'value': 30.0}]
  with pytest.raises(FileNotFoundError, match='evaluate'):
    notebook.eval_table(str(tmp_path))


def test_image_grid():
  imgs = np.random.default_rng(0).random((7, 28, 28)).astype(np.float32)
  g = notebook.image_grid(imgs, labels=np.array([0, 0, 1, 1, 1, 2, 2]), per_row=2, scale=1)
  # rows: class 0 (2), class 1 (2 + 1), class 2 (2) = 4 rows of up to 2 images
  assert g.size[1] == 4 * (28 + 2) + 2
  assert g.size[0] == 90 + 2 * (28 + 2) + 2          # row-label margin + 2 columns
  assert notebook.image_grid(imgs, per_row=5, scale=1).size == (5 * (28 + 2) + 2, 2 * (28 + 2) + 2)

  def cell(a, r, c, left=0, h=28, w=28, pad=2):
    y, x = pad + r * (h + pad), left + pad + c * (w + pad)
    return a[y:y + h, x:x + w]

  # Content lands in its cell: black images, one white one; padding is the background (40).
  imgs = np.zeros((7, 28, 28), np.float32)
  imgs[3] = 1.0                                      # class 1's 2nd image -> row 1, column 1
  a = np.asarray(notebook.image_grid(imgs, labels=np.array([0, 0, 1, 1, 1, 2, 2]), per_row=2, scale=1))
  assert a.shape == (4 * 30 + 2, 90 + 2 * 30 + 2)
  filled = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0), (3, 1)}
  for r in range(4):
    for c in range(2):
      expected = 255 if (r, c) == (1, 1) else 0 if (r, c) in filled else 40
      assert np.all(cell(a, r, c, left=90) == expected), (r, c)
  assert np.all(a[:, 90:92] == 40) and np.all(a[:2, 90:] == 40) and np.all(a[:, -2:] == 40)
  # Without labels, row-major placement and scaling: image 6 -> row 1, column 1, 2x2 pixel blocks.
  imgs = np.zeros((7, 4, 4), np.float32)
  imgs[6, 1, 2] = 1.0
  a = np.asarray(notebook.image_grid(imgs, per_row=5, scale=2))
  assert a.shape == (2 * (8 + 2) + 2, 5 * (8 + 2) + 2)
  blk = cell(a, 1, 1, h=8, w=8)
  assert np.all(blk[2:4, 4:6] == 255) and blk.sum() == 4 * 255
  assert np.all(cell(a, 1, 2, h=8, w=8) == 40) and np.all(cell(a, 0, 0, h=8, w=8) == 0)
  assert np.count_nonzero(a == 255) == 4 and a[a != 255].max() == 40
