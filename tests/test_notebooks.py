"""The Colab notebooks (colab/*.ipynb) run end to end on the smoke preset, so they cannot rot.

Each notebook is executed with nbclient in a fresh kernel. Its "parameters" cell reads
NFJAX_NOTEBOOK_PRESET / NFJAX_NOTEBOOK_WORKDIR, set here to `smoke` and one temporary workdir shared
by all notebooks: quickstart.ipynb runs the whole pipeline, fields.ipynb and generate.ipynb reuse the
stages it finished (the launcher skips them). The kernel sees one CPU device (as a Colab CPU runtime),
not the 8 fake devices of conftest.py.
"""

import os
import re
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


def _kernel_env(workdir):
  env = dict(os.environ)
  env['NFJAX_NOTEBOOK_PRESET'] = 'smoke'
  env['NFJAX_NOTEBOOK_WORKDIR'] = workdir
  env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
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
  assert f'colab.research.google.com/github/OWNER/nfjax/blob/main/colab/{name}.ipynb' in nb.cells[0].source


@pytest.fixture(scope='module')
def notebook_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('notebooks') / 'smoke')


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_on_the_smoke_preset(name, notebook_workdir, tmp_path):
  nb = _read(name)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  t0 = time.perf_counter()
  try:
    client.execute(env=_kernel_env(notebook_workdir))
  except nbclient.exceptions.CellExecutionError as e:  # the failing cell and its traceback
    pytest.fail(f'{name}.ipynb failed:\n{e}')
  seconds = time.perf_counter() - t0
  outputs = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if o.output_type in ('display_data', 'execute_result')
            and any(k.startswith('image/') for k in o.get('data', {}))]
  assert len(images) >= {'quickstart': 5, 'fields': 6, 'generate': 4}[name], f'{name}.ipynb showed {len(images)} images'
  text = '\n'.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'nfjax from' in text and 'smoke' in text
  if name == 'quickstart':
    for stage_dir in ('fields', 'tokenizer', 'transformer', 'samples', 'eval'):
      assert os.path.exists(os.path.join(notebook_workdir, stage_dir, 'summary.json'))
    tables = [o for o in outputs if 'text/html' in o.get('data', {}) and '<table>' in o['data']['text/html']]
    assert len(tables) >= 2 and 'class_accuracy' in tables[-1]['data']['text/html']
  if name == 'generate':
    assert 'temperature 1.5' in text
  print(f'{name}.ipynb: {seconds:.1f}s', file=sys.stderr)
