"""Every file operation on a workdir path: atomic writes, reads, listings, removal.

This module is the one place that opens, writes, renames and deletes files under a workdir (a
test enforces it), so that remote storage comes in through this seam. Writes are atomic: a
reader never sees a half-written file (temporary file in the same directory, fsync, rename, fsync
of the directory); files get the permissions of the umask (0644 under 022), like any other write.
A file that cannot be read as what it should be (missing, truncated, not JSON / .npy / .npz) is an
`ArtifactError` naming it; a directory that cannot be written is an `NfjaxError` naming it.

Workdirs in Google Cloud Storage (`gs://bucket/path`, the [gcs] extra): every function below takes
such a path too and goes through gcsfs (fsspec, the layer `etils.epath` and so Orbax use). An
object upload is atomic (an object appears only complete), so a write is one whole-object upload,
no temporary object and no rename; an append (metrics.jsonl) rewrites the whole object; the launch's
log file is uploaded whole every LOG_UPLOAD_SECONDS and when it closes; directories are prefixes
(`makedirs` does nothing). `check_workdir` refuses any other scheme, or gs:// without the extra,
before any work. `STORAGE_EMULATOR_HOST` (a local GCS emulator) is passed on to tensorstore (Orbax's
checkpoints) as TENSORSTORE_GCS_HTTP_URL with a placeholder token, and turns off gcsfs's gRPC
bucket-layout probe, which an emulator does not answer (`configure_emulator`).
Local paths take exactly the code paths they took before (a `'://' in path` test first).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import zipfile
from typing import Any

import numpy as np

from nfjax import extras
from nfjax.errors import ArtifactError, NfjaxError

join = os.path.join
basename = os.path.basename
dirname = os.path.dirname


def exists(path) -> bool:
  return _fs().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _fs().isdir(path) if is_remote(path) else os.path.isdir(path)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


FILE_MODE = 0o666 & ~_umask()
_writes = True   # False on the processes of a multi-process run that do not write (nfjax/processes.py)


def writes_allowed(on: bool) -> None:
  """Whether this process writes: in a multi-process run only process 0 does (nfjax/processes.py);
  the others' makedirs, writes, appends and removals do nothing."""
  global _writes
  _writes = bool(on)


def _cannot_write(path: str, e: OSError) -> NfjaxError:
  return NfjaxError(f"cannot write {path}: {e.strerror or e}. Use a --workdir you can write to (and with free space)")


def free_bytes(path: str) -> int | None:
  """Bytes free on the local disk that holds `path` (or its nearest existing parent); None for a URL or
  when the system cannot say."""
  if is_remote(path):
    return None
  p = os.path.abspath(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    return shutil.disk_usage(p).free
  except OSError:
    return None


def makedirs(path: str) -> None:
  if is_remote(path) or not _writes:
    return   # an object store has no directories: a prefix exists once an object is written under it
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise _cannot_write(path, e) from None


def listdir(path: str) -> list[str]:
  if is_remote(path):
    fs = _fs()
    if not fs.isdir(path):
      return []
    here = path.split('://', 1)[1].rstrip('/')
    return sorted({p.rstrip('/').rsplit('/', 1)[-1] for p in fs.ls(path, detail=False) if p.rstrip('/') != here})
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def glob(pattern: str) -> list[str]:
  if is_remote(pattern):
    return sorted(_url(p) for p in _fs().glob(pattern))
  return sorted(_glob.glob(pattern))


def remove(path: str) -> None:
  """Delete a file or a directory tree; nothing there is fine."""
  if not _writes:
    return
  if is_remote(path):
    return _r_remove(path)
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
  if not _writes:
    return
  if is_remote(path):
    return _r_write(path, data)
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
  if is_remote(path):
    return _r_read(path)
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
  if not _writes:
    return
  if is_remote(path):
    return _r_append(path, text)
  makedirs(os.path.dirname(os.path.abspath(path)))
  try:
    with open(path, 'a') as f:
      f.write(text)
  except OSError as e:
    raise _cannot_write(path, e) from None


def open_log(path: str):
  """A text file opened for appending, line-buffered (every complete line reaches the file at once, so a
  killed process keeps what it logged): the launcher's log file."""
  if is_remote(path):
    return _RemoteLog(path)
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
  if not exists(path):
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
  if is_remote(path):   # no memory map of an object: read it whole
    path_or_buf = io.BytesIO(_r_read(path))
  else:
    path_or_buf = path
  try:
    return np.load(path_or_buf, mmap_mode='r' if mmap and path_or_buf is path else None, allow_pickle=False)
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
  src = io.BytesIO(_r_read(path)) if is_remote(path) else path
  try:
    with np.load(src, allow_pickle=False) as z:
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
  if is_remote(directory):
    return _r_walk(directory, skip)
  out = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith('.'))
    for n in names:
      if not n.startswith('.'):
        out.append(os.path.relpath(os.path.join(root, n), directory))
  return sorted(out)


def size(path: str) -> int:
  if is_remote(path):
    return int(_fs().size(path))
  return os.path.getsize(path)


def checksum(path: str) -> str:
  """sha256 of a file's bytes (streamed)."""
  if is_remote(path):
    return hashlib.sha256(_r_read(path)).hexdigest()
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
  if is_remote(path):
    return _npy_header(io.BytesIO(_r_read(path)))
  try:
    with open(path, 'rb') as f:
      return _npy_header(f)
  except OSError:
    return None


def _npy_header(f) -> tuple[list[int], str] | None:
  try:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return list(shape), np.dtype(dtype).str
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------------------------------
# Remote workdirs (gs://): the scheme check, the emulator settings and the object-store operations.

REMOTE_SCHEMES = ('gs',)
LOG_UPLOAD_SECONDS = 5.0   # the launch's log file in a bucket: uploaded whole at most this often (and at close)


def is_remote(path) -> bool:
  return '://' in str(path)


def scheme(path) -> str:
  """'gs' for gs://bucket/x, '' for a local path."""
  return str(path).split('://', 1)[0].lower() if is_remote(path) else ''


def expand(path: str) -> str:
  """A local path with its leading `~` or `~user` expanded (a shell leaves the `~` of `--workdir=~/runs`
  as it is); a URL, or a path without one, as it is."""
  return path if is_remote(path) else os.path.expanduser(path)


def absolute(path: str) -> str:
  """os.path.abspath for a local path (its `~` expanded); a URL as it is."""
  return path if is_remote(path) else os.path.abspath(expand(path))


def check_workdir(path: str) -> None:
  """One clear error, before any work, for a workdir nfjax cannot write: a scheme other than gs://, or
  gs:// without the [gcs] extra (gcsfs). Local paths pass untouched."""
  if not is_remote(path):
    return
  s = scheme(path)
  if s not in REMOTE_SCHEMES:
    raise NfjaxError(f"--workdir={path}: nfjax writes workdirs on a local (or mounted) path or in Google Cloud "
                     f"Storage (gs://bucket/path), not {s}://. Use a local --workdir (and copy the results), or a "
                     f"gs:// one")
  if not path[len(s) + 3:].strip('/'):
    raise NfjaxError(f"--workdir={path}: name a bucket, e.g. gs://my-bucket/runs/quick")
  extras.require('gcs', f"a gs:// workdir ({path})")
  _fs()


def configure_emulator() -> str | None:
  """With STORAGE_EMULATOR_HOST set (a local GCS emulator, e.g. http://127.0.0.1:9023), point the libraries
  that do not read it at the same place: tensorstore (Orbax's checkpoints) reads TENSORSTORE_GCS_HTTP_URL and
  gets a placeholder token (GOOGLE_AUTH_TOKEN_FOR_TESTING) instead of looking for credentials; gcsfs skips
  its gRPC bucket-layout probe (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false). Variables already set win.
  Returns the emulator URL (None without one). Called before gcsfs is first imported."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if host in ('', 'default'):
    return None
  url = host if host.startswith(('http://', 'https://')) else 'http://' + host
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'nfjax-emulator')
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  return url


_gcs = None


def _fs():
  """The gcsfs filesystem (no listing cache: Orbax writes through tensorstore, behind gcsfs's back)."""
  global _gcs
  if _gcs is None:
    configure_emulator()
    gcsfs = extras.load('gcsfs', 'gcs')
    _gcs = gcsfs.GCSFileSystem(use_listings_cache=False)
  return _gcs


def _url(p: str) -> str:
  """A gcsfs path ('bucket/x') as a gs:// URL."""
  return p if is_remote(p) else 'gs://' + p.lstrip('/')


def _remote_error(path: str, e: Exception) -> NfjaxError:
  bucket = path.split('://', 1)[-1].split('/', 1)[0]
  why = (f"no bucket {bucket!r} (or it is not visible with these credentials)" if isinstance(e, FileNotFoundError)
         else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
  return NfjaxError(f"cannot write {path}: {why}. Use a --workdir in a bucket you can write to (credentials: "
                    f"gcloud auth application-default login; an emulator: STORAGE_EMULATOR_HOST)")


_appended: dict[str, bytearray] = {}   # gs:// files appended to by this process: their whole contents


def _forget(path: str) -> None:
  prefix = path.rstrip('/') + '/'
  for k in [k for k in list(_appended) if k == path or k.startswith(prefix)]:
    del _appended[k]


def _r_write(path: str, data: bytes) -> None:
  _forget(path)
  try:
    _fs().pipe_file(path, bytes(data))   # one object upload: it appears whole or not at all
  except OSError as e:
    raise _remote_error(path, e) from None


def _r_read(path: str) -> bytes:
  try:
    return _fs().cat_file(path)
  except FileNotFoundError:
    raise _missing(path) from None
  except OSError as e:
    raise ArtifactError(f"{path} cannot be read: {e}", path) from None


def _r_remove(path: str) -> None:
  _forget(path)
  fs = _fs()
  try:
    if fs.isdir(path):
      fs.rm(path, recursive=True)
    elif fs.exists(path):
      fs.rm_file(path)
  except FileNotFoundError:
    pass


def _r_append(path: str, text: str) -> None:
  """An append to an object: the whole object written again (what this process appended, after what the
  object held when it first appended to it)."""
  if path not in _appended:
    _appended[path] = bytearray(_r_read(path) if _fs().exists(path) else b'')
  buf = _appended[path]
  buf += text.encode('utf-8')
  try:
    _fs().pipe_file(path, bytes(buf))
  except OSError as e:
    raise _remote_error(path, e) from None


class _RemoteLog:
  """A log file in a bucket: lines are kept and the whole object uploaded at most every LOG_UPLOAD_SECONDS
  (and on flush / close), so a killed job loses at most the last few seconds of its log. The first upload
  (when it opens) raises NfjaxError for a bucket that cannot be written; a later failed upload is retried
  at the next one (the console has every line)."""

  def __init__(self, path: str):
    self.path, self._text, self._last, self.closed = path, [], 0.0, False
    self._lock = threading.Lock()
    try:
      self._upload()
    except OSError as e:
      raise _remote_error(path, e) from None

  def write(self, text: str) -> int:
    if self.closed:
      raise ValueError(f"{self.path} is closed")
    with self._lock:
      self._text.append(text)
    if time.monotonic() - self._last >= LOG_UPLOAD_SECONDS:
      self._try_upload()
    return len(text)

  def _upload(self) -> None:
    with self._lock:
      data = ''.join(self._text).encode('utf-8')
      self._last = time.monotonic()
    _fs().pipe_file(self.path, data)

  def _try_upload(self) -> None:
    try:
      self._upload()
    except Exception:  # noqa: BLE001 - gcsfs / aiohttp raise many kinds; retried at the next upload
      pass

  def flush(self) -> None:
    if not self.closed:
      self._try_upload()

  def close(self) -> None:
    if not self.closed:
      self._try_upload()
      self.closed = True


def _r_walk(directory: str, skip: tuple[str, ...]) -> list[str]:
  fs = _fs()
  if not fs.isdir(directory):
    return []
  root = directory.split('://', 1)[1].rstrip('/') + '/'
  out = []
  for p in fs.find(directory):
    rel = p[len(root):] if p.startswith(root) else None
    if not rel:
      continue
    parts = rel.split('/')
    if any(d in skip or d.startswith('.') for d in parts[:-1]) or parts[-1].startswith('.'):
      continue
    out.append(rel)
  return sorted(out)


def staging_dir() -> str:
  """A new local temporary directory (TensorBoard events of a gs:// workdir are written there first)."""
  return tempfile.mkdtemp(prefix='nfjax-staging-')


def upload_dir(local: str, remote: str) -> None:
  """Every file of a local directory -> the same relative path under `remote` (whole-object uploads)."""
  if not _writes:
    return
  for rel in walk(local):
    with open(os.path.join(local, rel), 'rb') as f:
      _r_write(join(remote, rel), f.read())
