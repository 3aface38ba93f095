"""The pipeline's stages in order, each a module with `run(config, workdir) -> summary dict`."""

from __future__ import annotations

import importlib

from nfjax.errors import NfjaxError

# name -> module. A stage listed here with module None is planned but not built yet.
PIPELINE: dict[str, str | None] = {
    'fit': 'nfjax.fit',
    'tokenize': 'nfjax.tokenize',
    'train': 'nfjax.train',
    'sample': 'nfjax.sample',
    'evaluate': 'nfjax.evaluate.stage',
}


def available() -> list[str]:
  """The stages `--stages=all` runs: every built stage up to the first one not built yet."""
  out = []
  for name, mod in PIPELINE.items():
    if mod is None:
      break
    out.append(name)
  return out


def built() -> list[str]:
  return [name for name, mod in PIPELINE.items() if mod is not None]


def parse(stages: str | None) -> list[str]:
  """'fit,tokenize' -> ['fit', 'tokenize'] in pipeline order; None/'' / 'all' -> every built stage."""
  if not stages or stages == 'all':
    return available()
  names = [s.strip() for s in stages.split(',') if s.strip()]
  for s in names:
    if s not in PIPELINE:
      raise NfjaxError(f"unknown stage {s!r} in --stages; stages are: {', '.join(PIPELINE)}")
    if PIPELINE[s] is None:
      raise NfjaxError(f"stage {s!r} is not implemented yet; built stages: {', '.join(built())}")
  return [s for s in PIPELINE if s in names]


def get(name: str):
  return importlib.import_module(PIPELINE[name])


def validate(config, names: list[str]) -> None:
  """Run every selected stage's config checks before any stage starts working."""
  for name in names:
    mod = get(name)
    if hasattr(mod, 'validate'):
      mod.validate(config)
