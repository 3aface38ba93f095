"""The fit stage: quality, sharding/chunking invariance, resume, flags, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from nfjax import main
from nfjax.stages import fit
from nfjax.io import fields as wds
from nfjax.errors import ConfigError, DataError, NfjaxError
from nfjax.fields import fitting, mlp

TINY = {'data.num_fields': 12, 'fit.steps': 40, 'fit.shared_init_steps': 60, 'fit.chunk_size': 12,
        'fit.shared_init_candidates': 2, 'fit.shared_init_probe': 4}


def tiny(**kw):
  return load_config('smoke', **{**TINY, **kw})


def test_fitting_reaches_psnr_floor_on_a_few_images():
  from nfjax.data import images
  config = load_config('smoke', **{'fit.steps': 500})
  data = images.load(config)
  spec = mlp.FieldSpec.from_config(config.field)
  feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28)))
  targets = jnp.asarray(data.images[:4].reshape(4, 784, 1))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = jax.vmap(lambda k: mlp.init(spec, k))(keys)
  fn = jax.jit(jax.vmap(lambda p, t, k: fitting.fit_one(spec, config.fit, 500, p, feats, t, k)))
  params, loss = fn(params, targets, keys)
  recon = mlp.render_images(spec, params, 28, 28)
  psnr = np.asarray(mlp.psnr(recon.reshape(4, -1), targets[..., 0], axis=-1))
  assert np.all(psnr > 22.0), psnr  # random init, 500 full-batch steps
  assert np.all(np.isfinite(np.asarray(loss)))


def _arrays(workdir):
  ds = wds.load(os.path.join(workdir, 'fields'))
  return ds


def test_stage_end_to_end_and_skip(tmp_path):
  config = tiny()
  summary = main.run(config, str(tmp_path), 'fit')['fit']
  for key in ('num_fields', 'params_per_field', 'psnr_mean', 'psnr_p10', 'psnr_min', 'fields_per_sec',
              'seconds', 'device_kind', 'num_devices'):
    assert key in summary
  assert summary['num_fields'] == 12 and summary['params_per_field'] == 561
  assert summary['num_devices'] == 8  # conftest's fake devices, all used by mesh.data=-1
  ds = _arrays(str(tmp_path))
  assert ds.weights.shape == (12, 561) and ds.weights.dtype == np.float32
  assert ds.shared_init.shape == (561,)
  assert np.isfinite(ds.quality).all() and abs(ds.quality.mean() - summary['psnr_mean']) < 1e-4
  # The recorded source indices select the images that were fitted.
  from nfjax.data import images
  full = images._offline_mnist()[0]
  recon = mlp.render_weights(mlp.FieldSpec.from_dict(ds.meta['field']), ds.weights, 28, 28)
  psnr = -10 * np.log10(((recon - full[ds.source_index]) ** 2).mean((1, 2)))
  np.testing.assert_allclose(psnr, ds.quality, atol=1e-3)
  assert os.path.getsize(tmp_path / 'fields' / 'reconstructions.png') > 1000
  assert json.load(open(tmp_path / 'config.json'))['fit']['steps'] == 40
  assert not (tmp_path / 'fields' / 'chunks').exists()
  # Second run: skipped, nothing refitted, same summary.
  again = fit.run(config, str(tmp_path))
  assert again == summary


def test_dataset_readable_with_numpy_only(tmp_path):
  main.run(tiny(), str(tmp_path), 'fit')
  code = (
      "import json, sys, numpy as np\n"
      f"d = {str(tmp_path / 'fields')!r}\n"
      "meta = json.load(open(d + '/meta.json'))\n"
      "w = np.load(d + '/weights.npy')\n"
      "assert w.shape == (meta['num_fields'], meta['params_per_field'])\n"
      "lay = meta['layout']\n"
      "assert sum(e['size'] for e in lay) == w.shape[1]\n"
      "w0 = w[0, lay[0]['offset']:lay[0]['offset'] + lay[0]['size']].reshape(lay[0]['shape'])\n"
      "assert 'jax' not in sys.modules and 'nfjax' not in sys.modules\n"
      "print(w0.shape)\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '(16, 16)'


def test_sharded_chunked_and_single_device_give_same_weights(tmp_path):
  a = tmp_path / 'eight'
  b = tmp_path / 'one_device_small_chunks'
  main.run(tiny(), str(a), 'fit')  # 8 devices, one chunk of 12 (padded to 16)
  main.run(tiny(**{'mesh.data': 1, 'fit.chunk_size': 5}), str(b), 'fit')  # 1 device, chunks 5,5,2
  da, db = _arrays(str(a)), _arrays(str(b))
  assert db.meta['chunk_size'] == 5
  np.testing.assert_allclose(da.shared_init, db.shared_init, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(da.weights, db.weights, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(da.quality, db.quality, atol=1e-2)


def test_random_init_differs_per_field_and_is_batch_independent(tmp_path):
  main.run(tiny(**{'fit.init': 'random', 'mesh.data': 2}), str(tmp_path / 'a'), 'fit')
  main.run(tiny(**{'fit.init': 'random', 'mesh.data': 1, 'fit.chunk_size': 7}), str(tmp_path / 'b'), 'fit')
  da, db = _arrays(str(tmp_path / 'a')), _arrays(str(tmp_path / 'b'))
  assert da.shared_init is None
  np.testing.assert_allclose(da.weights, db.weights, rtol=1e-3, atol=1e-4)
  assert not np.allclose(da.weights[0], da.weights[1])


def test_low_quality_fields_are_flagged_not_mixed_in(tmp_path):
  summary = main.run(tiny(**{'fit.psnr_floor': 99.0}), str(tmp_path), 'fit')['fit']
  ds = _arrays(str(tmp_path))
  assert summary['num_flagged'] == 12
  assert np.all(ds.flags & wds.FLAG_LOW_QUALITY)
  assert len(ds.good()) == 0


def test_divergent_fields_are_flagged_nonfinite(tmp_path):
  summary = main.run(tiny(**{'fit.lr': 1e30, 'fit.init': 'random'}), str(tmp_path), 'fit')['fit']
  ds = _arrays(str(tmp_path))
  assert summary['num_nonfinite'] > 0
  bad = (ds.flags & wds.FLAG_NONFINITE) > 0
  assert np.all(~np.isfinite(ds.weights[bad]).all(1) | ~np.isfinite(ds.quality[bad]))


def test_refit_improves_the_worst_fields(tmp_path):
  summary = main.run(tiny(**{'fit.refit_below': 60.0, 'fit.refit_steps_factor': 3}), str(tmp_path), 'fit')['fit']
  plain = main.run(tiny(), str(tmp_path / 'plain'), 'fit')['fit']
  assert summary['num_refitted'] > 0
  assert summary['psnr_mean'] > plain['psnr_mean']


def test_other_config_in_same_workdir_is_refused(tmp_path):
  main.run(tiny(), str(tmp_path), 'fit')
  with pytest.raises(NfjaxError, match=r'fit.steps: 40 -> 41'):
    main.run(tiny(**{'fit.steps': 41}), str(tmp_path), 'fit')


def test_bad_values_fail_before_work(tmp_path):
  with pytest.raises(ConfigError, match="data.source='floppy'"):
    main.run(tiny(**{'data.source': 'floppy'}), str(tmp_path), 'fit')
  with pytest.raises(ConfigError, match='fit.steps'):
    main.run(tiny(**{'fit.steps': 0}), str(tmp_path), 'fit')
  with pytest.raises(NfjaxError, match="unknown stage 'fitt'"):
    main.run(tiny(), str(tmp_path), 'fitt')
  with pytest.raises(ConfigError, match='mesh'):
    main.run(tiny(**{'mesh.data': 16}), str(tmp_path), 'fit')
  assert not (tmp_path / 'fields').exists()


def test_unavailable_tfds_names_the_offline_source(tmp_path):
  # MNIST through data.source='tfds' is nfjax's own IDX preparation (tests/test_idx_data.py): with no
  # prepared split and data.download=False the fit stage stops before any work, naming the offline source.
  config = tiny(**{'data.source': 'tfds', 'data.download': False, 'data.tfds_data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(DataError, match=r'data.download=False.*--config.data.source=offline'):
    fit.run(config, str(tmp_path))
  assert not (tmp_path / 'fields' / 'weights.npy').exists() and not (tmp_path / 'tfds').exists()


def _launch(args, **kw):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # one CPU device in subprocesses
  return subprocess.Popen([sys.executable, '-m', 'nfjax.main', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_launcher_rejects_misspelled_key(tmp_path):
  p = _launch(['--config=configs/mnist.py:smoke', f'--workdir={tmp_path}', '--config.fit.stepz=5'])
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert 'stepz' in out


def test_kill_and_resume_gives_identical_dataset(tmp_path):
  args = ['--config=configs/mnist.py:smoke', '--stages=fit', '--config.data.num_fields=24',
          '--config.fit.chunk_size=4', '--config.fit.steps=80']   # the fit stage only: it is what is compared
  killed = tmp_path / 'killed'
  p = _launch(args + [f'--workdir={killed}'])
  chunks = killed / 'fields' / 'chunks'
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    if chunks.exists() and len([f for f in os.listdir(chunks) if f.endswith('.npz')]) >= 2:
      break
    time.sleep(0.05)
  assert p.poll() is None, 'the run finished before it could be killed; make it longer'
  p.send_signal(signal.SIGKILL)
  p.wait()
  done_before = len([f for f in os.listdir(chunks) if f.endswith('.npz')])
  assert 2 <= done_before < 6 and not (killed / 'fields' / 'summary.json').exists()
  with pytest.raises(DataError, match='incomplete'):
    wds.load(str(killed / 'fields'))
  p = _launch(args + [f'--workdir={killed}'])
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  assert 'resuming' in out
  full = tmp_path / 'full'
  p = _launch(args + [f'--workdir={full}'])
  out2, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out2
  a, b = wds.load(str(killed / 'fields')), wds.load(str(full / 'fields'))
  for k in wds.ARRAYS:
    np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
  np.testing.assert_array_equal(a.shared_init, b.shared_init)


def _prototypes(workdir):
  from nfjax.io import files
  return files.read_npz(os.path.join(workdir, 'fields', 'prototypes.npz'))


def test_prototypes_start_every_field_from_its_own_class_cluster(tmp_path):
  from nfjax import analysis
  from nfjax.data import images
  from nfjax.fields import stack
  config = tiny(**{'data.num_fields': 30, 'fit.prototypes': 2, 'fit.chunk_size': 8, 'mesh.data': 2})
  main.run(config, str(tmp_path / 'proto'), 'fit')
  main.run(tiny(**{'data.num_fields': 30, 'fit.chunk_size': 8, 'mesh.data': 2}), str(tmp_path / 'plain'), 'fit')
  ds, plain, proto = _arrays(str(tmp_path / 'proto')), _arrays(str(tmp_path / 'plain')), _prototypes(str(tmp_path / 'proto'))
  labels = ds.labels
  counts = np.bincount(labels, minlength=10)
  assert len(proto['weights']) == np.minimum(counts, 2).sum()     # min(K, members) per class
  assert (proto['labels'][proto['of_field']] == labels).all()    # every field's prototype is of its class
  pixels = images.load(config).images.reshape(len(labels), -1)
  for i in range(len(labels)):                                   # ... the nearest mean of that class
    own = np.nonzero(proto['labels'] == labels[i])[0]
    assert proto['of_field'][i] == own[np.argmin(((proto['means'][own] - pixels[i]) ** 2).sum(1))]
  assert np.isfinite(proto['quality']).all() and (proto['quality'] > 12).all()   # fitted to their means
  assert ds.meta['prototypes_per_class'] == 2 and 'prototypes_per_class' not in plain.meta
  np.testing.assert_array_equal(ds.shared_init, plain.shared_init)  # the tokenizer's residual base: unchanged
  # A field is its own fit started from its prototype (the same fitter on that field alone), not the shared init's.
  fitter = analysis.make_fitter(config, (28, 28))
  i = 5
  w, _, _ = fitter.fit(int(config.fit.steps), pixels[[i]].reshape(1, 784, 1), stack.field_keys(0, np.array([i])),
                       proto['weights'][proto['of_field'][[i]]])
  np.testing.assert_allclose(ds.weights[i], w[0], rtol=1e-4, atol=1e-5)
  assert not np.allclose(ds.weights[i], plain.weights[i], atol=1e-3)
  assert (tmp_path / 'proto' / 'fields' / 'prototypes.png').exists()


def test_medoid_prototypes_are_fitted_to_a_real_member_of_their_cluster(tmp_path):
  from nfjax import analysis
  from nfjax.data import images
  from nfjax.fields import stack
  from nfjax.evaluate.image_metrics import psnr
  over = {'data.num_fields': 30, 'fit.prototypes': 2, 'fit.chunk_size': 8}
  config = tiny(**over, **{'fit.prototype_target': 'medoid'})
  main.run(config, str(tmp_path / 'medoid'), 'fit')
  main.run(tiny(**over), str(tmp_path / 'mean'), 'fit')
  med, mean = _prototypes(str(tmp_path / 'medoid')), _prototypes(str(tmp_path / 'mean'))
  # the same clusters and starts; only what each prototype field is fitted to differs
  for k in ('labels', 'means', 'of_field'):
    np.testing.assert_array_equal(med[k], mean[k])
  labels = _arrays(str(tmp_path / 'medoid')).labels
  pixels = images.load(config).images.reshape(len(labels), -1)
  fitter = analysis.make_fitter(config, (28, 28))
  shared = np.load(tmp_path / 'medoid' / 'fields' / 'shared_init.npy')
  for j, (centre, c) in enumerate(zip(med['means'], med['labels'])):
    members = np.nonzero(labels == c)[0]
    medoid = members[np.argmin(((pixels[members] - centre) ** 2).sum(1))]
    # the prototype is the shared init fitted to that image (the fitter on it alone) ...
    w, _, q = fitter.fit(int(config.fit.shared_init_steps), pixels[[medoid]].reshape(1, 784, 1),
                         stack.field_keys(0, np.array([j]), stream=stack.PROTOTYPE_STREAM), shared)
    np.testing.assert_allclose(med['weights'][j], w[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(med['quality'][j], q[0], atol=1e-3)
    # ... so it renders nearer that image than the mean's prototype does, and that one nearer the mean
    # (where the cluster holds more than one image)
    if not np.allclose(centre, pixels[medoid]):
      spec = mlp.FieldSpec.from_config(config.field)
      r_med, r_mean = (mlp.render_weights(spec, x[[j]], 28, 28) for x in (med['weights'], mean['weights']))
      image, blur = pixels[medoid].reshape(1, 28, 28), centre.reshape(1, 28, 28)
      assert psnr(r_med, image)[0] > psnr(r_mean, image)[0] and psnr(r_mean, blur)[0] > psnr(r_med, blur)[0]


def test_prototype_target_auto_leaves_the_fit_fingerprint_as_before_the_key():
  """Fields fitted before fit.prototype_target existed are not fitted again ('auto' is left out)."""
  from nfjax import config as config_lib
  old = tiny(**{'fit.prototypes': 2})
  with old.unlocked():
    del old.fit['prototype_target']
  assert config_lib.fingerprint(tiny(**{'fit.prototypes': 2}), fit.FIT_KEYS) == config_lib.fingerprint(old, fit.FIT_KEYS)
  medoid = config_lib.fingerprint(tiny(**{'fit.prototypes': 2, 'fit.prototype_target': 'medoid'}), fit.FIT_KEYS)
  assert medoid['fit.prototype_target'] == 'medoid'


def test_prototypes_are_read_back_not_made_again(tmp_path):
  from nfjax.io import files
  config = tiny(**{'data.num_fields': 16, 'fit.prototypes': 1, 'fit.chunk_size': 8})
  main.run(config, str(tmp_path / 'a'), 'fit')
  first = _arrays(str(tmp_path / 'a')).weights
  # A run killed after its prototypes were written resumes from that file: move one prototype, and the
  # fields that start from it (only those) come out elsewhere.
  d = tmp_path / 'b' / 'fields'
  main.run(config, str(tmp_path / 'b'), 'fit')
  proto = _prototypes(str(tmp_path / 'b'))
  moved = int(proto['of_field'][0])
  proto['weights'][moved] += 0.05
  for f in ('summary.json', 'manifest.json', 'weights.npy'):
    os.remove(d / f)
  files.write_npz(str(d / 'prototypes.npz'), **proto)
  main.run(config, str(tmp_path / 'b'), 'fit')
  again = _arrays(str(tmp_path / 'b')).weights
  starts_there = proto['of_field'] == moved
  assert not np.allclose(again[starts_there], first[starts_there], atol=1e-4)
  np.testing.assert_allclose(again[~starts_there], first[~starts_there], rtol=1e-5, atol=1e-6)


def test_prototypes_refused_where_they_cannot_apply(tmp_path):
  with pytest.raises(ConfigError, match=r"fit.prototypes=2 .*needs fit.init='shared'"):
    main.run(tiny(**{'fit.prototypes': 2, 'fit.init': 'random'}), str(tmp_path / 'a'), 'fit')
  with pytest.raises(ConfigError, match=r'fit.prototypes=-1'):
    main.run(tiny(**{'fit.prototypes': -1}), str(tmp_path / 'b'), 'fit')
  with pytest.raises(ConfigError, match=r"fit.prototype_target.*'medoid'"):
    main.run(tiny(**{'fit.prototypes': 2, 'fit.prototype_target': 'centre'}), str(tmp_path / 'c'), 'fit')
  assert not any((tmp_path / x / 'fields').exists() for x in 'abc')
