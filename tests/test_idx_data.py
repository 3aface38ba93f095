"""data.source='tfds' for MNIST / Fashion-MNIST without TensorFlow or TFDS: nfjax downloads the IDX files,
checks them, parses them with numpy and caches the split (nfjax/data/images.py). Offline: the tests write
small IDX files and serve them through a file:// URL."""

import gzip
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from nfjax.data import images
from nfjax.errors import ConfigError, DataError, MissingExtraError

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = (
    'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def idx_bytes(array) -> bytes:
  """An IDX file of unsigned bytes, gzip-compressed, as the MNIST files are."""
  a = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape)
  return gzip.compress(header + a.tobytes(), mtime=0)


def accept(monkeypatch, name, directory):
  """The checksum table, holding the sha256 of the test's files instead of the real ones."""
  table = dict(images.IDX_SHA256)
  for f in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
    if (directory / f).exists():
      table[(name, f)] = hashlib.sha256((directory / f).read_bytes()).hexdigest()
  monkeypatch.setattr(images, 'IDX_SHA256', table)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
  """20 train and 10 test images (real MNIST digits from the shipped subset, so that they can be fitted)
  written as the four IDX .gz files in tmp_path/mirror, accepted by the checksum table."""
  with np.load(images.OFFLINE_MNIST) as f:
    x, y = f['images'], f['labels']
  order = np.random.default_rng(0).permutation(len(x))[:30]   # labels not sorted: file order is visible
  arrays = {'train': (x[order[:20]], y[order[:20]]), 'test': (x[order[20:]], y[order[20:]])}
  d = tmp_path / 'mirror'
  d.mkdir()
  for (img_file, lbl_file), (xs, ys) in zip(((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)),
                                            arrays.values()):
    (d / img_file).write_bytes(idx_bytes(xs))
    (d / lbl_file).write_bytes(idx_bytes(ys))
  accept(monkeypatch, 'mnist', d)
  return d, arrays


def idx_config(tmp_path, url, **kw):
  return load_config('smoke', **{'data.source': 'tfds', 'data.num_fields': -1, 'data.download_url': url,
                                 'data.tfds_data_dir': str(tmp_path / 'tfds'), **kw})


def url_of(directory) -> str:
  return directory.as_uri() + '/'


def test_downloads_checks_parses_and_caches_in_file_order(tmp_path, mirror, capsys):
  d, arrays = mirror
  data = images.load(idx_config(tmp_path, url_of(d)))
  xs, ys = arrays['train']
  assert data.source == 'idx:mnist/train'
  assert data.images.dtype == np.float32 and data.labels.dtype == np.int32
  assert np.array_equal(data.images, (xs.astype(np.float64) / 255.0).astype(np.float32))   # as the offline path
  assert np.array_equal(data.labels, ys) and np.array_equal(data.source_index, np.arange(20))
  assert data.num_classes == int(ys.max()) + 1
  root = tmp_path / 'tfds' / 'nfjax_idx' / 'mnist'
  assert sorted(os.listdir(root)) == sorted([TRAIN_IMAGES, TRAIN_LABELS, 'train.npz'])   # no temporaries left
  assert (root / TRAIN_IMAGES).read_bytes() == (d / TRAIN_IMAGES).read_bytes()
  out = capsys.readouterr().out
  assert f"downloaded {url_of(d)}{TRAIN_IMAGES}: {len((d / TRAIN_IMAGES).read_bytes()):,} bytes" in out
  assert 'prepared mnist train: 20 images' in out
  # Offline: the cache alone, with the .gz files gone and the URL unreachable.
  for f in (TRAIN_IMAGES, TRAIN_LABELS):
    (root / f).unlink()
  again = images.load(idx_config(tmp_path, url_of(tmp_path / 'nowhere'), **{'data.download': False}))
  assert np.array_equal(again.images, data.images) and np.array_equal(again.labels, data.labels)
  assert 'downloaded' not in capsys.readouterr().out
  # The test split, and a seeded subset of it.
  test = images.load(idx_config(tmp_path, url_of(d), **{'data.split': 'test', 'data.num_fields': 4}))
  assert test.source == 'idx:mnist/test' and len(test.images) == 4
  assert np.array_equal(test.labels, arrays['test'][1][test.source_index])


def test_files_placed_by_hand_need_no_network(tmp_path, mirror):
  d, arrays = mirror
  root = tmp_path / 'tfds' / 'nfjax_idx' / 'mnist'
  root.mkdir(parents=True)
  for f in (TRAIN_IMAGES, TRAIN_LABELS):
    (root / f).write_bytes((d / f).read_bytes())
  data = images.load(idx_config(tmp_path, url_of(tmp_path / 'nowhere'), **{'data.download': False}))
  assert np.array_equal(data.labels, arrays['train'][1]) and (root / 'train.npz').exists()


@pytest.mark.parametrize('damage', ['truncated gzip', 'truncated data', 'wrong magic', 'labels for images'])
def test_a_malformed_idx_file_is_a_data_error_naming_it(tmp_path, mirror, monkeypatch, damage):
  d, arrays = mirror
  good = (d / TRAIN_IMAGES).read_bytes()
  raw = gzip.decompress(good)
  bad = {'truncated gzip': good[:len(good) // 2],
         'truncated data': gzip.compress(raw[:-100], mtime=0),
         'wrong magic': gzip.compress(b'\x00\x00\x09\x03' + raw[4:], mtime=0),
         'labels for images': (d / TRAIN_LABELS).read_bytes()}[damage]
  (d / TRAIN_IMAGES).write_bytes(bad)
  accept(monkeypatch, 'mnist', d)
  with pytest.raises(DataError, match=TRAIN_IMAGES) as e:
    images.load(idx_config(tmp_path, url_of(d)))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'tfds' / 'nfjax_idx' / 'mnist' / 'train.npz').exists()


def test_label_count_must_match_the_images(tmp_path, mirror, monkeypatch):
  d, arrays = mirror
  (d / TRAIN_LABELS).write_bytes(idx_bytes(arrays['train'][1][:19]))
  accept(monkeypatch, 'mnist', d)
  with pytest.raises(DataError, match=f'20 images but .*{TRAIN_LABELS} 19 labels'):
    images.load(idx_config(tmp_path, url_of(d)))


def test_a_checksum_mismatch_is_an_error_and_keeps_no_file(tmp_path, mirror, monkeypatch):
  d, _ = mirror
  table = dict(images.IDX_SHA256)
  table[('mnist', TRAIN_IMAGES)] = images.IDX_SHA256[('mnist', TEST_IMAGES)]
  monkeypatch.setattr(images, 'IDX_SHA256', table)
  root = tmp_path / 'tfds' / 'nfjax_idx' / 'mnist'
  with pytest.raises(DataError, match=f'{TRAIN_IMAGES} downloaded from .* has sha256 .*not kept') as e:
    images.load(idx_config(tmp_path, url_of(d)))
  assert '\n' not in str(e.value)
  assert not root.exists() or os.listdir(root) == []
  # A copy already there (placed by hand, or downloaded before) that does not match: named and deleted.
  root.mkdir(parents=True, exist_ok=True)
  (root / TRAIN_IMAGES).write_bytes((d / TRAIN_IMAGES).read_bytes())
  (root / TRAIN_LABELS).write_bytes((d / TRAIN_LABELS).read_bytes())
  with pytest.raises(DataError, match=f'{root / TRAIN_IMAGES} has sha256 .*deleted it'):
    images.load(idx_config(tmp_path, url_of(d), **{'data.download': False}))
  assert not (root / TRAIN_IMAGES).exists() and not (root / 'train.npz').exists()


def test_download_false_without_a_cache_says_how_to_get_it(tmp_path, mirror):
  d, _ = mirror
  with pytest.raises(DataError) as e:
    images.load(idx_config(tmp_path, url_of(d), **{'data.download': False}))
  msg = str(e.value)
  root = str(tmp_path / 'tfds' / 'nfjax_idx' / 'mnist')
  assert 'data.download=False' in msg and '--config.data.download=True' in msg and root in msg
  assert '--config.data.source=offline' in msg and '\n' not in msg
  assert not (tmp_path / 'tfds').exists()


def test_an_unreachable_url_names_the_offline_source_and_where_to_put_the_files(tmp_path, mirror):
  missing = tmp_path / 'no_such_dir'
  with pytest.raises(DataError) as e:
    images.load(idx_config(tmp_path, url_of(missing)))
  msg = str(e.value)
  assert f"the download of {url_of(missing)}{TRAIN_IMAGES} failed" in msg and 'network access' in msg
  assert '--config.data.source=offline' in msg and '5,000 real MNIST images' in msg
  assert f"place {TRAIN_IMAGES} and {TRAIN_LABELS}" in msg and str(tmp_path / 'tfds' / 'nfjax_idx' / 'mnist') in msg
  assert '\n' not in msg
  root = tmp_path / 'tfds' / 'nfjax_idx' / 'mnist'
  assert not root.exists() or os.listdir(root) == []


def test_a_damaged_cache_is_prepared_again(tmp_path, mirror):
  d, arrays = mirror
  config = idx_config(tmp_path, url_of(d))
  images.load(config)
  cache = tmp_path / 'tfds' / 'nfjax_idx' / 'mnist' / 'train.npz'
  cache.write_bytes(cache.read_bytes()[:100])
  assert np.array_equal(images.load(config).labels, arrays['train'][1])
  assert images.load(config).images.shape == (20, 28, 28)


def test_mnist_needs_no_tfds_extra_other_tfds_datasets_do(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  for name in images.IDX_DATASETS:
    images.validate(idx_config(tmp_path, '', **{'data.name': name}))
  with pytest.raises(MissingExtraError, match=r"needs the \[tfds\] extra"):
    images.validate(idx_config(tmp_path, '', **{'data.name': 'cifar10'}))
  with pytest.raises(ConfigError, match='data.split'):
    images.validate(idx_config(tmp_path, '', **{'data.split': 'train[:10%]'}))
  with pytest.raises(ConfigError, match='data.tfds_data_dir'):
    images.validate(idx_config(tmp_path, '', **{'data.tfds_data_dir': 'gs://bucket/tfds'}))
  assert images._base_url('mnist', '') == 'https://storage.googleapis.com/cvdf-datasets/mnist/'
  assert images._base_url('mnist', 'file:///m') == 'file:///m/'


def test_fashion_mnist_comes_from_its_own_url_and_checksums(tmp_path, mirror, monkeypatch):
  d, arrays = mirror
  # The real table rejects the test's files under fashion_mnist's name too.
  with pytest.raises(DataError, match='not kept'):
    images.load(idx_config(tmp_path, url_of(d), **{'data.name': 'fashion_mnist'}))
  accept(monkeypatch, 'fashion_mnist', d)
  data = images.load(idx_config(tmp_path, url_of(d), **{'data.name': 'fashion_mnist'}))
  assert data.source == 'idx:fashion_mnist/train' and np.array_equal(data.labels, arrays['train'][1])
  assert (tmp_path / 'tfds' / 'nfjax_idx' / 'fashion_mnist' / 'train.npz').exists()
  assert images.IDX_URLS['fashion_mnist'] != images.IDX_URLS['mnist']


def test_the_fit_stage_runs_on_idx_data(tmp_path, mirror):
  from nfjax.io import fields as field_io
  from nfjax.stages import fit
  d, arrays = mirror
  kw = {'fit.steps': 40, 'fit.shared_init_steps': 60, 'fit.chunk_size': 12, 'fit.shared_init_candidates': 2,
        'fit.shared_init_probe': 4}
  workdir = str(tmp_path / 'wd')
  summary = fit.run(idx_config(tmp_path, url_of(d), **kw), workdir)
  assert summary['num_fields'] == 20 and summary['source'] == 'idx:mnist/train'
  ds = field_io.load(os.path.join(workdir, 'fields'))
  assert ds.meta['source'] == 'idx:mnist/train'
  assert np.array_equal(ds.labels, arrays['train'][1]) and np.array_equal(ds.source_index, np.arange(20))
  # Where the files come from is not part of the fingerprint: another (here unreachable) URL, the stage is done.
  again = fit.run(idx_config(tmp_path, url_of(tmp_path / 'nowhere'), **kw), workdir)
  assert again == summary
  # Later stages read the images from the cache, offline.
  assert images.load(idx_config(tmp_path, url_of(tmp_path / 'nowhere'), **kw)).source == ds.meta['source']


def test_the_launcher_reports_an_unreachable_url_in_one_line(tmp_path):
  missing = tmp_path / 'no_such_dir'
  env = dict(os.environ, XLA_FLAGS='')
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=mnist:smoke', f'--workdir={tmp_path / "wd"}',
                      '--config.data.source=tfds', f'--config.data.download_url={url_of(missing)}',
                      f'--config.data.tfds_data_dir={tmp_path / "tfds"}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  assert 'Traceback' not in p.stderr
  errors = [ln for ln in p.stderr.splitlines() if 'error:' in ln]
  assert len(errors) == 1 and 'failed' in errors[0] and '--config.data.source=offline' in errors[0], p.stderr
