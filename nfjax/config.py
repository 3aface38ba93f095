"""Config key helpers: checks whose messages name the key, fingerprints of config sections (the checks
themselves: nfjax/configs/checks.py)."""

from __future__ import annotations

import json
from typing import Any, Iterable

import ml_collections

from nfjax.errors import ConfigError


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    if part not in node:
      raise ConfigError(f"config key {key!r} does not exist")
    node = node[part]
  return node


def check_choice(config, key: str, choices: Iterable[Any]) -> Any:
  value = get(config, key)
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"config key {key}={value!r} is not one of {', '.join(map(repr, choices))}")
  return value


def check_positive(config, key: str, allow_zero: bool = False, allow_minus_one: bool = False):
  value = get(config, key)
  ok = value >= 0 if allow_zero else value > 0
  if allow_minus_one and value == -1:
    ok = True
  if not ok:
    what = ">= 0" if allow_zero else "> 0"
    extra = " (or -1 for all)" if allow_minus_one else ""
    raise ConfigError(f"config key {key}={value!r} must be {what}{extra}")
  return value


def to_dict(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort(sort_keys=True))
  return config


# Keys that choose how a result is computed, not the result (to float rounding): left out of every
# fingerprint, so they may change between a run and its resumption, and a workdir made before they
# existed is still the same config. data.download_url: where the sha256-checked IDX files come from.
NOT_FINGERPRINTED = ('model.attention', 'data.download_url')
# Keys left out of the fingerprint while they have this value (their default, which computes what the
# pipeline computed before the key existed): a workdir made before them is still the same config,
# and a config without the key at all is that default (also inside a fingerprinted section, e.g.
# 'evaluate' for shapes). train.class_dropout, evaluate.headline_guidance: classifier-free guidance;
# fit.matmul_precision: 'highest' is what a CPU always computed; fit.anchor: 0 is no pull;
# evaluate.classifier.packaged: a cached classifier is used whatever its origin.
OMITTED_AT = {'train.class_dropout': 0.0, 'fit.matmul_precision': 'highest', 'fit.anchor': 0.0, 'fit.prototypes': 0, 'fit.prototype_target': 'auto', 'tokenize.drop_constant': False, 'tokenize.condition': 'class', 'model.class_bias_init': 'zeros', 'model.class_bias_prior': 0.0, 'evaluate.headline_guidance': 1.0,
              'evaluate.classifier.packaged': True, 'sample.support': 'all'}


def fingerprint(config, keys: Iterable[str]) -> dict:
  """The parts of the config a stage's artifacts depend on, as a plain dict (NOT_FINGERPRINTED left out,
  OMITTED_AT keys left out at their default)."""
  out = {}
  for key in keys:
    if key in OMITTED_AT:
      section, _, leaf = key.rpartition('.')
      if section not in config or leaf not in config[section] or get(config, key) == OMITTED_AT[key]:
        continue
    value = get(config, key)
    out[key] = to_dict(value) if isinstance(value, ml_collections.ConfigDict) else value
  for skip in NOT_FINGERPRINTED:
    section, _, leaf = skip.rpartition('.')
    if isinstance(out.get(section), dict):
      out[section].pop(leaf, None)
    out.pop(skip, None)
  for key, default in OMITTED_AT.items():
    section, _, leaf = key.rpartition('.')
    if isinstance(out.get(section), dict) and leaf in out[section] and out[section][leaf] == default:
      out[section].pop(leaf)
  return json.loads(json.dumps(out, sort_keys=True, default=list))


def diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  """Human-readable differences between two nested dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<missing>'), new.get(k, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def to_json(config) -> str:
  """The whole config as canonical JSON (a key for 'same config')."""
  return json.dumps(to_dict(config), sort_keys=True, default=list)
