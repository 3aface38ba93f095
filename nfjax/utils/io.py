"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np


def _atomic_write_bytes(path: str, data: bytes) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_default) + '\n').encode())


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def write_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  _atomic_write_bytes(path, buf.getvalue())


def write_npz(path: str, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  _atomic_write_bytes(path, buf.getvalue())


def write_bytes(path: str, data: bytes) -> None:
  _atomic_write_bytes(path, data)
