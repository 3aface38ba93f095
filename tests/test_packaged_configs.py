"""Configs ship inside the package: `--config=mnist:quick` (a bare name) is nfjax/configs/mnist.py,
from any directory; `--config=configs/mnist.py:quick` keeps working in a checkout."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_config

from nfjax import configs, notebook
from nfjax.errors import ConfigError


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


@pytest.mark.parametrize('name,presets', [('mnist', ('smoke', 'quick', 'parity')), ('shapes', ('smoke', 'quick'))])
def test_the_checkout_file_is_the_packaged_config(name, presets):
  assert configs.config_path(name) == os.path.join(ROOT, 'nfjax', 'configs', f'{name}.py')
  for preset in presets:
    via_checkout = load_config(preset, f'configs/{name}.py').to_dict()
    via_package = load_config(preset, os.path.relpath(configs.config_path(name), ROOT)).to_dict()
    assert via_checkout == via_package
    assert notebook.get_config(f'{name}:{preset}').to_dict() == via_package


def test_paths_are_left_as_given_and_an_unknown_name_is_one_config_error():
  assert configs.config_path('configs/mnist.py') == 'configs/mnist.py'
  assert configs.config_path('my.py') == 'my.py'
  with pytest.raises(ConfigError, match=r"no packaged config 'mnst'; packaged: mnist, shapes"):
    configs.config_path('mnst')


def test_launcher_takes_a_bare_name_from_any_directory(tmp_path):
  """Run from a directory with no configs/ folder: the packaged config is found and the fit runs."""
  work = tmp_path / 'w'
  args = ['--config=mnist:smoke', f'--workdir={work}', '--stages=fit', '--config.data.num_fields=8',
          '--config.fit.steps=5', '--config.fit.shared_init_steps=5', '--config.fit.shared_init_candidates=1',
          '--config.fit.refit_below=0', '--config.fit.chunk_size=8']
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', *args], cwd=tmp_path, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads((work / 'fields' / 'summary.json').read_text())['num_fields'] == 8


def test_launcher_names_the_packaged_configs_for_an_unknown_name(tmp_path):
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', '--config', 'mnst:quick', f'--workdir={tmp_path}'],
                     cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  assert 'Traceback' not in p.stderr
  assert "nfjax: error: --config=mnst: no packaged config 'mnst'; packaged: mnist, shapes" in p.stderr
