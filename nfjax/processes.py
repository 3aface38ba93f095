"""Runs spread over several processes (`--distributed`): one writer, decisions made once, barriers.

Every process runs the same pipeline over one shared workdir (a bucket, or this machine's disk for
launch/local.sh; `check_shared_workdir` proves it before any work). The rules:

* **One writer.** Only process 0 writes the workdir: `begin` makes the other processes' writes
  through nfjax/io/files.py no-ops (Orbax checkpoints are written by every process together, as
  Orbax coordinates them).
* **Decisions made once.** What a stage decides from the workdir (finished already? which chunks
  or settings are done? the shared init) is read by process 0 and handed to the others (`agree`),
  so no process reads what another is still writing and no two processes take different paths.
* **Work of one process.** Stages without work to spread (tokenize, evaluate; a stage's final
  writes and pictures) run on process 0 alone, on its own devices (`on_main`), while the others wait
  for its result; fit, train and sample spread their work over every process.
* **Barriers** between stages (`barrier`), so a stage reads only finished upstream directories.

Hand-offs go through JAX's distributed key-value store (`jax.distributed.initialize` starts it:
small pickled values) and device collectives (`gather`, arrays). In a single-process run every
function here is the plain single-process operation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import uuid

import jax
import numpy as np
from jax._src import distributed as _distributed
from jax.experimental import multihost_utils

from nfjax import sharding
from nfjax.errors import NfjaxError
from nfjax.io import files
from nfjax.utils.logging import is_main_process

# How long a process waits for process 0 (a stage it runs alone, e.g. evaluate, can take hours).
WAIT_MS = 48 * 3600 * 1000
_calls = itertools.count()
_alone = False        # inside on_main: only this process runs; no hand-offs
_run = ''             # this launch's id (the same on every process), prefixes every key


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def spread() -> bool:
  """Whether work is spread over several processes here (False inside `on_main`)."""
  return count() > 1 and not _alone


def _client():
  client = _distributed.global_state.client   # what jax.distributed.initialize made (Orbax uses it too)
  if client is None:
    raise NfjaxError("a multi-process run needs jax.distributed.initialize() (the launcher's --distributed)")
  return client


def _key(name: str) -> str:
  """A key unique to this call: every process makes the same calls in the same order."""
  return f"nfjax/{_run}/{next(_calls)}/{name}"


def agree(name: str, fn):
  """fn() computed by process 0 and handed to every process (a picklable value). An NfjaxError
  raised there (a user error) is raised on every process, so all of them stop with the same line."""
  if not spread():
    return fn()
  key = _key(name)
  client = _client()
  if is_main_process():
    try:
      out = ('ok', fn())
    except NfjaxError as e:
      out = ('error', e)
    except BaseException as e:   # a bug, KeyboardInterrupt: the others stop too, then it goes on up here
      client.key_value_set_bytes(key, pickle.dumps(('error', NfjaxError(
          f"process 0 failed ({type(e).__name__}: {e}); its log has the details"))))
      raise
    client.key_value_set_bytes(key, pickle.dumps(out))
  else:
    out = pickle.loads(client.blocking_key_value_get_bytes(key, WAIT_MS))
  if out[0] == 'error':
    raise out[1]
  return out[1]


def on_main(name: str, fn):
  """fn() on process 0 alone, on its own devices (`sharding.this_process_only`); the others wait for
  it and get its result (`agree`)."""
  if not spread():
    return fn()
  def alone():
    global _alone
    _alone = True
    try:
      with sharding.this_process_only():
        return fn()
    finally:
      _alone = False
  return agree(name, alone)


def barrier(name: str) -> None:
  """Wait until every process gets here."""
  if spread():
    _client().wait_at_barrier(_key(name).replace('/', '_'), WAIT_MS)


def every(name: str, value) -> list:
  """[value of process 0, of process 1, ...]: each process's own (picklable) value, to all."""
  if not spread():
    return [value]
  key = _key(name)
  client = _client()
  client.key_value_set_bytes(f"{key}/{index()}", pickle.dumps(value))
  return [pickle.loads(client.blocking_key_value_get_bytes(f"{key}/{i}", WAIT_MS)) for i in range(count())]


def gather(x) -> np.ndarray:
  """A jax.Array (spread over any processes' devices) -> the whole array as numpy, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def gather_rows(rows: np.ndarray, computed: np.ndarray) -> np.ndarray:
  """Rows [n, ...] of which this process computed those where `computed` [n] is True -> every row, on
  every process (each row from the process that computed it)."""
  if not spread():
    return rows
  owners = multihost_utils.process_allgather(np.asarray(computed, np.int32))           # [P, n]
  stacked = multihost_utils.process_allgather(np.ascontiguousarray(rows))          # [P, n, ...]
  pick = np.argmax(np.asarray(owners), axis=0)
  return np.asarray(stacked)[pick, np.arange(len(rows))]


def mine(num: int) -> np.ndarray:
  """Which of `num` work items (batches, ...) this process does: round robin, [num] bool."""
  return (np.arange(num) % count() == index()) if spread() else np.ones(num, bool)


@contextlib.contextmanager
def begin(workdir: str):
  """A launch's multi-process rules for this block (see above): one id for its keys, the workdir
  proven shared, writes from process 0 only. Nothing changes in a single-process run."""
  global _run
  if count() == 1:
    yield
    return
  _run = agree('run id', lambda: uuid.uuid4().hex[:12]) if not _run else _run
  check_shared_workdir(workdir)
  files.writes_allowed(is_main_process())
  try:
    yield
  finally:
    files.writes_allowed(True)


def check_shared_workdir(workdir: str) -> None:
  """Every process must see the one workdir (process 0 writes it, the others read it). Process 0
  writes a token; every process reads it; all stop with one line when any cannot."""
  token = files.join(workdir, f'.processes-{_run}')
  if is_main_process():
    files.write_bytes(token, _run.encode())
  barrier('token written')
  try:
    seen = files.exists(token) and files.read_bytes(token).decode() == _run
  except (OSError, NfjaxError):
    seen = False
  blind = [i for i, ok in enumerate(every('token read', seen)) if not ok]
  barrier('token checked')
  if is_main_process():
    files.remove(token)
  if blind:
    raise NfjaxError(
        f"--workdir={workdir} is not shared by the {count()} processes: process(es) {', '.join(map(str, blind))} "
        f"cannot see what process 0 writes there (host {os.uname().nodename} is process {index()}). A multi-host "
        f"run needs one workdir every host reads: a bucket (--workdir=gs://BUCKET/PATH, pip install "
        f"'nfjax[gcs]') or a shared filesystem")
