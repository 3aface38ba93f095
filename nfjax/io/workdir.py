"""The workdir: one directory per stage, its config fingerprint and the upstream artifacts it consumed.

  WORKDIR/config.json          the resolved config of the last launch
  WORKDIR/<dir>/fingerprint.json   the config keys the directory's artifacts depend on
  WORKDIR/<dir>/inputs.json        {upstream dir: digest of its summary.json} when the stage ran
  WORKDIR/<dir>/manifest.json      every file the stage wrote: bytes, sha256, and shape/dtype of .npy
  WORKDIR/<dir>/summary.json       written last: the stage is finished

One mechanism for every stage (`StageDir`):
* a directory made with a different config (its own keys) is never reused silently: `claim()`
  raises with the differing keys;
* a directory whose upstream artifacts changed since it was made (another `summary.json` digest
  in `inputs.json`) is stale: `claim()` clears it and the stage runs again;
* a finished directory is finished only while its files match its manifest: one that fails
  verification (a file missing, truncated or changed) loses its summary and the failing files, and
  its stage runs again, resuming from what is intact. A consumer (`require`) verifies before it
  reads and names the file, the stage that made it and the command that redoes it.
Checkpoints (Orbax restores them and falls back to an older intact step) and TensorBoard events
are not in the manifest.
A stage's own keys are only its section(s) of the config; what it reads from upstream is tracked
by the digests, so no stage needs another stage's keys.
"""

from __future__ import annotations

import hashlib

from nfjax import config as config_lib
from nfjax import processes
from nfjax.errors import ArtifactError, DataError, NfjaxError
from nfjax.io import files
from nfjax.utils.logging import log

# The stage directories (the artifact contract: docs/architecture.md).
FIELDS = 'fields'
TOKENIZER = 'tokenizer'
TOKENS = 'tokens'
TRANSFORMER = 'transformer'
SAMPLES = 'samples'
EVAL = 'eval'
SHAPE_DATA = 'shape_data'   # the shapes modality's point cache (data.cache_dir = '')

# stage -> (directories it writes, directories it reads), in pipeline order.
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'fit': ((FIELDS,), ()),
    'tokenize': ((TOKENIZER, TOKENS), (FIELDS,)),
    'train': ((TRANSFORMER,), (FIELDS, TOKENS)),
    'sample': ((SAMPLES,), (FIELDS, TOKENIZER, TOKENS, TRANSFORMER)),
    'evaluate': ((EVAL,), (FIELDS, SAMPLES)),
}
MARKERS = ('fingerprint.json', 'inputs.json')
MANIFEST = 'manifest.json'
NOT_IN_MANIFEST = ('checkpoints', 'tensorboard', 'chunks')   # Orbax's own; event files; fit's scratch


def path(workdir: str, *parts: str) -> str:
  return files.join(workdir, *parts)


def writes(stage: str) -> tuple[str, ...]:
  return STAGES[stage][0]


def finished(workdir: str, directory: str) -> bool:
  return files.exists(path(workdir, directory, 'summary.json'))


def digest(workdir: str, directory: str) -> str | None:
  """A digest of WORKDIR/<directory>/summary.json (None while that stage is not finished)."""
  p = path(workdir, directory, 'summary.json')
  return hashlib.sha256(files.read_bytes(p)).hexdigest()[:16] if files.exists(p) else None


def producer(directory: str) -> str:
  """The stage that writes WORKDIR/<directory>."""
  return next(s for s, (out, _) in STAGES.items() if directory in out)


def manifest(directory: str) -> dict:
  """{relative path: {bytes, sha256[, shape, dtype]}} of every file the stage wrote in `directory`."""
  out = {}
  for rel in files.walk(directory, skip=NOT_IN_MANIFEST):
    if rel in MARKERS + (MANIFEST, 'summary.json'):
      continue
    p = files.join(directory, rel)
    entry = {'bytes': files.size(p), 'sha256': files.checksum(p)}
    if rel.endswith('.npy'):
      header = files.npy_header(p)
      if header is not None:
        entry['shape'], entry['dtype'] = header
    out[rel] = entry
  return out


def verify(directory: str) -> list[tuple[str, str]]:
  """[(file, what is wrong)] of a finished stage directory against its manifest ([] = intact)."""
  mpath = files.join(directory, MANIFEST)
  if not files.exists(mpath):
    return [(MANIFEST, 'is missing (written by an older nfjax, or the stage was interrupted)')]
  try:
    entries = files.read_json(mpath)['files']
  except (DataError, KeyError, TypeError):
    return [(MANIFEST, 'is damaged')]
  problems = []
  for rel, want in entries.items():
    p = files.join(directory, rel)
    size = files.size(p) if files.exists(p) else None
    if size is None:
      problems.append((rel, 'is missing'))
    elif size != want['bytes']:
      problems.append((rel, f"has {size} bytes, {want['bytes']} were written (truncated or changed)"))
    elif files.checksum(p) != want['sha256']:
      problems.append((rel, 'has changed since it was written (checksum differs)'))
  return problems


def require(workdir: str, directory: str, stage: str) -> None:
  """Raise a clear error when the upstream directory `directory` is not finished or not intact."""
  made_by = producer(directory)
  if not finished(workdir, directory):
    what = 'is incomplete (no summary.json): its stage was interrupted' if files.isdir(
        path(workdir, directory)) else 'does not exist'
    raise DataError(f"{path(workdir, directory)} {what}; the {stage} stage reads it: run the {made_by} stage "
                    f"first (--stages={made_by},{stage}), or re-run the same command to finish it")
  problems = verify(path(workdir, directory))
  if problems:
    rel, what = problems[0]
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ''
    raise ArtifactError(f"{path(workdir, directory, rel)} {what}{more}; it was written by the {made_by} stage: run "
                        f"it again (--stages={made_by},{stage}), it redoes a stage whose files fail verification",
                        path(workdir, directory, rel))


class StageDir:
  """WORKDIR/<name>: its config fingerprint, the upstream digests it was made from, its summary.

  `keys`: the config keys this directory's artifacts depend on; `consumes`: the upstream
  directories it reads (their summary digests are recorded). `keep`: entries that survive when
  stale results are cleared (e.g. a cache that depends only on the config).
  """

  def __init__(self, workdir: str, name: str, config, keys, consumes: tuple[str, ...] = (),
               keep: tuple[str, ...] = (), stage: str | None = None):
    self.workdir, self.name = workdir, name
    self.stage = stage or name
    self.path = path(workdir, name)
    self.fingerprint = config_lib.fingerprint(config, keys)
    self.consumes, self.keep = tuple(consumes), tuple(keep)

  def file(self, *parts: str) -> str:
    return files.join(self.path, *parts)

  def exists(self, *parts: str) -> bool:
    return files.exists(self.file(*parts))

  @property
  def summary(self) -> dict | None:
    p = self.file('summary.json')
    return files.read_json(p) if files.exists(p) else None

  def inputs(self) -> dict:
    return {d: digest(self.workdir, d) for d in self.consumes}

  def claim(self) -> None:
    """Refuse another config's directory; clear a stale one; record fingerprint and inputs (process
    0 of a multi-process run decides and writes; the others wait for it)."""
    processes.agree(f'claim {self.name}', self._claim)

  def _claim(self) -> None:
    fp_path = self.file('fingerprint.json')
    if files.exists(fp_path):
      old = files.read_json(fp_path)
      if old != self.fingerprint:
        changes = '; '.join(config_lib.diff(old, self.fingerprint)[:8])
        raise NfjaxError(
            f"{self.path} holds the {self.stage} stage of a run with a different config ({changes}). "
            f"Use a new --workdir, or run the same command with --redo={self.stage} to redo this stage (it "
            f"clears {self.path} first; the stages after it then redo themselves).")
    files.makedirs(self.path)
    files.write_json(fp_path, self.fingerprint)
    inputs = self.inputs()
    in_path = self.file('inputs.json')
    old = files.read_json(in_path) if files.exists(in_path) else inputs
    if old != inputs:
      changed = [d for d in inputs if old.get(d) != inputs[d]]
      log(self.stage, f"{', '.join(changed)} changed since {self.path} was written: clearing it and running "
                      f"the {self.stage} stage again")
      for entry in files.listdir(self.path):
        if entry not in MARKERS + self.keep:
          files.remove(self.file(entry))
    files.write_json(in_path, inputs)

  def finished(self) -> dict | None:
    """The summary if this stage already finished with the same config and inputs and its files
    are intact, else None (a directory that fails verification is made unfinished, see above).
    Process 0 of a multi-process run decides for every process."""
    return processes.agree(f'finished {self.name}', self._finished)

  def _finished(self) -> dict | None:
    self._claim()
    summary = self.summary
    if summary is None:
      return None
    problems = verify(self.path)
    if problems:
      log(self.stage, f"WARNING: {self.path} fails verification ({', '.join(f'{f} {w}' for f, w in problems[:3])}"
                      f"{' ...' if len(problems) > 3 else ''}): running the {self.stage} stage again")
      for rel, _ in problems:   # a damaged file inside a unit (samples/<setting>/, eval/classifier/): the unit
        files.remove(self.file(rel.split('/')[0] if '/' in rel else rel))
      files.remove(self.file('summary.json'))
      files.remove(self.file(MANIFEST))
      return None
    return summary

  def write_summary(self, summary: dict) -> None:
    write_summary(self.path, summary)


def write_summary(directory: str, summary: dict) -> None:
  """manifest.json (every file the stage wrote), then summary.json: the stage is finished."""
  files.write_json(files.join(directory, MANIFEST), {'files': manifest(directory)})
  files.write_json(files.join(directory, 'summary.json'), summary)
