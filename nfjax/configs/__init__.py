"""Configs shipped in the package: common.py (the shared sections), checks.py (validation) and the
presets users launch, mnist.py and shapes.py: `--config=mnist:quick` (a bare name) is
nfjax/configs/mnist.py, from any directory and from an installed wheel."""

from __future__ import annotations

import os

from nfjax.errors import ConfigError

PACKAGED = ('mnist', 'shapes')


def config_path(name: str) -> str:
  """The file of a config given as a bare name ('mnist') or a path ('configs/mnist.py').

  A bare name (no '/', no '.py') is a packaged config; anything else is returned as given."""
  if '/' in name or os.sep in name or name.endswith('.py'):
    return name
  if name not in PACKAGED:
    raise ConfigError(f"--config={name}: no packaged config {name!r}; packaged: {', '.join(PACKAGED)} "
                      f"(e.g. --config=mnist:quick), or give a config file's path (e.g. --config=my_config.py:quick)")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')
