"""Test setup: 8 fake CPU devices (set before JAX is imported), tiny configs, shared fixtures, the
number of pytest-xdist workers."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent JAX compilation cache for the session, inherited by every process a test starts:
# the tiny configs compile the same programs test after test (each run builds its jitted functions
# anew, so JAX's in-memory cache misses them), and compiling is most of a tiny test's time.
# JAX reads a broken or half-written entry as a miss (a warning) and compiles; the directory is
# removed when the process that made it exits. NFJAX_TEST_COMPILE_CACHE=0 turns it off; an
# explicit JAX_COMPILATION_CACHE_DIR is used as it is.
if os.environ.get('NFJAX_TEST_COMPILE_CACHE', '1') != '0' and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  import atexit
  import shutil
  import tempfile
  _cache_dir = tempfile.mkdtemp(prefix='nfjax-test-jax-cache-')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def load_config(preset='smoke', path='configs/mnist.py', **overrides):
  """get_config(preset) from a config file, with dotted-key overrides: load_config(**{'fit.steps': 5})."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_' + os.path.basename(path)[:-3], os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return apply_overrides(mod.get_config(preset), overrides)


def apply_overrides(config, overrides: dict):
  """Set dotted keys ({'fit.steps': 5}) in place; a key the config lacks is a KeyError. Returns config."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(key)
    node[leaf] = value
  return config


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject.toml's addopts): one worker per core this process may use, at most 4 (each
  worker is a JAX process with 8 fake devices, and many tests start processes of their own)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  return max(1, min(4, cores))


@pytest.fixture
def smoke_config():
  return load_config


@pytest.fixture(scope='session')
def smoke_fields(tmp_path_factory):
  """A finished fit stage on 64 offline MNIST images (smoke preset), shared by the whole session.

  Returns the workdir; the weight dataset is WORKDIR/fields.
  """
  from nfjax.stages import fit
  workdir = str(tmp_path_factory.mktemp('smoke_fields'))
  fit.run(load_config('smoke'), workdir)
  return workdir
