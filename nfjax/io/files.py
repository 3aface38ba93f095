"""Every file operation on a workdir path: atomic writes, reads, listings, removal.

This module is the one place that opens, writes, renames and deletes files under a workdir (a
test enforces it), so that remote storage can come in through this seam. Writes are atomic: a
reader never sees a half-written file (temporary file in the same directory, fsync, rename, fsync
of the directory); files get the permissions of the umask (0644 under 022), like any other write.
A file that cannot be read as what it should be (missing, truncated, not JSON / .npy / .npz) is an
`ArtifactError` naming it; a directory that cannot be written is an `NfjaxError` naming it.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any

import numpy as np

from nfjax.errors import ArtifactError, NfjaxError

join = os.path.join
exists = os.path.exists
isdir = os.path.isdir
basename = os.path.basename
dirname = os.path.dirname


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


FILE_MODE = 0o666 & ~_umask()


def _cannot_write(path: str, e: OSError) -> NfjaxError:
  return NfjaxError(f"cannot write {path}: {e.strerror or e}. Use a --workdir you can write to (and with free space)")


def makedirs(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise _cannot_write(path, e) from None


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


def _fsync_dir(d: str) -> None:
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _atomic_write_bytes(path: str, data: bytes) -> None:
  d = os.path.dirname(os.path.abspath(path))
  makedirs(d)
  try:
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  except OSError as e:
    raise _cannot_write(path, e) from None
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    _fsync_dir(d)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise _cannot_write(path, e) from None
    raise


def write_bytes(path: str, data: bytes) -> None:
  _atomic_write_bytes(path, data)


def _missing(path: str) -> ArtifactError:
  return ArtifactError(f"{path} is missing", path)


def read_bytes(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    raise _missing(path) from None
  except OSError as e:
    raise ArtifactError(f"{path} cannot be read: {e.strerror or e}", path) from None


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8', errors='replace')


def append_text(path: str, text: str) -> None:
  """Append to a log-like file (metrics.jsonl): whole lines, each complete when written."""
  makedirs(os.path.dirname(os.path.abspath(path)))
  try:
    with open(path, 'a') as f:
      f.write(text)
  except OSError as e:
    raise _cannot_write(path, e) from None


def open_log(path: str):
  """A text file opened for appending, line-buffered (every complete line reaches the file at once, so a
  killed process keeps what it logged): the launcher's log file."""
  makedirs(os.path.dirname(os.path.abspath(path)))
  try:
    return open(path, 'a', buffering=1, encoding='utf-8')
  except OSError as e:
    raise _cannot_write(path, e) from None


def write_json(path: str, obj: Any) -> None:
  _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_default) + '\n').encode())


def read_json(path: str) -> Any:
  data = read_bytes(path)
  try:
    return json.loads(data)
  except ValueError as e:
    raise ArtifactError(f"{path} is not valid JSON ({e})", path) from None


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file ([] when it does not exist; a torn last line is dropped)."""
  if not os.path.exists(path):
    return []
  lines = read_text(path).splitlines()
  out = []
  for i, ln in enumerate(lines):
    if not ln.strip():
      continue
    try:
      out.append(json.loads(ln))
    except ValueError:
      if i == len(lines) - 1:   # an append cut short by a kill
        break
      raise ArtifactError(f"{path} line {i + 1} is not valid JSON", path) from None
  return out


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
  try:
    return np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
  except FileNotFoundError:
    raise _missing(path) from None
  except (OSError, ValueError, EOFError) as e:
    raise ArtifactError(f"{path} is truncated or damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                        path) from None


def write_npz(path: str, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  _atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str, keys=None) -> dict[str, np.ndarray]:
  """All arrays (or `keys`) of an .npz file, read into memory."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in (z.files if keys is None else keys)}
  except FileNotFoundError:
    raise _missing(path) from None
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise ArtifactError(f"{path} is truncated or damaged ({type(e).__name__}: {str(e)[:120]})", path) from None


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


def walk(directory: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Every file under `directory` as a relative path (sorted), leaving out hidden files (temporaries,
  the lock) and the sub-directories named in `skip`."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith('.'))
    for n in names:
      if not n.startswith('.'):
        out.append(os.path.relpath(os.path.join(root, n), directory))
  return sorted(out)


def size(path: str) -> int:
  return os.path.getsize(path)


def checksum(path: str) -> str:
  """sha256 of a file's bytes (streamed)."""
  h = hashlib.sha256()
  try:
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        h.update(block)
  except FileNotFoundError:
    raise _missing(path) from None
  return h.hexdigest()


def npy_header(path: str) -> tuple[list[int], str] | None:
  """(shape, dtype) of an .npy file from its header, or None when the header is unreadable."""
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read(f)
    return list(shape), np.dtype(dtype).str
  except (OSError, ValueError):
    return None
