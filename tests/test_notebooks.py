"""The Colab notebooks (colab/*.ipynb) run end to end on the smoke preset, so they cannot rot, and
their install cell runs as a user's does: from a wheel built from this checkout, into a fresh
virtualenv, in a kernel started outside the checkout.

The module fixture builds the wheel (`pip wheel --no-deps`), makes a virtualenv with only ipykernel in
it and a kernelspec for it. Each notebook is executed with nbclient in a fresh kernel of that
virtualenv; the install cell reads NFJAX_PACKAGE (the wheel) in place of REPO_URL, and quickstart's,
run first, pip installs nfjax and its dependencies there (the default install: no extras on a CPU).
The "parameters" cell reads NFJAX_NOTEBOOK_PRESET / NFJAX_NOTEBOOK_WORKDIR, set here to `smoke` and
one temporary workdir shared by all notebooks: quickstart.ipynb runs the whole pipeline, fields.ipynb
and generate.ipynb reuse the stages it finished (the launcher skips them). The kernel sees one CPU
device (as a Colab CPU runtime), not the 8 fake devices of conftest.py.
"""

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

COLAB = os.path.join(ROOT, 'colab')
NOTEBOOKS = ('quickstart', 'fields', 'generate')   # execution order: later ones reuse the workdir
CELL_TIMEOUT = 600


def _read(name):
  return nbformat.read(os.path.join(COLAB, f'{name}.ipynb'), as_version=4)


def _kernel_env(workdir, wheel):
  env = dict(os.environ)
  env['NFJAX_NOTEBOOK_PRESET'] = 'smoke'
  env['NFJAX_NOTEBOOK_WORKDIR'] = workdir
  env['NFJAX_PACKAGE'] = wheel
  env.pop('PYTHONPATH', None)   # nfjax comes from the wheel, not from this checkout
  env.pop('VIRTUAL_ENV', None)
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', '')).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('MPLBACKEND', None)
  return env


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stored_clean_with_a_parameters_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code), f'{name}.ipynb is stored with outputs'
  params = [c for c in code if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1 and code.index(params[0]) == 0, 'the first code cell must be the one tagged "parameters"'
  for var in ('NFJAX_NOTEBOOK_PRESET', 'NFJAX_NOTEBOOK_WORKDIR'):
    assert var in params[0].source
  # Logic lives in the package: notebooks call functions, they do not define them.
  assert not any(re.search(r'^\s*(def|class)\s', c.source, re.M) for c in code), f'{name}.ipynb defines functions'
  # The install cell: the repository URL is a form parameter, and the Colab badge opens the
  # notebook of that same repository (a fork changes both).
  install = code[1].source
  repo = re.search(r"^REPO_URL = '(https://github\.com/([^/']+/[^/']+))'  # @param", install, re.M)
  assert repo, 'the install cell must start from a REPO_URL form parameter'
  assert f'colab.research.google.com/github/{repo.group(2)}/blob/main/colab/{name}.ipynb' in nb.cells[0].source
  for runtime in ("'tpu'", "'cuda12'", 'NFJAX_PACKAGE'):
    assert runtime in install


@pytest.fixture(scope='module')
def notebook_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('notebooks') / 'smoke')


@pytest.fixture(scope='module')
def wheel_kernel(tmp_path_factory):
  """(kernel name, wheel): a wheel of this checkout, and a kernelspec for a fresh virtualenv that
  has ipykernel and nothing of nfjax."""
  base = tmp_path_factory.mktemp('wheel_venv')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  def pip(*args, python=sys.executable):
    p = subprocess.run([python, '-m', 'pip', *args], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f'pip {" ".join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
  pip('wheel', '-q', '--no-deps', '-w', str(base / 'dist'), ROOT)
  (wheel,) = glob.glob(str(base / 'dist' / 'nfjax-*.whl'))
  subprocess.run([sys.executable, '-m', 'venv', str(base / 'venv')], check=True, env=env, timeout=300)
  python = str(base / 'venv' / 'bin' / 'python')
  pip('install', '-q', 'ipykernel', python=python)
  spec_dir = base / 'jupyter' / 'kernels' / 'nfjax-wheel'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps(
      {'argv': [python, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
       'display_name': 'nfjax wheel venv', 'language': 'python'}))
  old = os.environ.get('JUPYTER_PATH')
  os.environ['JUPYTER_PATH'] = os.pathsep.join([str(base / 'jupyter')] + ([old] if old else []))
  yield 'nfjax-wheel', wheel, str(base / 'venv')
  if old is None:
    os.environ.pop('JUPYTER_PATH', None)
  else:
    os.environ['JUPYTER_PATH'] = old


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_on_the_smoke_preset(name, notebook_workdir, wheel_kernel, tmp_path):
  kernel, wheel, venv = wheel_kernel
  nb = _read(name)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel,
                                   resources={'metadata': {'path': str(tmp_path)}})
  t0 = time.perf_counter()
  try:
    client.execute(env=_kernel_env(notebook_workdir, wheel))
  except nbclient.exceptions.CellExecutionError as e:  # the failing cell and its traceback
    pytest.fail(f'{name}.ipynb failed:\n{e}')
  seconds = time.perf_counter() - t0
  outputs = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if o.output_type in ('display_data', 'execute_result')
            and any(k.startswith('image/') for k in o.get('data', {}))]
  assert len(images) >= {'quickstart': 5, 'fields': 6, 'generate': 4}[name], f'{name}.ipynb showed {len(images)} images'
  text = '\n'.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'smoke' in text
  where = re.search(r'^nfjax from (.+)$', text, re.M)
  assert where and where.group(1).startswith(venv) and 'site-packages' in where.group(1), text[:2000]
  if name == 'quickstart':   # the first notebook installs the wheel; the others find it installed
    assert re.search(r'^pip install nfjax @ file://.*\.whl$', text, re.M), text[:2000]
  else:
    assert 'pip install' not in text
  if name == 'quickstart':
    for stage_dir in ('fields', 'tokenizer', 'transformer', 'samples', 'eval'):
      assert os.path.exists(os.path.join(notebook_workdir, stage_dir, 'summary.json'))
    tables = [o for o in outputs if 'text/html' in o.get('data', {}) and '<table>' in o['data']['text/html']]
    assert len(tables) >= 2 and 'class_accuracy' in tables[-1]['data']['text/html']
  if name == 'generate':
    assert 'temperature 1.5' in text
  print(f'{name}.ipynb: {seconds:.1f}s', file=sys.stderr)
