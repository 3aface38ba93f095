r"""nfjax launcher.

  python -m nfjax.main --config=configs/mnist.py:quick --workdir=/tmp/nfjax_quick \
      [--stages=fit,tokenize] [--config.fit.steps=100] [--distributed]

Runs the selected stages in pipeline order; each skips itself when WORKDIR already holds its
finished result for the same config and resumes when it was interrupted.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. configs/mnist.py:quick.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every stage\'s artifacts.')
_STAGES = flags.DEFINE_string('stages', 'all', 'Comma-separated stages to run (fit,tokenize,train,sample,evaluate) or "all".')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host TPU/GPU; set by launch/ scripts).')


def run(config, workdir: str, stages: str | None = 'all') -> dict:
  """Run stages; returns {stage: summary}. What the launcher, notebooks and tests call."""
  from nfjax import stages as stages_mod
  from nfjax.utils import io
  from nfjax.utils.logging import fmt_seconds, is_main_process, log

  names = stages_mod.parse(stages)
  stages_mod.validate(config, names)
  os.makedirs(workdir, exist_ok=True)
  if is_main_process():
    io.write_json(os.path.join(workdir, 'config.json'), config.to_dict() if hasattr(config, 'to_dict') else config)
  out = {}
  for name in names:
    t0 = time.perf_counter()
    log('main', f"stage {name} -> {workdir}")
    out[name] = stages_mod.get(name).run(config, workdir)
    log('main', f"stage {name} finished in {fmt_seconds(time.perf_counter() - t0)}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/mnist.py:quick')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep JAX's backend probing out of the progress log
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from nfjax.errors import NfjaxError
  try:
    summaries = run(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  except NfjaxError as e:
    print(f"nfjax: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  from nfjax import stages as stages_mod
  from nfjax.utils.logging import log
  for name in summaries:
    directory = os.path.join(_WORKDIR.value, getattr(stages_mod.get(name), 'DIRNAME', name))
    pictures = sorted(f for f in os.listdir(directory) if f.endswith(('.png', '.gif'))) if os.path.isdir(directory) else []
    log('main', f"{name}: {directory}/summary.json" + (f"  pictures: {', '.join(pictures)}" if pictures else ''))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
