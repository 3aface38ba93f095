"""The pipeline: its stages in order, each a module with `run(config, workdir) -> summary dict`.

`run_stages(config, workdir, stages)` (what `nfjax.main.run` calls) is what the launcher, notebooks and tests call: it validates the
config for every selected stage once, before any stage reads data, writes WORKDIR/config.json and
runs the stages in pipeline order. What each stage reads and writes: nfjax/io/workdir.py STAGES.
"""

from __future__ import annotations

import importlib
import time

from nfjax.configs import checks
from nfjax.errors import NfjaxError
from nfjax.io import files
from nfjax.io import workdir as wd
from nfjax.utils.logging import fmt_seconds, is_main_process, log

# name -> module (imported when the stage runs, so `--stages=fit` never imports the trainer).
PIPELINE: dict[str, str] = {
    'fit': 'nfjax.stages.fit',
    'tokenize': 'nfjax.stages.tokenize',
    'train': 'nfjax.stages.train',
    'sample': 'nfjax.stages.sample',
    'evaluate': 'nfjax.stages.evaluate',
}
assert tuple(PIPELINE) == tuple(wd.STAGES) == checks.STAGES


def parse(stages: str | None) -> list[str]:
  """'fit,tokenize' -> ['fit', 'tokenize'] in pipeline order; None / '' / 'all' -> every stage."""
  if not stages or stages == 'all':
    return list(PIPELINE)
  names = [s.strip() for s in stages.split(',') if s.strip()]
  for s in names:
    if s not in PIPELINE:
      raise NfjaxError(f"unknown stage {s!r} in --stages; stages are: {', '.join(PIPELINE)}")
  return [s for s in PIPELINE if s in names]


def get(name: str):
  return importlib.import_module(PIPELINE[name])


def run_stages(config, workdir: str, stages: str | None = "all") -> dict:
  """Run stages; returns {stage: summary}."""
  names = parse(stages)
  with checks.launch(config, names):   # every selected stage's checks, before any data is read
    files.makedirs(workdir)
    if is_main_process():
      files.write_json(wd.path(workdir, 'config.json'), config.to_dict() if hasattr(config, 'to_dict') else config)
    out = {}
    for name in names:
      t0 = time.perf_counter()
      log('main', f"stage {name} -> {workdir}")
      out[name] = get(name).run(config, workdir)
      log('main', f"stage {name} finished in {fmt_seconds(time.perf_counter() - t0)}")
  return out
