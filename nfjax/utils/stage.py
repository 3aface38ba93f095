"""Stage directories: skip finished work, refuse to mix artifacts of different configs."""

from __future__ import annotations

import os

from nfjax.errors import NfjaxError
from nfjax.utils import config as cfg_utils
from nfjax.utils import io


class StageDir:
  """WORKDIR/<name>: its config fingerprint (fingerprint.json) and its summary.json.

  A stage is finished when summary.json exists. A directory made with a different config is never
  reused silently: `claim()` raises with the differing keys.
  """

  def __init__(self, workdir: str, name: str, config, keys):
    self.name = name
    self.path = os.path.join(workdir, name)
    self.fingerprint = cfg_utils.fingerprint(config, keys)

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  @property
  def summary(self) -> dict | None:
    p = self.file('summary.json')
    return io.read_json(p) if os.path.exists(p) else None

  def claim(self) -> None:
    fp_path = self.file('fingerprint.json')
    if os.path.exists(fp_path):
      old = io.read_json(fp_path)
      if old != self.fingerprint:
        changes = '; '.join(cfg_utils.diff(old, self.fingerprint)[:8])
        raise NfjaxError(
            f"{self.path} holds the {self.name} stage of a run with a different config ({changes}). "
            f"Use a new --workdir, or delete {self.path} to redo this stage.")
    else:
      os.makedirs(self.path, exist_ok=True)
      io.write_json(fp_path, self.fingerprint)

  def finished(self) -> dict | None:
    """The summary if this stage already finished with the same config, else None (after claim)."""
    self.claim()
    return self.summary

  def write_summary(self, summary: dict) -> None:
    io.write_json(self.file('summary.json'), summary)
