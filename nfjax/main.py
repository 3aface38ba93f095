r"""nfjax launcher.

  python -m nfjax.main --config=configs/mnist.py:quick --workdir=/tmp/nfjax_quick \
      [--stages=fit,tokenize] [--config.fit.steps=100] [--distributed] [--compile_cache=DIR]

Runs the selected stages in pipeline order; each skips itself when WORKDIR already holds its
finished result for the same config and resumes when it was interrupted.

Multi-process (`--distributed`): every process runs this same command. It calls
`jax.distributed.initialize()`, which finds the coordinator, the process count and this process's
id by itself on Cloud TPU VMs, SLURM, Open MPI and Kubernetes; elsewhere give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or JAX_COORDINATOR_ADDRESS).
Every stage runs so: fit, train and sample spread their work over every process's devices; tokenize,
evaluate and the final writes of a stage run on process 0 (nfjax/processes.py). Only process 0
writes the workdir, which must be one directory every process sees (a bucket, a shared mount, or
one machine's disk for launch/local.sh): the launch checks that first.

Every log line starts with the local time, and a launch tees them (with an error or a traceback that
ends it) into its own file WORKDIR/logs/<YYYYmmdd-HHMMSS>-<pid>.log, line-buffered, written by
process 0 only; the last line names it.
"""

from __future__ import annotations

import atexit
import re
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from nfjax import configs, pipeline, sharding
from nfjax.errors import ConfigError, NfjaxError
from nfjax.io import files
from nfjax.io import workdir as wd
from nfjax.utils import preemption
from nfjax.utils.logging import capture_log, close_log_file, log, open_log_file, record

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config and preset: a packaged config by name (mnist:quick, shapes:quick) or a config file '
    '(configs/mnist.py:quick).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every stage\'s artifacts.')
_STAGES = flags.DEFINE_string('stages', 'all', 'Comma-separated stages to run (fit,tokenize,train,sample,evaluate) or "all".')
_REDO = flags.DEFINE_string('redo', '', 'Comma-separated stages to do again from scratch (their directories are cleared '
                            'first; the stages after them see new inputs and redo themselves when they run).')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'When JAX computes on the CPU: how many devices to make of it. 0 = one per core, at most 8 '
    '(a fit runs about twice as fast on 2 cores as on one device using both); 1 = one device using every core '
    '(JAX\'s default). GPU and TPU hosts are not affected.', lower_bound=0)
_COMPILE_CACHE = flags.DEFINE_string(
    'compile_cache', '', 'A directory for JAX\'s persistent compilation cache: a later run of the same program '
    'reads its compiled executables instead of compiling again (launch/gpu.sh and tpu.sh pass WORKDIR/jax_cache). '
    '"" = off.')
_COMPILE_CACHE_MIN_SECS = flags.DEFINE_float(
    'compile_cache_min_secs', 1.0, 'With --compile_cache: only compilations that took at least this long are '
    'cached (quicker ones cost less to redo than to store).', lower_bound=0.0)
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host TPU/GPU; set by launch/ scripts).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: HOST:PORT of process 0 (default: detected from the '
    'cluster -- Cloud TPU, SLURM, Open MPI, Kubernetes -- or $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --distributed: number of processes '
                                      '(default: detected from the cluster).', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --distributed: this process\'s id, 0..N-1 '
                                   '(default: detected from the cluster).', lower_bound=0)

def run(config, workdir: str, stages: str | None = 'all', redo: str | None = '') -> dict:
  """Run stages (nfjax/pipeline.py); returns {stage: summary}. What the launcher, notebooks and tests call."""
  return pipeline.run_stages(config, workdir, stages, redo)


def run_or_exit(config, workdir: str, stages: str | None = 'all', redo: str | None = '') -> dict:
  """`run` as the launcher runs it: a user error is one line and exit 2; a SIGTERM (preemption) saves
  up to a safe point (nfjax/utils/preemption.py), says so in one line and exits 143; Ctrl-C says in one
  line which stage it stopped and exits 130."""
  try:
    return run(config, workdir, stages, redo)
  except (preemption.Preempted, preemption.Interrupted) as e:
    _fail(str(e), code=e.exit_code, kind='stopped')
  except KeyboardInterrupt:   # before or between the stages
    _fail("interrupted (Ctrl-C) outside a stage: every file written is whole and kept. Run the same command "
          "again to go on.", code=preemption.Interrupted.exit_code, kind='stopped')
  except NfjaxError as e:
    _fail(str(e))


def enable_compile_cache(directory: str, min_compile_secs: float = 1.0) -> None:
  """Turn on JAX's persistent compilation cache in `directory` (created if missing). Call before
  anything is compiled: executables compiled earlier are not written there."""
  if not directory:
    return
  directory = files.expand(directory)
  if '://' not in directory:
    files.makedirs(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_secs))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)   # every entry, however small
  log('main', f"JAX compilation cache: {directory} (compilations of >= {min_compile_secs:g}s)")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize(), then one line per process saying what it sees. A coordinator on
  127.0.0.1 / localhost (launch/local.sh) keeps CPU collectives on loopback too."""
  if (coordinator_address or '').rsplit(':', 1)[0] in ('127.0.0.1', 'localhost'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    sharding.cpu_collectives_on_loopback()
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  sharding.start_backend()   # after initialize (which must come first); a backend that cannot start: one line
  local = jax.local_devices()
  log('main', f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local "
              f"{local[0].device_kind} device(s) of {jax.device_count()}", every_process=True)


def start_log_file(workdir: str) -> str | None:
  """Tee the launch's log (the lines captured so far included) into WORKDIR/logs/<time>-<pid>.log (process
  0); the file is closed, its path logged last, when the process exits, however it ends."""
  path = open_log_file(workdir)
  if path is not None:
    atexit.register(close_log_file)
  return path


def _packaged_config(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[:PRESET]` (a bare name: mnist, shapes) turned into the packaged file's
  path (nfjax/configs/NAME.py), so it works from any directory and from an installed wheel."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config=') or (arg == '--config' and i + 1 < len(out)):
      j, value = (i, arg.split('=', 1)[1]) if '=' in arg else (i + 1, out[i + 1])
      name, sep, preset = value.partition(':')
      try:
        path = configs.config_path(name)
      except ConfigError as e:
        _fail(str(e), usage=True)
      out[j] = (f'--config={path}' if j == i else path) + sep + preset
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every user mistake (a config file that does not exist or does not
  load, a misspelled or ill-typed override, an unknown flag) as one line and exit code 2."""
  try:
    args = flags.FLAGS(_packaged_config(argv))
    if flags.FLAGS['config'].present:
      flags.FLAGS.config.to_dict()     # the config file loads lazily: fail here, not in the middle of a run
    return args
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if any(ln.startswith('Traceback') for ln in lines):   # the config file raised: its own message is last
      lines = [lines[0].split(':', 1)[0] + ':', lines[-1]]
    _fail(' '.join(lines) or type(e).__name__, usage=True)
  except (KeyError, AttributeError) as e:   # an override of a key the config does not have
    text = str(e)
    key = re.search(r"'(\w+)\\*'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    key = key.group(1) if key else '?'
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
                 key in a.split('=')[0].split('.')[1:]), '--config.*')
    _fail(f"{flag}: {key!r} is not a key of the config" + (f"; did you mean {hint.group(1)!r}?" if hint else ''))
  except (TypeError, ValueError, OSError, SyntaxError) as e:   # the config file is missing or does not load
    cause = e.__cause__ or e
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if 'Errno' in ln), None) or (lines[-1] if lines else type(e).__name__)
    given = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')   # as the user typed it
    _fail(f"--config={given}: {detail}")


def _fail(message: str, usage: bool = False, code: int = 2, kind: str = 'error') -> None:
  print(f"nfjax: {kind}: {message}" + ("\n  (python -m nfjax.main --helpfull lists the flags)" if usage else ''),
        file=sys.stderr, flush=True)
  record(f"nfjax: {kind}: {message}")
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=mnist:quick')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  capture_log()   # until the log file opens (it needs the process index): kept for its top
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep JAX's backend probing out of the progress log
  explicit = {'--coordinator_address': _COORDINATOR.value, '--num_processes': _NUM_PROCESSES.value,
              '--process_id': _PROCESS_ID.value}
  if not _DISTRIBUTED.value and any(v is not None for v in explicit.values()):
    raise app.UsageError(f"{', '.join(k for k, v in explicit.items() if v is not None)} need --distributed")
  workdir = files.expand(_WORKDIR.value)   # --workdir=~/runs/x: the shell leaves that `~` to us
  try:
    files.check_workdir(workdir)   # a scheme nfjax cannot write, or gs:// without [gcs]: before any work
  except NfjaxError as e:
    _fail(str(e))
  cpu_devices = sharding.split_cpu(_CPU_DEVICES.value)
  enable_compile_cache(_COMPILE_CACHE.value, _COMPILE_CACHE_MIN_SECS.value)   # before anything compiles
  if _DISTRIBUTED.value:
    try:
      initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:  # no cluster detected and not enough flags
      raise app.UsageError(f"--distributed: {e} JAX detects Cloud TPU VMs, SLURM, Open MPI and Kubernetes; "
                           "elsewhere give --coordinator_address=HOST:PORT --num_processes=N --process_id=I.")
    except NfjaxError as e:   # JAX_PLATFORMS naming a backend this machine or install lacks
      _fail(str(e))
  try:
    platform = sharding.start_backend()   # JAX_PLATFORMS naming a backend this machine or install lacks: one line
    start_log_file(workdir)
  except NfjaxError as e:   # that, or a workdir that cannot be written
    _fail(str(e))
  if cpu_devices and platform == 'cpu':
    log('main', f"computing on the CPU as {cpu_devices} device(s)"
                + (": the fit runs on all (one per core), the other stages on one that uses every core"
                   if cpu_devices > 1 else ''))
  summaries = run_or_exit(_CONFIG.value, workdir, _STAGES.value, _REDO.value)
  for line in closing_lines(workdir, summaries):
    log('main', line)


def pictures(directory: str) -> list[str]:
  """Every .png / .gif under a stage directory, as paths relative to it (per-setting grids included)."""
  return [f for f in files.walk(directory) if f.endswith(('.png', '.gif'))]


def closing_lines(workdir: str, stages) -> list[str]:
  """'where everything is': per finished stage directory its summary.json and every picture in it."""
  out = []
  for name in stages:
    for d in wd.writes(name):
      directory = wd.path(workdir, d)
      if wd.finished(workdir, d):
        pics = pictures(directory)
        out.append(f"{name}: {directory}/summary.json" + (f"  pictures: {', '.join(pics)}" if pics else ''))
  return out


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=_parse_flags)
