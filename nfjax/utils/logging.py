"""Progress that tells the truth, and metrics to metrics.jsonl + TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import math
import sys
import time

import jax

from nfjax.io import files


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(stage: str, message: str) -> None:
  if is_main_process():
    print(f"[{stage}] {message}", file=sys.stdout, flush=True)


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
  """Appends {'step': s, **metrics} lines to DIR/metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, directory: str, tensorboard: bool = True):
    self.enabled = is_main_process()
    self.path = files.join(directory, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      files.makedirs(directory)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(files.join(directory, 'tensorboard'))
        except ImportError:  # pragma: no cover
          self._tb = None

  def write(self, step: int, **metrics) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if hasattr(v, '__float__') else v) for k, v in metrics.items()}
    files.append_text(self.path, json.dumps({'step': int(step), **clean}) + '\n')
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
