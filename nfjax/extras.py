"""Optional extras: what each one provides, and one error naming the extra when it is missing.

The default install runs the README's command 1 (offline MNIST) and nothing more. Everything else
comes in an extra of pyproject.toml, e.g. `pip install 'nfjax[shapes]'`. Code that needs one
checks it with `require` at config validation (before any work) and imports through `load`, so a
missing module is one line that says which extra to install, never an ImportError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

from nfjax.errors import MissingExtraError

# extra -> (what it is for, the modules nfjax imports from it). Kept in step with pyproject.toml's
# [project.optional-dependencies] (tests/test_packaging.py checks that every extra named here exists).
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    'shapes': ('3D shape fields (mesh files, marching cubes)', ('trimesh', 'skimage')),
    'tfds': ("data.source='tfds' (TensorFlow Datasets)", ('tensorflow_datasets', 'importlib_resources')),
    'gcs': ('a gs:// workdir (Google Cloud Storage)', ('gcsfs',)),
}


def install_hint(extra: str) -> str:
  return f"pip install 'nfjax[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


def missing(extra: str) -> list[str]:
  """The modules of `extra` that cannot be imported here."""
  return [m for m in EXTRAS[extra][1] if importlib.util.find_spec(m) is None]


def _error(extra: str, absent, what: str | None = None) -> MissingExtraError:
  purpose = what or EXTRAS[extra][0]
  return MissingExtraError(f"{purpose} needs the [{extra}] extra, which is not installed (no module "
                           f"{', '.join(map(repr, absent))}): {install_hint(extra)}")


def require(extra: str, what: str | None = None) -> None:
  """MissingExtraError naming `extra` and how to install it, unless all its modules are importable."""
  absent = missing(extra)
  if absent:
    raise _error(extra, absent, what)


def load(module: str, extra: str):
  """import `module` (part of `extra`); MissingExtraError naming the extra when it is not installed."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise _error(extra, [e.name or module]) from e
