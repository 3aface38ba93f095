"""The pipeline: its stages in order, each a module with `run(config, workdir) -> summary dict`.

`run_stages(config, workdir, stages)` (what `nfjax.main.run` calls) is what the launcher, notebooks and tests call: it validates the
config for every selected stage once, before any stage reads data, writes WORKDIR/config.json and
runs the stages in pipeline order. What each stage reads and writes: nfjax/io/workdir.py STAGES.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time

from nfjax import processes
from nfjax.configs import checks
from nfjax.errors import ArtifactError, DataError, NfjaxError
from nfjax.io import files, lock
from nfjax.io import workdir as wd
from nfjax.utils import preemption
from nfjax.utils.logging import fmt_seconds, is_main_process, log, log_stage_outputs

# Stages whose summary numbers go to TensorBoard when they finish (the evaluate stage's metrics are its
# summary; the other stages log their metrics as they run). Every stage's pictures go there too.
TENSORBOARD_SUMMARIES = ('evaluate',)

# name -> module (imported when the stage runs, so `--stages=fit` never imports the trainer).
PIPELINE: dict[str, str] = {
    'fit': 'nfjax.stages.fit',
    'tokenize': 'nfjax.stages.tokenize',
    'train': 'nfjax.stages.train',
    'sample': 'nfjax.stages.sample',
    'evaluate': 'nfjax.stages.evaluate',
}
assert tuple(PIPELINE) == tuple(wd.STAGES) == checks.STAGES
# Stages with no work worth spreading over processes: in a multi-process run process 0 runs them on
# its own devices while the others wait (nfjax/processes.py). fit, train and sample spread their work.
ON_MAIN = ('tokenize', 'evaluate')


def _names(stages: str | None, flag: str) -> list[str]:
  names = [s.strip() for s in (stages or '').split(',') if s.strip()]
  for s in names:
    if s not in PIPELINE:
      raise NfjaxError(f"unknown stage {s!r} in --{flag}; stages are: {', '.join(PIPELINE)}")
  return names


def parse(stages: str | None, redo: str | None = '') -> list[str]:
  """'fit,tokenize' -> ['fit', 'tokenize'] in pipeline order; None / '' / 'all' -> every stage.
  Stages in `redo` are run too."""
  names = list(PIPELINE) if not stages or stages == 'all' else _names(stages, 'stages')
  names += _names(redo, 'redo')
  return [s for s in PIPELINE if s in names]


def get(name: str):
  return importlib.import_module(PIPELINE[name])


def run_stages(config, workdir: str, stages: str | None = "all", redo: str | None = '') -> dict:
  """Run stages (and redo those in `redo` from scratch); returns {stage: summary}.

  The config is checked for every selected stage first, then the workdir's lock is taken (one
  writer per workdir, nfjax/io/lock.py; process 0 of a multi-process run), config.json written and
  the stages run in order. A damaged artifact met on the way is reported with the stage that made
  it and the command that redoes it."""
  workdir = files.expand(workdir)   # '~/runs/x' from a notebook or a script
  files.check_workdir(workdir)   # a scheme nfjax cannot write (or gs:// without [gcs]): one error, no work
  names = parse(stages, redo)
  with checks.launch(config, names), preemption.handling(), processes.begin(workdir):
    # checks before any data is read; SIGTERM; in a multi-process run a shared workdir, one writer
    with (lock.hold(workdir) if is_main_process() else contextlib.nullcontext()):
      processes.agree('inputs', lambda: check_inputs(workdir, names, config))   # read by process 0, before any write
      if is_main_process():
        files.write_json(wd.path(workdir, 'config.json'), config.to_dict() if hasattr(config, 'to_dict') else config)
        for name in _names(redo, 'redo'):
          for d in wd.writes(name):
            log('main', f"--redo={name}: clearing {wd.path(workdir, d)}")
            files.remove(wd.path(workdir, d))
      processes.barrier('launch prepared')
      out = {}
      for name in names:
        preemption.check(name, (f"{', '.join(out)} finished, " if out else '') + f"{name} not started")
        t0 = time.perf_counter()
        log('main', f"stage {name} -> {workdir}")
        before = {d: wd.digest(workdir, d) for d in wd.writes(name)} if is_main_process() else {}
        try:
          stage = get(name)
          out[name] = (processes.on_main(name, lambda: stage.run(config, workdir)) if name in ON_MAIN
                       else stage.run(config, workdir))
        except ArtifactError as e:
          raise ArtifactError(_advice(e, workdir, name), e.path) from None
        except KeyboardInterrupt as e:
          raise preemption.Interrupted(name, list(out)) from e
        _to_tensorboard(workdir, name, before)
        processes.barrier(f'{name} finished')
        log('main', f"stage {name} finished in {fmt_seconds(time.perf_counter() - t0)}")
  return out


def _needs(name: str, config) -> tuple[str, ...]:
  """The directories stage `name` reads: its module's `needs(config)` where the config decides, else
  every input of wd.STAGES."""
  stage = get(name)
  return tuple(stage.needs(config)) if hasattr(stage, 'needs') else wd.STAGES[name][1]


def _unmet(workdir: str, names, config) -> list[tuple[str, str]]:
  """[(stage, directory)]: each directory a stage of `names` reads that is neither finished in the
  workdir nor written by an earlier stage of `names`."""
  out, produced = [], set()
  for name in (s for s in PIPELINE if s in names):
    out += [(name, d) for d in _needs(name, config) if d not in produced and not wd.finished(workdir, d)]
    produced.update(wd.writes(name))
  return out


def check_inputs(workdir: str, names: list[str], config) -> None:
  """One error before any stage runs (not after the ones before it) when a selected stage would read a
  directory that is not finished and that no stage of this launch writes; it names the stages that
  make the launch whole."""
  unmet = _unmet(workdir, names, config)
  if not unmet:
    return
  whole = set(names)
  while (more := {wd.producer(d) for _, d in _unmet(workdir, whole, config)} - whole):
    whole |= more
  stage, d = unmet[0]
  what = ('is incomplete (no summary.json): its stage was interrupted' if files.isdir(wd.path(workdir, d))
          else 'does not exist')
  raise DataError(f"{wd.path(workdir, d)} {what}; the {stage} stage reads it and this launch does not run the "
                  f"{wd.producer(d)} stage: run --stages={','.join(s for s in PIPELINE if s in whole)}")


def _to_tensorboard(workdir: str, name: str, before: dict) -> None:
  """The pictures (and, for TENSORBOARD_SUMMARIES, the summary numbers) of every directory the stage
  finished anew in this launch (another summary digest than before it ran) -> <dir>/tensorboard."""
  for d, digest in before.items():
    if not wd.finished(workdir, d) or wd.digest(workdir, d) == digest:
      continue   # skipped (already finished) or not finished
    directory = wd.path(workdir, d)
    summary = files.read_json(files.join(directory, 'summary.json')) if name in TENSORBOARD_SUMMARIES else None
    try:
      log_stage_outputs(directory, name, summary)
    except OSError as e:   # the stage's results stand; only their TensorBoard copy is missing
      log('main', f"WARNING: could not write TensorBoard events in {directory}/tensorboard: {e}")


def _advice(e: ArtifactError, workdir: str, stage: str) -> str:
  """The error, plus the stage that wrote the file and how to redo it (unless it says so already)."""
  message = str(e)
  rel = os.path.relpath(files.absolute(e.path), files.absolute(workdir))
  top = rel.split(os.sep)[0]
  if 'written by the' in message or top.startswith('..') or top not in {d for out, _ in wd.STAGES.values() for d in out}:
    return message
  made_by = wd.producer(top)
  if made_by == stage:
    return f"{message}; it was written by the {made_by} stage: redo it with --redo={made_by}"
  return (f"{message}; it was written by the {made_by} stage: run it again (--stages={made_by},{stage}), or redo "
          f"it from scratch with --redo={made_by}")
