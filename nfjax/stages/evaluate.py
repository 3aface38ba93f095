"""The evaluate stage: samples/ + fields/ (+ the modality's real data) -> WORKDIR/eval.

One protocol for every modality (nfjax/evaluate/protocol.py): the sampled settings, a ceiling row
(held-out fitted fields), a trivial baseline row (training fields + noise) and the no-structure
row (tokens drawn per slot from each class's training-token histogram,
nfjax/evaluate/no_structure.py), measured against the same seeded reference set with the
modality's metrics (images: class consistency, Fréchet distance, SSIM MMD / COV / 1-NNA; shapes:
HyperDiffusion's MMD-CD / COV / 1-NNA, FPD), plus novelty, per-sample files and pictures.
docs/evaluate.md and docs/shapes_eval.md.

New fields or samples (another digest of their summaries) are evaluated again; the same config
and inputs are skipped, but for an eval/ written before the no-structure row existed, which is
evaluated again (the classifier cache is kept) where the workdir has tokens/ and tokenizer/.
"""

from __future__ import annotations

from nfjax import modalities, sharding
from nfjax.configs import checks
from nfjax.evaluate import no_structure, protocol
from nfjax.io import fields as field_io
from nfjax.io import samples as sample_io
from nfjax.io import workdir as wd
from nfjax.utils.logging import log

STAGE = 'evaluate'


def run(config, workdir: str) -> dict:
  checks.validate(config, (STAGE,))
  wd.require(workdir, wd.FIELDS, STAGE)
  fields = field_io.load(wd.path(workdir, wd.FIELDS))
  modality = modalities.for_fields(fields, config)
  wd.require(workdir, wd.SAMPLES, STAGE)
  settings = sample_io.load_settings(workdir)
  stage = wd.StageDir(workdir, wd.EVAL, config, ('seed',) + modality.evaluate_keys,
                      consumes=wd.STAGES[STAGE][1], keep=modality.evaluate_keep, stage=STAGE)
  done = stage.finished()
  if done is not None and no_structure.NAME not in done and no_structure.available(workdir):
    log(STAGE, f"{stage.path} was evaluated without the {no_structure.NAME} row: evaluating again")
    done = None
  if done is not None:
    head = {k: done[k] for k in modality.headline_keys if k in done}
    figures = ', '.join(f"{k} {v:.4f}" if isinstance(v, (int, float)) else f"{k} -" for k, v in head.items())
    log(STAGE, f"already finished in {stage.path} (headline {done.get('headline_setting')}: {figures}); skipping")
    return done
  mesh = sharding.make_mesh(config.mesh)
  evaluator = modality.evaluator(config, workdir, fields, mesh)
  return protocol.evaluate(config, workdir, stage, fields, settings, evaluator, mesh)
