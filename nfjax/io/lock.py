"""One writer per workdir: an exclusive lock held for a whole launch.

WORKDIR/.nfjax.lock is locked with `fcntl.flock` (exclusive, non-blocking) and holds who has it:
process id, host, start time, command. The kernel drops the lock when its process dies however it
dies (kill -9 included), so a stale lock cannot block the next launch: a lock file whose lock is
free is simply taken over. A second launch on a held workdir stops at once and says who holds it.
Multi-process runs hold it once (process 0). Local filesystems only: on a bucket this becomes a
lease object (issue 14).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from nfjax.errors import NfjaxError
from nfjax.io import files

NAME = '.nfjax.lock'


@contextlib.contextmanager
def hold(workdir: str):
  """Hold WORKDIR's lock for the `with` block; NfjaxError when another launch holds it."""
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
