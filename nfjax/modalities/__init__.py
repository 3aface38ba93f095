"""The registry of modalities (kinds of field): images, shapes, and whatever a user registers.

  from nfjax import modalities
  modalities.register(MyModality())          # a new kind of field, no stage edited
  modalities.for_config(config)              # config.data.modality
  modalities.for_fields(fields)              # fields/meta.json `modality`

The built-in modalities are imported lazily on first lookup, so importing the registry is cheap
and a plug-in module may import it to register itself.
"""

from __future__ import annotations

import importlib

from nfjax.errors import ConfigError, DataError
from nfjax.modalities.base import FitData, Modality, Quality, SampleOutput

__all__ = ['FitData', 'Modality', 'Quality', 'SampleOutput', 'register', 'get', 'names', 'for_config',
           'for_fields']

_REGISTRY: dict[str, Modality] = {}
# Built-in modalities: name -> module that registers it when imported.
BUILTIN = {'images': 'nfjax.modalities.images', 'shapes': 'nfjax.modalities.shapes'}


def register(modality: Modality) -> Modality:
  """Add (or replace) a modality under `modality.name`; returns it."""
  if not modality.name:
    raise ValueError("a modality needs a name")
  _REGISTRY[modality.name] = modality
  return modality


def names() -> list[str]:
  return sorted(set(_REGISTRY) | set(BUILTIN))


def get(name: str) -> Modality:
  if name not in _REGISTRY and name in BUILTIN:
    importlib.import_module(BUILTIN[name])
  if name not in _REGISTRY:
    raise KeyError(name)
  return _REGISTRY[name]


def for_config(config) -> Modality:
  """The modality a pipeline config selects with data.modality."""
  if 'data' not in config or 'modality' not in config.data:
    raise ConfigError("config key data.modality does not exist: every pipeline config names its modality "
                      f"({', '.join(names())}); build configs on nfjax/configs/common.py")
  name = str(config.data.modality)
  try:
    return get(name)
  except KeyError:
    raise ConfigError(f"config key data.modality={name!r} is not a registered modality; registered: "
                      f"{', '.join(names())}") from None


def for_fields(fields, config=None) -> Modality:
  """The modality recorded in fields/meta.json; with `config`, it must be the config's too."""
  name = str(fields.meta['modality'])
  if config is not None and 'modality' in config.data and str(config.data.modality) != name:
    raise DataError(f"fields/ holds fields of the {name!r} modality but the config has data.modality="
                    f"{str(config.data.modality)!r}: run with the config the fit stage used (fields/meta.json "
                    f"records its fingerprint)")
  try:
    return get(name)
  except KeyError:
    raise DataError(f"fields/meta.json has modality {name!r}, which is not registered here (registered: "
                    f"{', '.join(names())}); import the module that registers it first") from None
