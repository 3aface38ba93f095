"""Everything Orbax: training checkpoints and the params-only loader.

A checkpoint directory (``WORKDIR/transformer/checkpoints``) holds one sub-directory per saved
step, written by an Orbax `CheckpointManager` (atomic: a step directory appears only when it is
complete; leftovers of a killed save are ignored and cleaned up):

  <step>/params      the model parameters, a nested dict of arrays (`nfjax.models.ModelDef`)
  <step>/opt_state   the optax state (same nesting under optax's named tuples)
  <step>/meta        JSON: step, rng (the run's base PRNG key, uint32 pair), data_position
                     (examples consumed = step * batch_size), seed, batch_size, model (config dict)

Restores target the *current* mesh: pass abstract arrays carrying the shardings you want, and
Orbax reshards (a run saved on 8 devices resumes on 1 or 2, and vice versa).

A gs:// directory is written straight to the bucket (Orbax through tensorstore; on an object store
a step is finished when its commit marker is written, not by a rename); with STORAGE_EMULATOR_HOST,
nfjax.io.files.configure_emulator points tensorstore at the emulator.

`load_params(directory)` reads only the parameters onto one device (the default backend's first, or any
given one), without a mesh, an optimizer or the training config: what the sample stage and notebooks use.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from nfjax import models
from nfjax.errors import NfjaxError
from nfjax.io import files
from nfjax.utils.logging import log

ITEMS = ('params', 'opt_state', 'meta')
# What tensorstore's errors say when a checkpoint's bytes could not be written (Orbax raises them as ValueError).
_WRITE_FAILURES = ('RESOURCE_EXHAUSTED', 'No space left', 'Failed writing', 'Disk quota exceeded',
                   'Read-only file system')


def _not_a_write_failure(record: logging.LogRecord) -> bool:
  """A logging filter: False for Orbax's own reports (each with its background thread's traceback) of a
  save that could not write its bytes, which `Checkpointer` turns into one NfjaxError line."""
  if record.levelno < logging.ERROR or 'orbax' not in (record.pathname or ''):
    return True
  text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else '')
  return not any(m in text for m in _WRITE_FAILURES)


logging.getLogger('absl').addFilter(_not_a_write_failure)   # Orbax logs through absl's logger


def _handlers() -> dict:
  return {'params': ocp.StandardCheckpointHandler(), 'opt_state': ocp.StandardCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


def init_from_error(init_from: str, what: str = 'is no directory') -> str:
  """The error for a train.init_from that cannot start a run: `what` is wrong with it."""
  return (f"config key train.init_from={init_from!r} {what}: give the checkpoints directory of a trained GPT "
          f"(WORKDIR/transformer/checkpoints), or set it to ''")


class Checkpointer:
  """Save/restore (params, opt_state, meta) by step; keeps the newest `keep` steps."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    """read_only: another run's checkpoints, only read (train.init_from): the directory is neither
    created nor cleaned of its unfinished saves."""
    self.directory = files.absolute(directory)   # a gs:// URL as it is: Orbax writes straight to the bucket
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=not read_only, create=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    """Start saving (asynchronously when enabled); the arrays may be donated right after. A local disk
    without room for the step is one NfjaxError before the save starts (`_check_room`); a save that
    fails on the way (the disk filled meanwhile) is one when it is met here, in `wait` or in `close`."""
    self._check_room(step, (params, opt_state))
    with self._write_failures(step):
      self._mngr.save(int(step), args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta)), force=True)

  # The room asked for a step: its arrays' bytes x ROOM_MARGIN + ROOM_SLACK_BYTES (Orbax's metadata, the JSON
  # meta, the OCDBT manifests). A smoke run's steps took ~0.8x their arrays' bytes: no more is asked.
  ROOM_MARGIN = 1.0
  ROOM_SLACK_BYTES = 1 << 20

  def _check_room(self, step: int, tree) -> None:
    """A local checkpoint directory on a disk without room for one more step: one NfjaxError now, before
    Orbax's background threads start a save that would fail halfway (and print their tracebacks)."""
    if files.is_remote(self.directory):
      return
    arrays = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree))
    need = int(arrays * self.ROOM_MARGIN) + self.ROOM_SLACK_BYTES
    free = files.free_bytes(self.directory)
    if free is not None and free < need:
      raise NfjaxError(f"cannot write the checkpoint of step {step} in {self.directory}: {free / 2**20:.1f} MiB "
                       f"free on its disk, the step needs ~{need / 2**20:.1f} MiB. Free space there (or use a "
                       f"--workdir on a disk with room); the same command then resumes from the last checkpoint")

  @contextlib.contextmanager
  def _write_failures(self, step: int | None):
    """An Orbax save that failed to write (tensorstore's RESOURCE_EXHAUSTED / an OSError: a full disk,
    a quota, a lost mount) as one NfjaxError naming the directory; anything else as it is."""
    try:
      yield
    except (OSError, ValueError) as e:
      text = str(e)
      if not isinstance(e, OSError) and not any(m in text for m in _WRITE_FAILURES):
        raise
      why = 'no space left on its disk' if ('No space left' in text or 'RESOURCE_EXHAUSTED' in text) else \
          (getattr(e, 'strerror', None) or text.splitlines()[0][:200])
      raise NfjaxError(f"cannot write the checkpoint{'' if step is None else f' of step {step}'} in "
                       f"{self.directory}: {why}. Free space there (or use a --workdir you can write to, with "
                       f"room); the same command then resumes from the last finished checkpoint") from None

  def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
    """(params, opt_state, meta) of `step`, laid out as the abstract targets' shardings say."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore()))
    return out['params'], out['opt_state'], dict(out['meta'])

  def restore_params(self, step: int, abstract_params) -> tuple[Any, dict]:
    """(params, meta) of `step` only: e.g. to start a new run from a trained model."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    return out['params'], dict(out['meta'])

  def meta(self, step: int) -> dict:
    return dict(self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def wait(self) -> None:
    with self._write_failures(None):
      self._mngr.wait_until_finished()

  def close(self, failed: bool = False) -> None:
    """Wait for the last save and close. `failed`: the run is already ending with an error, which a
    failed save (the same cause, met again) must not replace."""
    try:
      with self._write_failures(None):
        try:
          self._mngr.wait_until_finished()
        finally:
          self._mngr.close()   # waits for the save as well: its failure is met here once more
    except NfjaxError:
      if not failed:
        raise


def newest_intact(steps: list[int], restore: Callable[[int], Any], directory: str, what: str = 'checkpoint'):
  """restore(step) for the newest step that restores; a damaged newer step is skipped with a
  warning (an older intact one is used). NfjaxError naming the directory when none restores."""
  errors = []
  for step in sorted(steps, reverse=True):
    try:
      out = restore(step)
    except Exception as e:  # noqa: BLE001 - Orbax / tensorstore raise many kinds for a damaged step
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
      log('checkpoint', f"WARNING: the {what} at step {step} in {directory} cannot be restored ({errors[-1]}); "
                        f"trying an older one")
      continue
    return step, out
  raise NfjaxError(f"no {what} in {directory} can be restored ({'; '.join(errors)[:400]}); delete {directory} "
                   f"and run the train stage again (--redo=train)")


def load_params(directory: str, step: int | None = None, device: jax.Device | None = None) -> tuple[dict, dict]:
  """(params, meta) of a checkpoint directory's `step` (default: the newest intact one) on one device.

  device defaults to the default backend's first device of this process (`jax.local_devices()[0]`:
  a GPU or TPU where there is one), whatever mesh the checkpoint was written from; pass `jax.devices('cpu')[0]` to read
  onto the host. `meta['model']` is the model config dict: rebuild the model with
  `nfjax.models.build(meta['model'])` and call `.bind(params)`.
  """
  directory = files.absolute(directory)
  if not files.isdir(directory):
    raise NfjaxError(f"no checkpoints at {directory}: run the train stage first")
  mngr = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                               options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = list(mngr.all_steps())
    if not steps or (step is not None and int(step) not in steps):
      raise NfjaxError(f"no finished checkpoint {'' if step is None else f'for step {step} '}in {directory}")
    target_sharding = SingleDeviceSharding(device or jax.local_devices()[0])

    def restore(s):
      tree = mngr.item_metadata(s)['params']
      tree = getattr(tree, 'tree', tree)
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=target_sharding), tree)
      out = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target),
                                                    meta=ocp.args.JsonRestore()))
      return out['params'], dict(out['meta'])
    return newest_intact([int(step)] if step is not None else steps, restore, directory)[1]
  finally:
    mngr.close()


def load_model(directory: str, step: int | None = None, device: jax.Device | None = None):
  """(ModelDef, params, meta) of a checkpoint directory: the one-call loader for sampling."""
  params, meta = load_params(directory, step, device)
  return models.build(meta['model']), params, meta
