"""SIGTERM as a preemption notice: stop at the next safe point, keep everything finished, exit.

Spot and queued TPU VMs, SLURM and Kubernetes send SIGTERM some seconds before they kill a job.
Inside `handling()` (the pipeline runner holds it for a launch) the first SIGTERM only sets a flag
and logs one line; the loops look at it where stopping loses nothing:

* fit: after each chunk is written (the chunk in flight is finished, not lost);
* train: after each step: a checkpoint of that step is saved (waited for), so the same command
  resumes from exactly there with the same trajectory;
* sample: after each batch (the settings already written are kept; the one in flight is redrawn
  identically on resume, its samples being a function of their seeds);
* between stages (tokenize and evaluate run to their end first).

Then `Preempted` is raised; the launcher prints it as one line and exits with 143 (128 + SIGTERM),
the code a job killed by SIGTERM has, so a scheduler or `&&` never takes it for a finished run. A
second SIGTERM kills the process at once (every file is written atomically, so nothing half
written is ever read as complete).

Across processes (`--distributed`) SIGTERM belongs to JAX's preemption service, which
`jax.distributed.initialize` starts: it tells every process and agrees on the step (train) or
chunk (fit) at which all of them stop (`multihost_utils.reached_preemption_sync_point`, called by
every process at every step and chunk). No Python handler is installed then; the sample stage,
which draws its batches without collectives, runs on (its finished settings are kept either way).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

from nfjax.errors import NfjaxError
from nfjax.utils.logging import log

EXIT_CODE = 128 + signal.SIGTERM

_requested = threading.Event()
_sync_points = itertools.count()
_received_at: list[float] = []


class Preempted(NfjaxError):
  """SIGTERM was received; the work up to a safe point is saved and the launch stops."""

  exit_code = EXIT_CODE


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
  if _requested.is_set():   # a second SIGTERM: stop now
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    return
  _received_at.append(time.monotonic())
  _requested.set()
  log('main', "SIGTERM received (preemption): stopping at the next safe point with everything finished "
              "kept; send it again to stop at once")


@contextlib.contextmanager
def handling():
  """SIGTERM sets the preemption flag inside this block (main thread of a single-process run)."""
  install = (threading.current_thread() is threading.main_thread() and jax.process_count() == 1)
  previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
  _requested.clear()
  _received_at.clear()
  try:
    yield
  finally:
    if install:
      signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def requested(step: int | None = None) -> bool:
  """Whether to stop now. `step`: the trainer's step, for the multi-process agreement (every
  process must call it at every step, with increasing steps)."""
  if step is not None and jax.process_count() > 1:
    try:   # JAX wants increasing sync points over the process's life: one count for every stage's calls
      return multihost_utils.reached_preemption_sync_point(next(_sync_points))
    except RuntimeError:   # the preemption service is off (jax_enable_preemption_service=False)
      return False
  return _requested.is_set()


def seconds_since_notice() -> float | None:
  return time.monotonic() - _received_at[0] if _received_at else None


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) during a stage: still a KeyboardInterrupt (a notebook or a caller sees one), naming
  the stage. No safe point is waited for: every file is written whole or not at all, and a stage
  resumes from what it finished (fit chunks, train checkpoints, sampled settings) as after kill -9."""

  exit_code = 128 + signal.SIGINT

  def __init__(self, stage: str, finished: list[str]):
    super().__init__(f"interrupted (Ctrl-C) during the {stage} stage: "
                     + (f"{', '.join(finished)} finished; " if finished else '')
                     + "every file written is whole and kept (fit chunks, train checkpoints, sampled settings). "
                       "Run the same command again to resume from there.")


def stop(stage: str, kept: str) -> None:
  """Raise Preempted for `stage`, saying what was kept and how to go on."""
  since = seconds_since_notice()
  raise Preempted(f"preempted (SIGTERM) during the {stage} stage: {kept}"
                  + (f", {since:.1f}s after the signal" if since is not None else '')
                  + ". Run the same command again to resume from there.")


def check(stage: str, kept: str) -> None:
  """stop(stage, kept) if a preemption notice arrived (single-process safe points)."""
  if _requested.is_set():
    stop(stage, kept)
