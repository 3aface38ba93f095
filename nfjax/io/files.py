"""Every file operation on a workdir path: atomic writes, reads, listings, removal.

This module is the one place that opens, writes, renames and deletes files under a workdir (a
test enforces it), so that remote storage can come in through this seam. Writes are atomic: a
reader never sees a half-written file (temporary file in the same directory, fsync, rename).
"""

from __future__ import annotations

import glob as _glob
import io
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

join = os.path.join
exists = os.path.exists
isdir = os.path.isdir
basename = os.path.basename
dirname = os.path.dirname


def makedirs(path: str) -> None:
  os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def glob(pattern: str) -> list[str]:
  return sorted(_glob.glob(pattern))


def remove(path: str) -> None:
  """Delete a file or a directory tree; nothing there is fine."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


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


def write_bytes(path: str, data: bytes) -> None:
  _atomic_write_bytes(path, data)


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def append_text(path: str, text: str) -> None:
  """Append to a log-like file (metrics.jsonl): whole lines, each complete when written."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_default) + '\n').encode())


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


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


def read_npy(path: str, mmap: bool = False) -> np.ndarray:
  return np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)


def write_npz(path: str, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  _atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str, keys=None) -> dict[str, np.ndarray]:
  """All arrays (or `keys`) of an .npz file, read into memory."""
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in (z.files if keys is None else keys)}


def write_png(path: str, image) -> None:
  """A PIL image -> PNG file."""
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  _atomic_write_bytes(path, buf.getvalue())


def write_figure(path: str, fig, dpi: int = 90) -> None:
  """A matplotlib figure -> PNG file (the figure is closed)."""
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  plt.close(fig)
  _atomic_write_bytes(path, buf.getvalue())


def write_gif(path: str, frames, duration: int = 80) -> None:
  """PIL images -> a looping GIF."""
  buf = io.BytesIO()
  frames[0].save(buf, format='GIF', save_all=True, append_images=list(frames[1:]), duration=duration, loop=0)
  _atomic_write_bytes(path, buf.getvalue())
