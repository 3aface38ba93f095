"""One writer per workdir: an exclusive lock held for a whole launch.

WORKDIR/.nfjax.lock is locked with `fcntl.flock` (exclusive, non-blocking) and holds who has it:
process id, host, start time, command. The kernel drops the lock when its process dies however it
dies (kill -9 included), so a stale lock cannot block the next launch: a lock file whose lock is
free is simply taken over. A second launch on a held workdir stops at once and says who holds it.
Multi-process runs hold it once (process 0).

A gs:// workdir has no flock: WORKDIR/.nfjax.lock is a lease object holding the same fields plus a
heartbeat the holder rewrites every LEASE_SECONDS / 4. A launch takes the lease when there is none,
when its heartbeat is older than LEASE_SECONDS, or when its holder is a process of this host that no
longer runs (kill -9 included, so the same command on the same machine resumes at once); it then reads
the object back to check it won. Not a compare-and-swap: two launches on different hosts starting
within the same second can both take it (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from nfjax.errors import NfjaxError
from nfjax.io import files

NAME = '.nfjax.lock'
LEASE_SECONDS = 120.0   # a gs:// lease whose heartbeat is older than this is free


@contextlib.contextmanager
def hold(workdir: str):
  """Hold WORKDIR's lock for the `with` block; NfjaxError when another launch holds it."""
  if files.is_remote(workdir):
    with _lease(workdir) as info:
      yield info
    return
  files.makedirs(workdir)
  path = files.join(workdir, NAME)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, files.FILE_MODE)
  except OSError as e:
    raise NfjaxError(f"cannot write {path}: {e.strerror}. Use a --workdir you can write to") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise NfjaxError(f"{workdir} is in use by another launch ({_holder(fd)}); wait for it to finish or stop it "
                       f"(one writer per workdir), or use another --workdir") from None
    info = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
            'command': ' '.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
      yield info
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b'{}')
  except (OSError, ValueError):
    info = {}
  if not info:
    return 'a process that has not written its name yet'
  return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}: "
          f"{info.get('command', '')[:160]}")


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError, OverflowError):
    return True
  return True


def _held_by_another(old: dict | None) -> bool:
  if not old:
    return False
  if time.time() - float(old.get('heartbeat', 0)) > LEASE_SECONDS:
    return False   # its holder stopped renewing it
  if old.get('host') == socket.gethostname():
    return old.get('pid') != os.getpid() and _alive(old.get('pid'))
  return True


@contextlib.contextmanager
def _lease(workdir: str):
  """The lease object of a gs:// workdir (see the module doc)."""
  path = files.join(workdir, NAME)

  def current() -> dict | None:
    try:
      return files.read_json(path) if files.exists(path) else None
    except NfjaxError:   # damaged: nobody's
      return None
  old = current()
  if _held_by_another(old):
    raise NfjaxError(f"{workdir} is in use by another launch ({_describe(old)}, lease renewed "
                     f"{time.time() - float(old.get('heartbeat', 0)):.0f} s ago); wait for it to finish or stop it "
                     f"(one writer per workdir; a lease not renewed for {LEASE_SECONDS:.0f} s is free), or use "
                     f"another --workdir")
  info = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': ' '.join(sys.argv), 'token': uuid.uuid4().hex, 'heartbeat': time.time()}
  files.write_json(path, info)
  won = current()
  if not won or won.get('token') != info['token']:
    raise NfjaxError(f"{workdir} was taken by another launch at the same moment ({_describe(won or {})}); "
                     f"one writer per workdir: use another --workdir")
  stop = threading.Event()

  def renew():
    while not stop.wait(LEASE_SECONDS / 4):
      try:
        files.write_json(path, {**info, 'heartbeat': time.time()})
      except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
        pass
  beat = threading.Thread(target=renew, name='nfjax-lease', daemon=True)
  beat.start()
  try:
    yield {k: info[k] for k in ('pid', 'host', 'started', 'command')}
  finally:
    stop.set()
    beat.join()
    files.remove(path)


def _describe(info: dict) -> str:
  return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}: "
          f"{str(info.get('command', ''))[:160]}")
