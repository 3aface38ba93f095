"""Log lines, progress that tells the truth, and metrics to metrics.jsonl + TensorBoard (process 0 only).

Every log line starts with the local time to the second: `2026-12-02 13:05:11 [fit] ...`. The
launcher tees the lines into a log file per launch (`open_log_file`, WORKDIR/logs/); library code
only calls `log`.

TensorBoard tags are namespaced by stage: `fit/...`, `train/...` (a metric named `eval_x` goes to
`eval/x`), `eval/...` (the evaluate stage's summary numbers) and `<stage>/<picture>` images
(`log_stage_outputs`). Event files live in `<stage dir>/tensorboard/`; open them with
`pip install -e '.[tb]' && tensorboard --logdir WORKDIR`.

In a gs:// workdir the event file is written in a local temporary directory and uploaded (the whole
file, through nfjax.io.files) at most every EVENTS_UPLOAD_SECONDS when the writer flushes, and when it
closes: tensorboardX's own GCS writer does not follow STORAGE_EMULATOR_HOST, and this keeps every
byte that reaches the bucket on the one I/O path.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import traceback

import jax
import numpy as np

from nfjax.io import files


def is_main_process() -> bool:
  return jax.process_index() == 0


def timestamp() -> str:
  """Local time to the second, as log lines start: '2026-12-02 13:05:11'."""
  return time.strftime('%Y-%m-%d %H:%M:%S')


# The launch's log file (process 0 of a launch; see open_log_file) and the lines logged before it opened.
_log_file = None
_log_path: str | None = None
_pending: list[str] | None = None


def log(stage: str, message: str, every_process: bool = False) -> None:
  """Print `<time> [stage] message` (process 0 only, unless every_process) and tee it to the log file."""
  if every_process or is_main_process():
    line = f"{timestamp()} [{stage}] {message}"
    print(line, file=sys.stdout, flush=True)
    record(line)


def record(text: str) -> None:
  """Write text (lines, e.g. an error the launcher prints on stderr) to the log file only."""
  text = text if text.endswith('\n') else text + '\n'
  if _log_file is not None:
    try:
      _log_file.write(text)
    except (OSError, ValueError):   # the disk filled up or the file was closed: the console still has it
      pass
  elif _pending is not None:
    _pending.append(text)


def capture_log() -> None:
  """Keep the lines logged from now on until `open_log_file` writes them at the top of the file."""
  global _pending
  _pending = []


def open_log_file(workdir: str) -> str | None:
  """Tee every logged line (and an uncaught exception's traceback) into WORKDIR/logs/<YYYYmmdd-HHMMSS>-<pid>.log,
  line-buffered so a killed job keeps what it logged. One file per launch; in a multi-process run only
  process 0 writes one (the others log only their `process i of N` line, to their console). Returns its
  path (None on the other processes)."""
  global _log_file, _log_path, _pending
  pending, _pending = _pending or [], None
  if not is_main_process():
    return None
  close_log_file(closing_line=False)
  path = files.join(workdir, 'logs', f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
  _log_file, _log_path = files.open_log(path), path
  for text in pending:
    record(text)
  if not getattr(sys.excepthook, 'records_to_log_file', False):
    hook = sys.excepthook

    def excepthook(kind, value, tb):
      record(''.join(traceback.format_exception(kind, value, tb)))
      hook(kind, value, tb)
    excepthook.records_to_log_file = True
    sys.excepthook = excepthook
  return path


def close_log_file(closing_line: bool = True) -> None:
  """Close the launch's log file; closing_line: first log where it is (the launcher's last line)."""
  global _log_file, _log_path
  if _log_file is None:
    return
  if closing_line:
    log('main', f"this launch's log: {_log_path}")
  f, _log_file, _log_path = _log_file, None, None
  try:
    f.close()
  except OSError:
    pass


def fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return '?'
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
  """Rate and ETA measured after compilation: call `start()` once the first compiled call is done
  (or before the first timed unit of work if compilation was done ahead of time)."""

  def __init__(self, stage: str, total: int, unit: str):
    self.stage, self.total, self.unit = stage, total, unit
    self.t0 = None
    self.done0 = 0
    self.done = 0

  def start(self, done: int = 0) -> None:
    self.t0 = time.perf_counter()
    self.done0 = self.done = done

  def update(self, done: int, extra: str = '') -> float:
    self.done = done
    elapsed = time.perf_counter() - self.t0 if self.t0 is not None else float('nan')
    rate = (done - self.done0) / elapsed if elapsed and elapsed > 0 else float('nan')
    eta = (self.total - done) / rate if rate and rate > 0 else float('nan')
    pct = 100.0 * done / max(1, self.total)
    log(self.stage, f"{done}/{self.total} {self.unit} ({pct:.0f}%)  {rate:.1f} {self.unit}/s  "
                    f"ETA {fmt_seconds(eta)}" + (f"  {extra}" if extra else ''))
    return rate

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.t0 if self.t0 is not None else 0.0

  @property
  def rate(self) -> float:
    e = self.elapsed
    return (self.done - self.done0) / e if e > 0 else float('nan')


class MetricsWriter:
  """Appends {'step': s, **metrics} lines to DIR/metrics.jsonl and scalars to TensorBoard (DIR/tensorboard).

  Tags are `<namespace>/<key>` (the writing stage: fit, train), except that a key `eval_x` is
  `eval/x` (held-out metrics beside the training ones); no namespace: bare keys."""

  def __init__(self, directory: str, tensorboard: bool = True, namespace: str = ''):
    self.enabled = is_main_process()
    self.path = files.join(directory, 'metrics.jsonl')
    self.namespace = namespace
    self._tb = None
    if self.enabled:
      files.makedirs(directory)
      if tensorboard:
        self._tb = _summary_writer(directory)

  def tag(self, key: str) -> str:
    if key.startswith('eval_'):
      return 'eval/' + key[len('eval_'):]
    return f"{self.namespace}/{key}" if self.namespace else key

  def write(self, step: int, **metrics) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if hasattr(v, '__float__') else v) for k, v in metrics.items()}
    files.append_text(self.path, json.dumps({'step': int(step), **clean}) + '\n')
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(self.tag(k), v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


_writers = 0
EVENTS_UPLOAD_SECONDS = 10.0


class _StagedEvents:
  """A tensorboardX writer for a gs:// directory: events go to a local staging directory, uploaded to
  DIR/tensorboard on flush (at most every EVENTS_UPLOAD_SECONDS) and on close."""

  def __init__(self, writer_cls, remote: str, suffix: str):
    self.remote, self.local = remote, files.staging_dir()
    self._writer = writer_cls(self.local, filename_suffix=suffix)
    self._last = time.monotonic()

  def __getattr__(self, name):   # add_scalar, add_image, ...
    return getattr(self._writer, name)

  def flush(self) -> None:
    self._writer.flush()
    if time.monotonic() - self._last >= EVENTS_UPLOAD_SECONDS:
      self._upload()

  def _upload(self) -> None:
    self._last = time.monotonic()
    try:
      files.upload_dir(self.local, self.remote)
    except Exception as e:  # noqa: BLE001 - the run's results stand; only their TensorBoard copy lags
      log('main', f"WARNING: could not upload TensorBoard events to {self.remote}: {e}")

  def close(self) -> None:
    self._writer.close()
    try:
      self._upload()
    finally:
      files.remove(self.local)


def _summary_writer(directory: str):
  """A tensorboardX writer of DIR/tensorboard. Its event file is named by the second it was opened and the
  host; the suffix (pid, count) keeps two writers opened in the same second from writing one file."""
  global _writers
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover
    return None
  _writers += 1
  if files.is_remote(directory):
    return _StagedEvents(SummaryWriter, files.join(directory, 'tensorboard'), f'.{os.getpid()}.{_writers}')
  return SummaryWriter(files.join(directory, 'tensorboard'), filename_suffix=f'.{os.getpid()}.{_writers}')


def namespace(stage: str) -> str:
  """The TensorBoard namespace of a stage: its name, but `eval` for the evaluate stage."""
  return 'eval' if stage == 'evaluate' else stage


# Where a stage's pictures and summary numbers go in TensorBoard (log_stage_outputs).
SKIP_DIRS = ('tensorboard', 'checkpoints', 'chunks')
SKIP_SUMMARY_KEYS = ('timings',)


def summary_scalars(summary: dict, prefix: str = '') -> dict[str, float]:
  """{'a/b/c': number} for every finite number in a (nested) summary dict, but booleans and the keys in
  SKIP_SUMMARY_KEYS (seconds per phase)."""
  out = {}
  for k, v in summary.items():
    if k in SKIP_SUMMARY_KEYS:
      continue
    tag = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(summary_scalars(v, tag))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[tag] = float(v)
  return out


def log_stage_outputs(directory: str, stage: str, summary: dict | None = None, step: int = 0) -> int:
  """Log a finished stage directory to TensorBoard (DIR/tensorboard, process 0): every PNG in it as an
  image `<namespace>/<path without .png>` (samples/topk3_t0.8/grid.png -> sample/topk3_t0.8/grid) and,
  when given, every number of its summary as a scalar `<namespace>/<key path>` (eval/class_accuracy,
  eval/settings/topk3_t0.8/frechet_distance). Returns the number of things logged."""
  if not is_main_process() or not files.isdir(directory):
    return 0
  ns = namespace(stage)
  pictures = [f for f in files.walk(directory, skip=SKIP_DIRS) if f.endswith('.png')]
  scalars = summary_scalars(summary, ns) if summary else {}
  if not pictures and not scalars:
    return 0
  tb = _summary_writer(directory)
  if tb is None:  # pragma: no cover
    return 0
  try:
    for tag, v in scalars.items():
      tb.add_scalar(tag, v, step)
    for rel in pictures:
      image = _read_png(files.join(directory, rel))
      if image is not None:
        tb.add_image(f"{ns}/{rel[:-len('.png')]}", image, step, dataformats='HWC')
  finally:
    tb.close()
  return len(scalars) + len(pictures)


def _read_png(path: str) -> np.ndarray | None:
  """A PNG file -> uint8 [H, W, 3 or 4] (None if it does not decode)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(files.read_bytes(path))) as im:
      im = im.convert('RGBA' if 'A' in im.getbands() or 'transparency' in im.info else 'RGB')
      return np.asarray(im)
  except (OSError, ValueError):
    return None
