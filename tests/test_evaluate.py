"""The evaluate stage: SSIM, set metrics, Fréchet distance, classifier, novelty, the stage end to end."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from nfjax import main, sharding
from nfjax.data import images as image_data
from nfjax.io import fields as wds
from nfjax.errors import DataError, NfjaxError
from nfjax.evaluate import classifier, image_metrics as im, novelty, protocol
from nfjax.io import samples
from nfjax.io import workdir as workdir_lib
from nfjax.modalities.images import evaluate as image_eval
from nfjax.stages import evaluate as stage


@pytest.fixture(scope='module')
def mnist():
  x, y = image_data._offline_mnist()
  return x, y


# ---------------------------------------------------------------------------------------------
# SSIM

def _ssim_reference(a, b):
  """Independent SSIM: scipy's Gaussian filter (sigma 1.5, radius 5), valid region, float64."""
  ndimage = pytest.importorskip('scipy.ndimage')
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  f = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode='constant')[5:-5, 5:-5]
  mu_a, mu_b = f(a), f(b)
  va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
  return s.mean()


def test_ssim_matches_independent_reference(mnist):
  x, _ = mnist
  rng = np.random.default_rng(0)
  a = x[:6]
  b = np.clip(x[6:12] + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  got = np.asarray(im.ssim(a, b))
  want = np.array([_ssim_reference(p, q) for p, q in zip(a, b)])
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.all(got < 0.9)  # different digits + noise: far from identical


def test_ssim_is_one_on_itself_and_falls_with_noise(mnist):
  x, _ = mnist
  imgs = x[:8]
  np.testing.assert_allclose(np.asarray(im.ssim(imgs, imgs)), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(im.ssim_distance(imgs, imgs)), 0.0, atol=1e-5)
  rng = np.random.default_rng(1)
  eps = rng.standard_normal(imgs.shape).astype(np.float32)
  means = [float(np.asarray(im.ssim(imgs, np.clip(imgs + s * eps, 0, 1))).mean()) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
  assert all(p > q for p, q in zip(means, means[1:])), means
  assert means[-1] < 0.7


def test_pairwise_ssim_equals_matched_pairs_symmetric_and_sharded(mnist):
  x, _ = mnist
  a, b = x[:13], x[100:110]
  want = np.array([[float(im.ssim_distance(p[None], q[None])[0]) for q in b] for p in a])
  got = im.PairwiseSSIM(28, 28, tile=8)(a, b)  # several tiles, padded edges
  assert got.shape == (13, 10)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # a against itself: only upper tiles are computed; the result must be the full symmetric matrix.
  self_d = im.PairwiseSSIM(28, 28, tile=4)(a)
  full = im.PairwiseSSIM(28, 28, tile=4)(a, a)
  np.testing.assert_allclose(self_d, full, atol=1e-6)
  np.testing.assert_allclose(self_d, self_d.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(self_d), 0.0, atol=1e-5)
  # Rows sharded over the 8 fake devices: same numbers.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1}))
  assert mesh.size == 8
  np.testing.assert_allclose(im.PairwiseSSIM(28, 28, tile=8, mesh=mesh)(a, b), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# MMD / COV / 1-NNA

def _l2(a, b):
  return np.linalg.norm(a[:, None] - b[None], axis=-1)


def test_set_metrics_hand_computed():
  # 3 samples x 4 refs.
  d_sr = np.array([[0.1, 0.5, 0.9, 0.7],
                   [0.2, 0.3, 0.8, 0.6],
                   [0.4, 0.1, 0.9, 0.2]])
  mc = im.mmd_cov(d_sr)
  assert mc['mmd'] == pytest.approx((0.1 + 0.1 + 0.8 + 0.2) / 4)   # mean over refs of min over samples
  assert mc['cov'] == pytest.approx(2 / 4)                         # nearest refs {0, 1}
  assert mc['mmd_smp'] == pytest.approx((0.1 + 0.2 + 0.1) / 3)


def test_set_metrics_identical_same_distribution_and_disjoint():
  rng = np.random.default_rng(0)
  r = rng.standard_normal((300, 2))
  # The very same set: every sample's nearest ref is its twin (COV 1, MMD 0), and every point's
  # leave-one-out neighbour is its twin in the other set, so 1-NNA is 0 (the memorization signature).
  same = im.set_metrics(_l2(r, r), _l2(r, r), _l2(r, r))
  assert same['ssim_cov'] == 1.0 and same['ssim_mmd'] == 0.0 and same['ssim_1nna'] == 0.0
  # A second draw from the same distribution: indistinguishable, 1-NNA ~ 0.5.
  s = rng.standard_normal((300, 2))
  iid = im.set_metrics(_l2(s, r), _l2(r, r), _l2(s, s))
  assert 0.42 < iid['ssim_1nna'] < 0.58, iid
  assert 0.3 < iid['ssim_cov'] < 0.9
  # Far-apart clusters: perfectly separable, 1-NNA 1; all samples share one nearest ref edge.
  far = rng.standard_normal((300, 2)) + 100.0
  sep = im.set_metrics(_l2(far, r), _l2(r, r), _l2(far, far))
  assert sep['ssim_1nna'] == 1.0
  assert sep['ssim_cov'] < 0.05 and sep['ssim_mmd'] > 90
  # Collapse: all samples are one ref -> COV 1/N.
  one = np.repeat(r[:1], 50, axis=0)
  assert im.mmd_cov(_l2(one, r))['cov'] == pytest.approx(1 / 300)


# ---------------------------------------------------------------------------------------------
# Fréchet distance

def test_frechet_zero_shift_and_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
  assert abs(im.frechet_distance(a, a)) < 1e-8
  # A mean shift keeps the covariance: FD is exactly |delta|^2.
  for scale in (0.5, 1.0, 3.0):
    delta = scale * np.arange(1, 7, dtype=np.float64)
    assert im.frechet_distance(a, a + delta) == pytest.approx(delta @ delta, rel=1e-7, abs=1e-7)
  # Diagonal Gaussians: sum (sqrt(a_i) - sqrt(b_i))^2 + |mu1 - mu2|^2.
  va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  closed = ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
  assert im.frechet_from_moments(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(closed, rel=1e-10)
  # ...and estimated from samples of those Gaussians.
  x = mu1 + np.sqrt(va) * rng.standard_normal((50000, 3))
  y = mu2 + np.sqrt(vb) * rng.standard_normal((50000, 3))
  assert im.frechet_distance(x, y) == pytest.approx(closed, rel=0.03)


def test_frechet_general_covariances_match_sqrtm_and_survive_singular():
  linalg = pytest.importorskip('scipy.linalg')
  rng = np.random.default_rng(1)
  m1, m2 = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
  c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)  # do not commute
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  want = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
  assert im.frechet_from_moments(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)
  # Fewer samples than dimensions: singular covariances, still finite and >= 0.
  fd = im.frechet_distance(rng.standard_normal((10, 64)), rng.standard_normal((10, 64)) + 1.0)
  assert np.isfinite(fd) and fd > 60


# ---------------------------------------------------------------------------------------------
# Classifier, nearest neighbours

def test_classifier_learns_and_roundtrips(mnist, tmp_path):
  x, y = mnist
  cfg = ml_collections.ConfigDict(dict(channels=(8, 16), hidden=32, epochs=3, batch_size=32, lr=3e-3,
                                       weight_decay=1e-4, augment_shift=1, heldout_fraction=0.2))
  idx = np.random.default_rng(0).permutation(len(x))[:1000]
  clf = classifier.train(x[idx], y[idx], cfg, seed=0)
  assert clf.info['num_heldout'] == 200 and clf.info['num_train'] == 800
  assert clf.info['heldout_accuracy'] > 0.6, clf.info  # chance is 0.1
  logits, feats = clf.logits_and_features(x[:7])
  assert logits.shape == (7, 10) and feats.shape == (7, 32)
  clf.save(str(tmp_path))
  back = classifier.Classifier.load(str(tmp_path))
  np.testing.assert_array_equal(back.predict(x[:300]), clf.predict(x[:300]))
  assert back.info['heldout_accuracy'] == clf.info['heldout_accuracy']


def test_packaged_classifier_is_what_training_gives_and_is_used_only_for_its_config(tmp_path, monkeypatch):
  """The offline default's packaged classifier (nfjax/data/mnist_5k_classifier) is used instead of
  training when the config is the one it was trained with, and is what `_classifier` trains with
  that config here (the same fingerprint; the same predictions on the held-out images up to float
  rounding): a change to the classifier's code, config or data fails this until it is packaged again."""
  config = load_config('quick')
  real = image_eval._real_images(config)
  held = classifier.split_heldout(len(real.images), float(config.evaluate.classifier.heldout_fraction),
                                  int(config.seed))[1]

  def no_training(*a, **k):
    raise AssertionError('trained although the packaged (or cached) classifier fits this config')
  trained = classifier.train
  monkeypatch.setattr(classifier, 'train', no_training)
  packaged = image_eval._classifier(str(tmp_path / 'packaged'), config, real, 10)
  assert os.path.exists(tmp_path / 'packaged' / 'classifier.json')   # cached in the workdir
  cached = image_eval._classifier(str(tmp_path / 'packaged'), config, real, 10)
  np.testing.assert_array_equal(cached.predict(real.images[held]), packaged.predict(real.images[held]))

  monkeypatch.setattr(classifier, 'train', trained)
  own_cfg = load_config('quick', **{'evaluate.classifier.packaged': False})
  own = image_eval._classifier(str(tmp_path / 'packaged'), own_cfg, real, 10)  # trained, though one is cached
  assert not own.info.get('packaged') and packaged.info['packaged']
  assert own.info['fingerprint'] == packaged.info['fingerprint']
  agree = (own.predict(real.images[held]) == packaged.predict(real.images[held])).mean()
  assert agree >= 0.99, agree
  assert abs(own.info['heldout_accuracy'] - packaged.info['heldout_accuracy']) <= 0.01

  # Any other classifier config trains its own (here a tiny one).
  tiny = load_config('quick', **{'evaluate.classifier.channels': (4, 8), 'evaluate.classifier.hidden': 16,
                                 'evaluate.classifier.epochs': 1, 'evaluate.classifier.max_images': 600})
  small = image_eval._classifier(str(tmp_path / 'tiny'), tiny, real, 10)
  assert small.info['fingerprint']['classifier']['epochs'] == 1 and small.arch.hidden == 16


def test_nearest_neighbours_brute_force_and_exact_copies():
  rng = np.random.default_rng(0)
  b = rng.standard_normal((50, 20)).astype(np.float32) * 10
  a = rng.standard_normal((7, 20)).astype(np.float32) * 10
  a[2] = b[31]  # an exact copy
  dist, idx = novelty.nearest(a, b, block=3)
  full = _l2(a.astype(np.float64), b.astype(np.float64))
  np.testing.assert_array_equal(idx, full.argmin(1))
  np.testing.assert_allclose(dist, full.min(1), rtol=1e-9)
  assert idx[2] == 31 and dist[2] == 0.0


# ---------------------------------------------------------------------------------------------
# The no-structure row's sampler

def test_histogram_tokens_draw_every_slot_from_the_class_training_histogram():
  from nfjax.evaluate import no_structure
  rng = np.random.default_rng(0)
  # Class 0 (40 sequences): slot 0 always 7; slot 1 is 3 in a quarter of them, 9 otherwise; slot 2
  # is 0 exactly where slot 1 is 3, else one of {1..4}. Class 1 (20): slot 0 always 8, slot 1
  # always 5, slot 2 one of {10, 11}.
  n0, n1 = 40, 20
  s1 = np.where(np.arange(n0) < n0 // 4, 3, 9)
  t0 = np.stack([np.full(n0, 7), s1, np.where(s1 == 3, 0, rng.integers(1, 5, n0))], 1)
  t1 = np.stack([np.full(n1, 8), np.full(n1, 5), 10 + rng.integers(0, 2, n1)], 1)
  tokens = np.concatenate([t0, t1]).astype(np.int32)
  labels = np.array([0] * n0 + [1] * n1)
  perm = rng.permutation(len(tokens))          # the class's rows anywhere in the array
  tokens, labels = tokens[perm], labels[perm]
  classes = np.array([0, 1] * 4000)
  out, pooled = no_structure.histogram_tokens(tokens, labels, classes, seed=3)
  assert out.shape == (8000, 3) and out.dtype == np.int32 and pooled == []
  a, b = out[classes == 0], out[classes == 1]
  assert (a[:, 0] == 7).all() and (b[:, 0] == 8).all() and (b[:, 1] == 5).all()   # one value: always it
  assert set(np.unique(a[:, 1])) == {3, 9}                                         # two values: both ...
  assert abs((a[:, 1] == 3).mean() - 0.25) < 0.03                                  # ... at their rate
  for slot in range(3):   # never a token the class did not have at that slot
    assert set(np.unique(a[:, slot])) <= set(t0[:, slot]) and set(np.unique(b[:, slot])) <= set(t1[:, slot])
  counts = np.bincount(a[:, 2], minlength=5) / len(a)
  np.testing.assert_allclose(counts, np.bincount(t0[:, 2], minlength=5) / n0, atol=0.03)
  # Slots are drawn independently: slot 2 is 0 exactly where slot 1 is 3 in the data, not in the draws.
  assert abs((a[a[:, 1] == 3, 2] == 0).mean() - 0.25) < 0.05 and (a[a[:, 1] == 9, 2] == 0).any()
  # Seeded: the same draw again, another with another seed.
  np.testing.assert_array_equal(no_structure.histogram_tokens(tokens, labels, classes, seed=3)[0], out)
  assert not np.array_equal(no_structure.histogram_tokens(tokens, labels, classes, seed=4)[0], out)
  # A class without training sequences draws from every class's histogram, and says so.
  out2, pooled = no_structure.histogram_tokens(tokens, labels, np.array([2] * 500), seed=0)
  assert pooled == [2] and set(np.unique(out2[:, 0])) == {7, 8}


# ---------------------------------------------------------------------------------------------
# The stage

def _workdir_with_fields(smoke_fields, tmp_path):
  wd = str(tmp_path / 'run')
  shutil.copytree(os.path.join(smoke_fields, 'fields'), os.path.join(wd, 'fields'))
  return wd


SETTINGS = [{'name': 'copies', 'top_k': 1, 'temperature': 1.0, 'top_p': 1.0, 'noise': 0.0},
            {'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'noise': 1.0}]


def test_stage_end_to_end_skip_and_rerun_on_new_samples(smoke_fields, tmp_path, capsys):
  from nfjax.evaluate import no_structure
  wd = _workdir_with_fields(smoke_fields, tmp_path)
  protocol.write_fake_samples(wd, SETTINGS, num_samples=24, nonfinite=2)
  config = load_config('smoke')
  s = main.run(config, wd, 'evaluate')['evaluate']
  ev = os.path.join(wd, 'eval')
  # Fake samples, no tokens/: no no-structure row, and a note says why.
  assert 'no_structure' not in s and 'vs_no_structure' not in s
  assert any('no no_structure row' in n for n in s['notes'])

  # With the pipeline's tokens/ and tokenizer/, the finished eval/ (which lacks the row) is evaluated
  # again, and gains the row: histogram tokens decoded as samples are, scored like the settings.
  main.run(load_config('smoke', **{'tokenize.encoder': 'nearest'}), wd, 'tokenize')   # (the quicker encoder)
  capsys.readouterr()
  s = stage.run(config, wd)
  out = capsys.readouterr().out
  assert 'evaluated without the no_structure row: evaluating again' in out
  ns, h = s['no_structure'], s['settings']['topk3_t0.8']
  assert set(h) - {'top_k', 'temperature', 'top_p'} <= set(ns)
  assert ns['num_samples'] == 24 and ns['num_nonfinite'] == 0 and ns['labels_from'] == 'topk3_t0.8'
  labels = np.load(os.path.join(wd, 'samples', 'topk3_t0.8', 'labels.npy'))   # the headline's classes
  assert [v is None for v in ns['class_accuracy_per_class']] == \
      [not (labels == c).any() for c in range(len(ns['class_accuracy_per_class']))]
  assert ns['num_train_sequences'] == len(np.load(os.path.join(wd, 'tokens', 'train_idx.npy')))
  for key in ('class_accuracy', 'frechet_distance', 'ssim_mmd', 'ssim_cov', 'ssim_1nna'):
    assert np.isfinite(ns[key]), key
  vs = s['vs_no_structure']
  assert vs['setting'] == 'topk3_t0.8'
  for key in ('class_accuracy', 'frechet_distance', 'ssim_cov'):
    assert vs[key] == pytest.approx(h[key] - ns[key])
  line = next(ln for ln in out.splitlines() if 'vs no_structure' in ln)
  a, b = h['class_accuracy'], ns['class_accuracy']
  assert f"[evaluate] vs no_structure at top-k 3, T 0.8: class consistency {a:.3f} vs {b:.3f} ({a - b:+.3f}), " \
         f"FD {h['frechet_distance']:.3g} vs {ns['frechet_distance']:.3g}" in line, line
  assert f"SSIM COV {h['ssim_cov']:.3f} vs {ns['ssim_cov']:.3f}" in line, line
  # How much of the held-out fields' coverage the row and the headline reach (the ceiling real fields set).
  ref = s['reference']['ssim_cov']
  assert ref > 0 and vs['coverage_of_reference'] == pytest.approx({'row': ns['ssim_cov'] / ref,
                                                                   'headline': h['ssim_cov'] / ref})
  assert f"[evaluate] no_structure reaches {ns['ssim_cov'] / ref:.2f} of the held-out fields' SSIM COV " \
         f"({ns['ssim_cov']:.3f} against {ref:.3f}), the headline {h['ssim_cov'] / ref:.2f} ({h['ssim_cov']:.3f})" in out
  # Which settings beat the row on all three figures at once: class consistency up, FD and COV in
  # their own directions (FD down, COV up), in the summary, the log and eval/settings.png.
  beats = lambda r: (r['class_accuracy'] > ns['class_accuracy'] and r['frechet_distance'] < ns['frechet_distance']
                     and r['ssim_cov'] > ns['ssim_cov'])
  better = [name for name, r in s['settings'].items() if beats(r)]
  assert vs['better_on_every_figure'] == beats(h) and vs['settings_better_on_every_figure'] == better
  assert f"settings better than no_structure on class consistency, FD and SSIM COV at once: " \
         f"{', '.join(better) or 'none'} (of 2; eval/settings.png)" in out
  assert not any('no no_structure row' in n for n in s['notes'])
  # The row's weights are the tokenizer's decoding of the seeded histogram draw (the same again).
  w, _ = no_structure.draw(wd, labels, config.seed + no_structure.STREAM, 561)
  assert w.shape == (24, 561) and np.isfinite(w).all()
  np.testing.assert_array_equal(w, no_structure.draw(wd, labels, config.seed + no_structure.STREAM, 561)[0])

  assert s['headline_setting'] == 'topk3_t0.8'
  assert s['num_samples'] == 24 and s['num_reference'] == 24 and s['num_heldout_fields'] == 24
  assert s['classifier_heldout_accuracy'] > 0.5
  assert any('1,000' in n for n in s['notes'])
  for name in ('copies', 'topk3_t0.8'):
    r = s['settings'][name]
    assert r['num_samples'] == 24 and r['num_nonfinite'] == 2 and r['num_evaluated'] == 22
    for key in ('class_accuracy', 'frechet_distance', 'ssim_mmd', 'ssim_cov', 'ssim_1nna'):
      assert np.isfinite(r[key]), (name, key)
    assert 0.0 <= r['ssim_1nna'] <= 1.0 and 0.0 < r['ssim_cov'] <= 1.0
    # Class accuracy counts the non-finite samples as wrong; per-sample predictions agree.
    ps = np.load(os.path.join(ev, s['per_sample_files'][name]))
    labels = np.load(os.path.join(wd, 'samples', name, 'labels.npy'))
    assert ps['valid'].sum() == 22 and (ps['pred'][~ps['valid']] == -1).all()
    assert r['class_accuracy'] == pytest.approx((ps['pred'] == labels).mean())
    assert r['class_accuracy_valid'] == pytest.approx((ps['pred'] == labels)[ps['valid']].mean())
    # eval/grid_<setting>.png labels each class's row with that class's accuracy in the summary
    for c, right, total in image_eval.row_accuracy(labels, ps['pred'], len(r['class_accuracy_per_class'])):
      assert r['class_accuracy_per_class'][c] == pytest.approx(right / total), (name, c)
  assert s['class_accuracy'] == s['settings']['topk3_t0.8']['class_accuracy']

  # Exact copies of training fields: their nearest training weights are themselves (distance 0),
  # noisy fields are further away; the copies are all flagged as copies in pixel space
  # up to the fields' own reconstruction-error spread.
  fields = wds.load(os.path.join(wd, 'fields'))
  ps = np.load(os.path.join(ev, 'per_sample', 'copies.npz'))
  w = np.load(os.path.join(wd, 'samples', 'copies', 'weights.npy'))
  v = ps['valid']
  np.testing.assert_array_equal(fields.weights[ps['nn_weight_field'][v]], w[v])
  copies, noisy = s['settings']['copies']['novelty'], s['settings']['topk3_t0.8']['novelty']
  assert copies['nn_weight_l2']['median'] == 0.0 and noisy['nn_weight_l2']['median'] > 0.5
  assert copies['nn_image_l2']['median'] <= noisy['nn_image_l2']['median']
  assert copies['copy_fraction'] >= 0.75

  # Context rows: the held-out reconstructions are no copies of the other fields.
  ref, base = s['reference'], s['baseline']
  assert ref['num_samples'] == 24 and ref['num_nonfinite'] == 0 and np.isfinite(ref['frechet_distance'])
  assert ref['novelty']['nn_weight_l2']['min'] > 0.0
  assert base['noise'] == 0.1 and base['num_samples'] == 24
  for png in ('novelty.png', 'neighbours_copies.png', 'neighbours_topk3_t0.8.png', 'neighbours_reference.png',
              'neighbours_baseline.png', 'neighbours_no_structure.png', 'grid_copies.png', 'grid_topk3_t0.8.png',
              'settings.png'):
    assert os.path.getsize(os.path.join(ev, png)) > 1000, png
  listed = json.load(open(os.path.join(ev, 'manifest.json')))['files']
  assert {'grid_copies.png', 'grid_topk3_t0.8.png'} <= set(listed)                       # one per setting
  assert not any(os.path.exists(os.path.join(ev, f'grid_{x}.png')) for x in ('reference', 'baseline', 'no_structure'))
  assert 'grid_topk3_t0.8.png' in main.pictures(ev)

  # Re-run with the same config and inputs: skipped, nothing rewritten.
  mtimes = {f: os.path.getmtime(os.path.join(ev, f)) for f in ('summary.json', 'classifier/params.npz')}
  assert json.dumps(stage.run(config, wd), sort_keys=True) == json.dumps(s, sort_keys=True)
  assert all(os.path.getmtime(os.path.join(ev, f)) == t for f, t in mtimes.items())

  # New samples: evaluated again, with the cached classifier.
  shutil.rmtree(os.path.join(wd, 'samples'))
  protocol.write_fake_samples(wd, SETTINGS[1:], num_samples=16)
  again = stage.run(config, wd)
  assert again['num_samples'] == 16 and list(again['settings']) == ['topk3_t0.8']
  assert os.path.getmtime(os.path.join(ev, 'classifier', 'params.npz')) == mtimes['classifier/params.npz']
  assert again['classifier_heldout_accuracy'] == s['classifier_heldout_accuracy']
  assert not os.path.exists(os.path.join(ev, 'neighbours_copies.png'))  # no stale pictures
  assert not os.path.exists(os.path.join(ev, 'grid_copies.png'))
  assert os.path.exists(os.path.join(ev, 'grid_topk3_t0.8.png'))
  assert not os.path.exists(os.path.join(ev, 'per_sample', 'copies.npz'))

  # A different evaluate config in the same workdir is refused, not mixed in.
  with pytest.raises(NfjaxError, match='different config'):
    stage.run(load_config('smoke', **{'evaluate.baseline_noise': 0.3}), wd)


def test_missing_or_bad_inputs_give_clear_errors(smoke_fields, tmp_path):
  config = load_config('smoke')
  with pytest.raises(DataError, match='fit stage'):
    stage.run(config, str(tmp_path / 'empty'))
  wd = _workdir_with_fields(smoke_fields, tmp_path)
  with pytest.raises(DataError, match='run the sample stage first'):
    stage.run(config, wd)
  assert not os.path.exists(os.path.join(wd, 'eval'))  # nothing claimed before the inputs exist
  protocol.write_fake_samples(wd, SETTINGS[1:], num_samples=8)
  os.remove(os.path.join(wd, 'samples', 'summary.json'))
  with pytest.raises(DataError, match='incomplete'):
    stage.run(config, wd)
  protocol.write_fake_samples(wd, SETTINGS[1:], num_samples=8)
  np.save(os.path.join(wd, 'samples', 'topk3_t0.8', 'weights.npy'), np.zeros((8, 100), np.float32))
  with pytest.raises(DataError, match=r'weights.npy has .* bytes.*written by the sample stage'):
    stage.run(config, wd)                              # a file changed after its stage finished
  workdir_lib.write_summary(os.path.join(wd, 'samples'), {'num_samples': 8})   # as if the stage wrote it so
  with pytest.raises(DataError, match='561'):
    stage.run(config, wd)
  with pytest.raises(NfjaxError, match='heldout_fraction'):
    image_eval.validate(load_config('smoke', **{'evaluate.classifier.heldout_fraction': 1.5}))


def test_better_on_every_figure_reads_each_figure_in_its_own_direction(tmp_path):
  from nfjax.evaluate import settings_plot
  ev = image_eval.ImageEvaluator
  ns = {'class_accuracy': 0.80, 'frechet_distance': 50.0, 'ssim_cov': 0.54}
  row = {'class_accuracy': 0.90, 'frechet_distance': 40.0, 'ssim_cov': 0.55}
  assert protocol.better_on_every_figure(ev, row, ns) is True
  assert protocol.better_on_every_figure(ev, {**row, 'frechet_distance': 60.0}, ns) is False   # FD: lower is better
  assert protocol.better_on_every_figure(ev, {**row, 'ssim_cov': 0.53}, ns) is False
  assert protocol.better_on_every_figure(ev, {**row, 'ssim_cov': 0.54}, ns) is False           # level is not better
  assert protocol.better_on_every_figure(ev, {**row, 'ssim_cov': float('nan')}, ns) is None
  assert protocol.better_on_every_figure(protocol.Evaluator, row, ns) is None                   # no figures named
  # coverage as a share of the held-out fields': None where a figure is missing or the reference covers nothing
  assert protocol.coverage_of_reference(ev, ns, row, {'ssim_cov': 0.5}) == pytest.approx({'row': 1.08, 'headline': 1.1})
  assert protocol.coverage_of_reference(ev, ns, row, {'ssim_cov': 0.0}) is None
  assert protocol.coverage_of_reference(ev, {**ns, 'ssim_cov': float('nan')}, row, {'ssim_cov': 0.5}) is None
  assert protocol.coverage_of_reference(ev, ns, row, {}) is None
  assert protocol.coverage_of_reference(protocol.Evaluator, ns, row, {'ssim_cov': 0.5}) is None   # no coverage named
  # Shapes: 1-NNA against training references is better nearer 0.5 (copies push it under).
  from nfjax.modalities.shapes.evaluate import ShapeEval
  sns = {'cov': 0.50, '1nna': 0.60, 'mmd_cd_x100': 15.0}
  srow = {'cov': 0.55, '1nna': 0.45, 'mmd_cd_x100': 14.0}
  assert protocol.better_on_every_figure(ShapeEval, srow, sns) is True
  assert protocol.better_on_every_figure(ShapeEval, {**srow, '1nna': 0.35}, sns) is False
  assert protocol.better_on_every_figure(ShapeEval, {**srow, '1nna': 0.65}, sns) is False
  # The picture: one panel per figure against coverage; none without directions.
  path = str(tmp_path / 'settings.png')
  assert settings_plot.settings_png(path, ev.comparison, ev.coverage, {'a': row, 'b': {**row, 'ssim_cov': 0.5}},
                                    {'no_structure': ns, 'reference': {**row, 'ssim_cov': 0.58}}, headline='a')
  with Image.open(path) as png:
    assert png.width > 1.8 * png.height     # two panels side by side
  assert settings_plot.settings_png(path, ShapeEval.comparison, ShapeEval.coverage, {'a': srow}, {'no_structure': sns})
  assert not settings_plot.settings_png(str(tmp_path / 'none.png'), (('x', 'x', '.3f'),), 'x', {'a': row}, {})
  assert not os.path.exists(tmp_path / 'none.png')


def test_the_headline_setting_prefers_one_without_guidance():
  import types
  from nfjax.evaluate import protocol
  e = types.SimpleNamespace(headline_top_k=3, headline_temperature=0.8)
  guided = {'name': 'topk3_t0.8_g2', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'guidance': 2.0}
  plain = {'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0}
  assert protocol.headline_setting([guided, plain], e) == 'topk3_t0.8'
  assert protocol.headline_setting([guided], e) == 'topk3_t0.8_g2'
  e.headline_guidance = 2.0    # evaluate.headline_guidance: that guided setting heads the summary
  g4 = {**guided, 'name': 'topk3_t0.8_g4', 'guidance': 4.0}
  assert protocol.headline_setting([plain, g4, guided], e) == 'topk3_t0.8_g2'
  assert protocol.headline_setting([g4, plain], e) == 'topk3_t0.8'   # none at 2: the unguided one


def test_a_new_key_at_its_default_keeps_old_fingerprints():
  """evaluate.headline_guidance at 1 (and train.class_dropout at 0) leave a fingerprint as it was
  before the key existed, also where a whole section is fingerprinted (shapes: 'evaluate')."""
  from nfjax import config as config_lib
  c = load_config('smoke')
  with c.unlocked():
    del c.evaluate['headline_guidance']
  before = config_lib.fingerprint(c, ('evaluate', 'evaluate.headline_top_k'))
  now = load_config('smoke')
  assert config_lib.fingerprint(now, ('evaluate', 'evaluate.headline_top_k', 'evaluate.headline_guidance')) == before
  moved = load_config('smoke', **{'evaluate.headline_guidance': 2.0})
  assert config_lib.fingerprint(moved, ('evaluate',))['evaluate']['headline_guidance'] == 2.0


def test_too_few_samples_for_the_set_figures_is_warned(smoke_fields, tmp_path, capsys):
  wd = _workdir_with_fields(smoke_fields, tmp_path)
  protocol.write_fake_samples(wd, SETTINGS, num_samples=1)
  s = main.run(load_config('smoke'), wd, 'evaluate')['evaluate']
  out = capsys.readouterr().out
  assert np.isnan(s['settings']['topk3_t0.8']['frechet_distance'])
  assert 'WARNING: 1 sample(s) per setting against 1 reference(s)' in out and 'raise sample.num_samples' in out
  wd2 = _workdir_with_fields(smoke_fields, tmp_path / 'enough')
  protocol.write_fake_samples(wd2, SETTINGS, num_samples=24)
  main.run(load_config('smoke'), wd2, 'evaluate')
  assert 'WARNING: ' not in capsys.readouterr().out
