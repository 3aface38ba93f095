"""The shapes modality's metrics inside the evaluation protocol (nfjax/evaluate/protocol.py;
docs/shapes_eval.md). For every sampling setting, and for the ceiling, baseline and no-structure
rows measured the same way against the same references, it reports

  HyperDiffusion's metrics  MMD-CD (x 10^2), COV-CD, 1-NNA-CD of 2048-point clouds
                            (evaluate.points_per_cloud) sampled from marching-cubes meshes, with
                            the per-cloud 'shape_unit' normalisation (nfjax/evaluate/shape_metrics.py)
  class coverage            per class c: the fraction of class-c references that are the nearest
                            class-c reference of some sample conditioned on c
  novelty                   squared Chamfer distance to the nearest training shape (its source
                            mesh), whether that shape has the conditioning class, and L2 to the
                            nearest training weight vector
  FPD                       Fréchet distance of PointNet++ features of the same normalised clouds
                            (compared samples vs references), when evaluate.pointnet_weights names
                            the PointNet++ SSG ModelNet40 checkpoint; else `"fpd": null` and why

The sets:
  references  N_ref source meshes of training shapes (a seeded subset of the good fields' shapes);
              N_ref = evaluate.num_reference, or floor(S / 1.1) for S samples per setting (-1), at
              most half the good fields
  settings    the first generated_count(N_ref) = int(1.1 N_ref) samples of each setting (as
              HyperDiffusion generates), meshed at evaluate.mesh_resolution at the fields' surface
              level (samples/<setting>/meshes.npz is reused when it was meshed the same way); empty
              meshes (and non-finite weights) are dropped and counted, the first N_ref non-empty
              ones are compared (fewer: all of them, and a note)
  reference   meshes of held-out fitted fields, disjoint from the references: the ceiling, what a
              perfect generator of this field dataset would score; also each field's Chamfer
              distance to its own source shape (the fit error), whose 95th percentile is the
              copy threshold: a sample that close to a training shape counts as a copy
  baseline    training fields + Gaussian noise (evaluate.baseline_noise x each parameter's std): a
              trivial memorizer
  no_structure  weight tokens drawn independently per position from each class's per-slot histogram
              of the training tokens, decoded as samples are, with the headline setting's classes
              (nfjax/evaluate/no_structure.py): what the GPT must beat
Note that the references are training shapes (HyperDiffusion compares with its test split): the
set metrics reward copies, so read them beside the novelty numbers.
"""

from __future__ import annotations

import math
import time

import numpy as np
from PIL import ImageDraw

from nfjax import config as cfg_utils
from nfjax.data import shapes as shape_data
from nfjax.errors import ConfigError, DataError
from nfjax.evaluate import novelty, pointnet2
from nfjax.evaluate import shape_metrics as sm
from nfjax.evaluate.protocol import Evaluator
from nfjax.fields import meshing, mlp
from nfjax.io import samples as sample_io
from nfjax.utils import images as img_utils
from nfjax.utils import picks, render3d
from nfjax.utils.logging import log

STAGE = 'evaluate'
# Everything the numbers depend on besides fields/ and samples/ (tracked by the stage's `inputs`).
HEADLINE_KEYS = ('mmd_cd_x100', 'cov', '1nna')
COPY_PERCENTILE = 95
PAIR_BLOCK = 8
# Published plane numbers, for side-by-side reading only: the protocols differ (test split,
# resolution 356 at logit 1.386, 606 references; NeF-GPT: 32-vs-32 bootstrap on training shapes).
REPORTED = {
    'hyperdiffusion_planes': {'mmd_cd_x100': 3.4, 'cov': 0.49, '1nna': 0.693, 'fpd': 3.5,
                              'note': 'as quoted by NeF-GPT from HyperDiffusion (test split)'},
    'nefgpt_planes': {'mmd_cd_x100': 10.0, 'cov': 0.3877, '1nna': 0.9077, 'fpd': 31.34,
                      'note': 'NeF-GPT report, top-k 3, T 0.8; 32-vs-32 bootstrap against training shapes'},
}


def validate(config) -> None:
  """The shapes modality's evaluate keys (the frame's keys: nfjax/configs/checks.py)."""
  cfg_utils.check_positive(config, 'evaluate.points_per_cloud')
  if int(cfg_utils.check_positive(config, 'evaluate.mesh_resolution')) < 2:
    raise ConfigError(f"config key evaluate.mesh_resolution={config.evaluate.mesh_resolution} must be >= 2")
  cfg_utils.check_choice(config, 'evaluate.normalize', sm.NORMALIZATIONS)
  p = float(cfg_utils.get(config, 'evaluate.occupancy_level'))
  if not 0.0 < p < 1.0:
    raise ConfigError(f"config key evaluate.occupancy_level={p!r} must be a probability in (0, 1) "
                      f"(0.5: the fields' own surface; HyperDiffusion's test meshes: 0.8)")
  cfg_utils.get(config, 'evaluate.bootstrap')
  weights = cfg_utils.get(config, 'evaluate.pointnet_weights')
  if weights:
    pointnet2.load(weights)        # missing / unreadable / not PointNet++ SSG: one clear error, now


def reference_count(num_samples: int, mult: float = sm.GENERATED_MULT) -> int:
  """N_ref for S samples: floor(S / 1.1), so that int(1.1 N_ref) <= S (HyperDiffusion's 1.1x)."""
  return max(1, int(math.floor(num_samples / mult + 1e-9)))


def surface(meta: dict) -> tuple[float, str]:
  s = meta.get('surface') or {}
  if s.get('inside') not in ('above', 'below') or 'level' not in s:
    raise DataError("fields/meta.json of a shape dataset has no valid 'surface' {level, inside}: re-run the fit stage")
  return float(s['level']), str(s['inside'])


def mesh_level(config, meta: dict, spec) -> tuple[float, str]:
  """(iso-level, inside) at which the evaluate stage meshes fields: the fields' own surface, or,
  for occupancy-logit fields, the level of probability evaluate.occupancy_level (HyperDiffusion's
  test meshes: 0.8, logit 1.386)."""
  level, inside = surface(meta)
  p = float(config.evaluate.occupancy_level)
  if abs(p - 0.5) < 1e-12:
    return level, inside
  if meta.get('loss') not in meshing.LOGIT_LOSSES:
    raise ConfigError(f"evaluate.occupancy_level={p:g} needs occupancy-logit fields (fit.loss='bce'); these "
                      f"were fitted with fit.loss={meta.get('loss')!r}: leave it at 0.5")
  return meshing.level_for(spec, meta['loss'], p), inside


def _paired_cd(a: np.ndarray, b: np.ndarray, mesh=None) -> np.ndarray:
  """Squared Chamfer distance of a[i] to b[i] for every i (a, b normalised clouds [n, p, 3])."""
  out = [np.diag(sm.chamfer_matrix(a[i:i + PAIR_BLOCK], b[i:i + PAIR_BLOCK], mesh=mesh))
         for i in range(0, len(a), PAIR_BLOCK)]
  return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _num(x):
  """A metric for the summary: None where there is nothing to measure (JSON null, not NaN)."""
  return None if x is None or not np.isfinite(x) else float(x)


class ShapeEvaluator:
  """The training shapes' clouds and the reference set; `measure` scores one candidate set.

  train_clouds: raw clouds [N, p, 3] of the good fields' source meshes (position = index into the
  good-field arrays), train_labels [N], train_weights [N, P]; ref_pos: positions of the references.
  """

  def __init__(self, train_clouds, train_labels, train_weights, ref_pos, normalize='shape_unit', mesh=None,
               class_names=(), seed=0, points=sm.NUM_POINTS, bootstrap=False, pointnet=None):
    self.normalize, self.mesh, self.seed, self.points = normalize, mesh, int(seed), int(points)
    self.ref_pos = np.asarray(ref_pos, np.int64)
    self.train_raw = np.asarray(train_clouds, np.float32)
    self.scale = None
    if normalize == 'global':   # one scale, the references' (as sm.set_metrics), for every set
      self.scale = float(sm.normalize_clouds(self.train_raw[self.ref_pos], 'global')[1][0])
    self.train = self.norm(self.train_raw)
    self.train_labels = np.asarray(train_labels, np.int32)
    self.train_weights = np.asarray(train_weights, np.float32)
    self.ref = self.train[self.ref_pos]
    self.ref_labels = self.train_labels[self.ref_pos]
    self.class_names = list(class_names)
    self.num_classes = max(len(self.class_names), int(self.train_labels.max()) + 1 if len(self.train_labels) else 0)
    self.bootstrap = bool(bootstrap)
    self.copy_threshold = None
    t0 = time.perf_counter()
    self.d_rr = sm.chamfer_matrix(self.ref, None, mesh=mesh)
    self.pointnet, self.ref_features = pointnet, None
    if pointnet is not None:     # FPD: PointNet++ features of the references, once
      self.ref_features = pointnet2.features(pointnet, self.ref, self.seed)
    self.reference_seconds = time.perf_counter() - t0

  def fpd(self, gen: np.ndarray) -> float | None:
    """FPD of normalised clouds [n, p, 3] against the references (None without PointNet++)."""
    if self.pointnet is None or len(gen) < 2:
      return None
    return _num(sm.fpd_from_features(pointnet2.features(self.pointnet, gen, self.seed), self.ref_features))

  def norm(self, clouds: np.ndarray) -> np.ndarray:
    return sm.normalize_clouds(clouds, self.normalize, self.scale)[0]

  def clouds(self, meshes) -> tuple[np.ndarray, np.ndarray]:
    """(raw clouds of the non-empty meshes, their indices) — sm.sample_clouds at this seed."""
    return sm.sample_clouds(meshes, self.points, self.seed)

  def class_name(self, c: int) -> str:
    return str(self.class_names[c]) if 0 <= c < len(self.class_names) else str(c)

  def measure(self, name: str, meshes, labels: np.ndarray, weights: np.ndarray, pool: np.ndarray
              ) -> tuple[dict, dict]:
    """All metrics of one candidate set: meshes [n] (empty ones allowed), conditioning labels [n],
    weight vectors [n, P]; pool = positions of the training shapes/fields it may be matched with
    for novelty. Returns (result for the summary, per-sample arrays)."""
    t0 = time.perf_counter()
    n = len(meshes)
    labels = np.asarray(labels, np.int32)
    raw, kept = self.clouds(meshes)
    gen = self.norm(raw)
    n_ref = len(self.ref)
    use = min(len(kept), n_ref)       # HyperDiffusion: the first N_ref non-empty shapes
    result = {'num_samples': int(n), 'num_empty': int(n - len(kept)),
              'num_nonfinite': int((~np.isfinite(weights).all(1)).sum()) if len(weights) else 0,
              'num_evaluated': int(use)}
    if use:
      d_sr = sm.chamfer_matrix(gen[:use], self.ref, mesh=self.mesh)
      d_ss = sm.chamfer_matrix(gen[:use], None, mesh=self.mesh)
      m = sm.metrics_from_matrices(d_sr, self.d_rr, d_ss)
      result.update({k: float(v) for k, v in m.items()})
      result.update(self._class_coverage(d_sr, labels[kept[:use]]))
      result['fpd'] = self.fpd(gen[:use])
      if self.bootstrap:
        result['bootstrap'] = sm.bootstrap(raw, self.train_raw[self.ref_pos], seed=self.seed,
                                           normalize=self.normalize, mesh=self.mesh)
    else:
      result.update({k: None for k in ('mmd_cd', 'mmd_cd_x100', 'cov', '1nna', '1nna_ref', '1nna_gen',
                                       'mmd_smp_cd', 'class_cov_mean', 'fpd')})
      result['class_cov'] = {self.class_name(c): None for c in range(self.num_classes)}

    # Novelty: nearest training shape (Chamfer) of every non-empty sample, nearest training weights.
    pool = np.asarray(pool, np.int64)
    d_nt = sm.chamfer_matrix(gen, self.train[pool], mesh=self.mesh) if len(kept) else np.zeros((0, len(pool)))
    nn_i = d_nt.argmin(1) if len(kept) else np.zeros(0, np.int64)
    nn_cd = d_nt[np.arange(len(kept)), nn_i].astype(np.float64)
    nn_pos = pool[nn_i]
    finite = np.nonzero(np.isfinite(weights).all(1))[0] if len(weights) else np.zeros(0, np.int64)
    nn_w_d, nn_w_i = novelty.nearest(weights[finite], self.train_weights[pool])
    same_class = self.train_labels[nn_pos] == labels[kept]
    per_sample = {
        'nonempty': _scatter(n, kept, np.ones(len(kept), bool), False),
        'compared': _scatter(n, kept[:use], np.ones(use, bool), False),
        'nn_shape_cd': _scatter(n, kept, nn_cd, np.nan),
        'nn_shape_position': _scatter(n, kept, nn_pos, -1),
        'nn_weight_l2': _scatter(n, finite, nn_w_d, np.nan),
        'nn_weight_position': _scatter(n, finite, pool[nn_w_i] if len(finite) else nn_w_i, -1),
    }
    result['novelty'] = {
        'nn_shape_cd': novelty.stats(nn_cd),
        'nn_weight_l2': novelty.stats(nn_w_d),
        'nn_class_accuracy': float(same_class.mean()) if len(kept) else None,
        'copy_fraction': (float((nn_cd <= self.copy_threshold).mean()) if len(kept) else None)
                         if self.copy_threshold is not None else None,
    }
    result['seconds'] = float(time.perf_counter() - t0)
    log(STAGE, f"{name}: {len(kept)}/{n} non-empty ({use} compared with {n_ref} references): "
               f"{_fmt(result, 'mmd_cd_x100', 'MMD-CDx100 {:.3f}')}, {_fmt(result, 'cov', 'COV {:.3f}')}, "
               f"{_fmt(result, '1nna', '1-NNA {:.3f}')}"
               f"{', ' + _fmt(result, 'fpd', 'FPD {:.3f}') if self.pointnet is not None else ''}; nearest training shape CD median "
               f"{result['novelty']['nn_shape_cd']['median']:.4f} [{result['seconds']:.1f}s]")
    return result, per_sample

  def _class_coverage(self, d_sr: np.ndarray, gen_labels: np.ndarray) -> dict:
    """Per class c: |{nearest class-c reference of each sample conditioned on c}| / |class-c references|."""
    out = {}
    for c in range(self.num_classes):
      refs = np.nonzero(self.ref_labels == c)[0]
      if not len(refs):
        out[self.class_name(c)] = None      # no reference of this class
        continue
      gens = np.nonzero(gen_labels == c)[0]
      hit = np.unique(refs[d_sr[np.ix_(gens, refs)].argmin(1)]) if len(gens) else []
      out[self.class_name(c)] = float(len(hit) / len(refs))
    vals = [v for v in out.values() if v is not None]
    return {'class_cov': out, 'class_cov_mean': float(np.mean(vals)) if vals else None}


def _scatter(n, idx, values, fill):
  values = np.asarray(values)
  dtype = values.dtype if values.dtype.kind in 'fb' else np.int64
  out = np.full(n, fill, dtype=dtype)
  out[np.asarray(idx, np.int64)] = values
  return out


def _fmt(result: dict, key: str, pattern: str) -> str:
  v = result.get(key)
  return pattern.format(v) if v is not None else pattern.split(' ')[0] + ' -'


class ShapeEval(Evaluator):
  """Shapes in the evaluation protocol: meshes -> point clouds, HyperDiffusion's set metrics,
  class coverage, FPD, novelty against the training shapes."""

  data_distance = 'nn_shape_cd'
  comparison = (('cov', 'COV', '.3f', 'higher'), ('1nna', '1-NNA', '.3f', 0.5),
                ('mmd_cd_x100', 'MMD-CDx100', '.3f', 'lower'))
  coverage = 'cov'

  def __init__(self, config, workdir: str, fields, mesh):
    self.config, self.workdir, self.fields, self.mesh = config, workdir, fields, mesh
    e = config.evaluate
    self.spec = mlp.FieldSpec.from_dict(fields.meta['field'])
    self.level, self.inside = mesh_level(config, fields.meta, self.spec)
    self.resolution = int(e.mesh_resolution)
    self.pointnet = pointnet2.load(e.pointnet_weights) if e.pointnet_weights else None

  def mesh_weights(self, w):
    return meshing.mesh_fields(self.spec, np.asarray(w, np.float32), self.resolution, self.level, self.inside,
                               mesh=self.mesh)

  def load(self, fields, good):
    e, seed = self.config.evaluate, int(self.config.seed)
    t0 = time.perf_counter()
    cache = shape_data.cache_dir(self.config, self.workdir)
    data = shape_data.catalog(self.config, cache, stage='evaluate')   # no points
    meta = fields.meta
    if data.source != meta.get('source') or len(data) != len(fields) or \
        not np.array_equal(np.asarray(data.source_index), np.asarray(fields.source_index)):
      raise DataError(f"fields/ was fitted on {len(fields)} shapes of {meta.get('source')!r} but the config's data "
                      f"selects {len(data)} shapes of {data.source!r}: evaluate with the data config the fit "
                      f"stage used")
    self.data, self.good = data, good
    self.class_names = list(meta.get('class_names') or data.class_names)
    self.weights = np.asarray(fields.weights[good], np.float32)
    self.labels = np.asarray(fields.labels[good], np.int32)
    self.train_raw, kept = sm.sample_clouds([data.meshes[int(i)] for i in good], int(e.points_per_cloud), seed)
    if len(kept) != len(good):
      bad = [data.names[int(good[i])] for i in np.setdiff1d(np.arange(len(good)), kept)[:3]]
      raise DataError(f"{len(good) - len(kept)} source mesh(es) of the fitted shapes have no surface to sample "
                      f"(e.g. {', '.join(bad)})")
    return {'training_shapes': time.perf_counter() - t0}

  def default_references(self, num_samples):
    return reference_count(num_samples)

  def generated_count(self, num_references, num_samples):
    return sm.generated_count(num_references)

  def references(self, ref_pos):
    e = self.config.evaluate
    self.ev = ShapeEvaluator(self.train_raw, self.labels, self.weights, ref_pos, str(e.normalize), self.mesh,
                             self.class_names, int(self.config.seed), int(e.points_per_cloud), bool(e.bootstrap),
                             self.pointnet)

  def describe(self):
    e = self.config.evaluate
    return (f"meshes at {self.resolution}^3, level {self.level:g} ({self.inside}), {e.points_per_cloud}-point "
            f"clouds, normalize={e.normalize}")

  def candidates(self, weights):
    return self.mesh_weights(weights)

  def setting_candidates(self, workdir, name, weights):
    meshes, how = _setting_meshes(workdir, name, len(weights), self.resolution, self.level, self.inside)
    return (self.mesh_weights(weights) if meshes is None else meshes), how

  def ceiling(self, held_pos, pool):
    ev = self.ev
    held_meshes = self.mesh_weights(self.weights[held_pos])
    held_raw, held_kept = ev.clouds(held_meshes)
    self.recon_cd = _paired_cd(ev.norm(held_raw), ev.train[held_pos[held_kept]], self.mesh)
    ev.copy_threshold = float(np.percentile(self.recon_cd, COPY_PERCENTILE)) if len(self.recon_cd) else None
    result, ps = ev.measure('reference (held-out fields)', held_meshes, self.labels[held_pos],
                            self.weights[held_pos], pool)
    result.update({
        'what': 'meshes of held-out fitted fields vs the reference shapes (ceiling)',
        'recon_cd_to_source': novelty.stats(self.recon_cd),
        'iou_mean': float(np.nanmean(self.fields.quality[self.good])),
    })
    return result, ps, held_meshes

  def measure(self, name, candidates, labels, weights, pool):
    return self.ev.measure(name, candidates, labels, weights, pool)

  def per_sample_file(self, per_sample, good):
    return {**per_sample, 'nn_shape_field': _field_ids(good, per_sample['nn_shape_position']),
            'nn_weight_field': _field_ids(good, per_sample['nn_weight_position'])}

  def pictures(self, stage, shown, nn_data, nn_weight, k):
    novelty.histogram_png(stage.file('novelty.png'), nn_data, nn_weight, self.recon_cd, self.ev.copy_threshold,
                          data_title='squared Chamfer distance to the nearest training shape',
                          recon_label='fields vs their own shape', fmt='.3g')
    if k > 0:
      for name, (meshes, lab, ps) in shown.items():
        _neighbours_png(stage.file(f'neighbours_{name}.png'), self.ev, self.data, self.good, meshes, lab, ps, k,
                        self.mesh_weights)

  def setting_picture(self, stage, setting, shown, result):
    meshes, labels, ps = shown
    _grid_png(stage.file(f"grid_{setting['name']}.png"), self.ev, setting, meshes, labels, ps, result)

  def headline(self, h):
    return {'mmd_cd_x100': h['mmd_cd_x100'], 'cov': h['cov'], '1nna': h['1nna'], 'class_cov_mean': h['class_cov_mean'],
            'num_empty': h['num_empty'], 'nn_shape_cd_median': _num(h['novelty']['nn_shape_cd']['median']),
            'copy_fraction': h['novelty']['copy_fraction'], 'fpd': h.get('fpd'), 'fpd_note': self._fpd_note()}

  def _fpd_note(self):
    e = self.config.evaluate
    note = sm.fpd_note(e.pointnet_weights) if self.pointnet is not None else sm.FPD_NOT_COMPUTED
    if self.pointnet is not None and int(e.points_per_cloud) != sm.NUM_POINTS:
      note += f"; {e.points_per_cloud}-point clouds (HyperDiffusion: {sm.NUM_POINTS})"
    return note

  def summary(self):
    e = self.config.evaluate
    return {'protocol': {'mesh_resolution': self.resolution, 'level': self.level, 'inside': self.inside,
                         'occupancy_level': float(e.occupancy_level), 'points_per_cloud': int(e.points_per_cloud),
                         'normalize': str(e.normalize), 'chamfer': 'squared, mean both ways',
                         'generated_mult': sm.GENERATED_MULT, 'bootstrap': bool(e.bootstrap)},
            'copy_threshold_cd': self.ev.copy_threshold, 'reported': REPORTED}

  def notes(self, results, reference, baseline, n_ref, n_gen):
    notes = [f"the references are {n_ref} training shapes (HyperDiffusion: its test split, 606 planes): the set "
             f"metrics reward copies; read them beside the novelty numbers and the baseline row"]
    if n_ref < 500:
      notes.append(f"{n_ref} references (< 500): COV and 1-NNA are noisy and depend on the set sizes; compare "
                   f"only with rows of the same size")
    for name, r in [*results.items(), ('reference', reference), ('baseline', baseline)]:
      if r['num_evaluated'] < n_ref:
        notes.append(f"{name}: {r['num_empty']} of {r['num_samples']} meshes empty, only {r['num_evaluated']} "
                     f"compared with {n_ref} references" + ('' if r['num_evaluated'] else ': no set metrics'))
    return notes

  def done(self, head, h, reference, baseline):
    return (f"{_fmt(h, 'mmd_cd_x100', 'MMD-CDx100 {:.3f}')} (ceiling {_fmt(reference, 'mmd_cd_x100', '{:.3f}')}, "
            f"baseline {_fmt(baseline, 'mmd_cd_x100', '{:.3f}')}), {_fmt(h, 'cov', 'COV {:.3f}')} (ceiling "
            f"{_fmt(reference, 'cov', '{:.3f}')}), {_fmt(h, '1nna', '1-NNA {:.3f}')} (ceiling "
            f"{_fmt(reference, '1nna', '{:.3f}')}), {h['num_empty']}/{h['num_samples']} empty; "
            f"{_fmt(h, 'fpd', 'FPD {:.3f}') if self.pointnet is not None else 'FPD not computed'}")


def _field_ids(good: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Positions in the good-field arrays -> field ids in fields/ (-1 stays -1)."""
  positions = np.asarray(positions, np.int64)
  return np.where(positions >= 0, good[np.maximum(positions, 0)], -1)


def _setting_meshes(workdir: str, name: str, n: int, resolution: int, level: float, inside: str):
  """(the first n meshes of samples/<name>/meshes.npz, 'reused ...') when they were meshed as the
  evaluate stage would mesh them, else (None, 'meshed')."""
  stored = sample_io.load_meshes(workdir, name)
  if stored is not None:
    meshes, info = stored
    if int(info.get('resolution', -1)) == resolution and str(info.get('inside')) == inside and \
        abs(float(info.get('level', math.nan)) - level) < 1e-9 and len(meshes) >= n:
      return meshes[:n], f'reused samples/{name}/meshes.npz'
  return None, f'meshed at {resolution}^3'


GRID_PER_CLASS = 8    # samples per row of eval/grid_<setting>.png (as samples/<setting>/grid.png)
GRID_SIZE, GRID_LABEL_WIDTH = 96, 100
GRID_CAPTION = ("rows: the class the samples were conditioned on, then that class's coverage: COV = the fraction of "
                "the class's references that are the nearest same-class reference of some sample of the class "
                "(covered/references; '-': no reference of the class, or nothing compared); red frame: a sample "
                "whose nearest training shape (Chamfer) is of another class, named in its corner; 'empty' = no surface")


def cov_row_label(name: str, cov: float | None, num_refs: int) -> str:
  """A grid row's label: the class and its coverage, 'airplane\nCOV 0.40 (2/5)' ('COV -' where None)."""
  if cov is None or not num_refs:
    return f"{name[:15]}\nCOV - ({num_refs} refs)"
  return f"{name[:15]}\nCOV {cov:.2f} ({int(round(cov * num_refs))}/{num_refs})"


def grid_figures(result: dict, num_refs: int) -> str:
  """The numbers of a set in words, for a picture's title."""
  fpd = f", {_fmt(result, 'fpd', 'FPD {:.3f}')}" if result.get('fpd') is not None else ''
  return (f"{_fmt(result, 'cov', 'COV {:.3f}')}, {_fmt(result, 'class_cov_mean', 'class COV mean {:.3f}')}, "
          f"{_fmt(result, 'mmd_cd_x100', 'MMD-CDx100 {:.3f}')}, {_fmt(result, '1nna', '1-NNA {:.3f}')}{fpd}; "
          f"{result['num_empty']}/{result['num_samples']} empty, {result['num_evaluated']} compared with "
          f"{num_refs} references")


def _grid_png(path, ev: ShapeEvaluator, setting: dict, meshes, labels, ps, result) -> None:
  """The setting's first GRID_PER_CLASS samples of every class, a row per class with its coverage, samples
  nearest to a training shape of another class framed in red; titled with the setting and its numbers."""
  labels = np.asarray(labels)
  rows = picks.class_rows(labels, ev.num_classes, GRID_PER_CLASS)
  if not rows:
    return
  cov = result.get('class_cov') or {}
  row_labels = [cov_row_label(ev.class_name(c), cov.get(ev.class_name(c)), int((ev.ref_labels == c).sum()))
                for c, _ in rows]
  img = render3d.mesh_grid([[meshes[i] for i in idx] for _, idx in rows], row_labels=row_labels, size=GRID_SIZE,
                           label_width=GRID_LABEL_WIDTH)
  boxes, texts = [], []
  for i, (c, idx) in enumerate(rows):
    for j, k in enumerate(idx):
      pos = int(ps['nn_shape_position'][k])
      if pos >= 0 and int(ev.train_labels[pos]) != c:
        boxes.append(img_utils.tile_box(i, j, GRID_SIZE, GRID_SIZE, left=GRID_LABEL_WIDTH))
        texts.append(ev.class_name(int(ev.train_labels[pos])))
  img = img_utils.mark_tiles(img, boxes, texts)
  img_utils.save_png(img_utils.captioned(img, [img_utils.setting_title(setting), grid_figures(result, len(ev.ref))],
                                         GRID_CAPTION), path)


NEIGHBOURS_CAPTION = ("column labels: the class each sample was conditioned on; cd = squared Chamfer distance of "
                      "the nearest training shape to the sample, then that shape's class; l2 = distance of the "
                      "nearest training field's weights to the sample's weights")


def _neighbours_png(path, ev: ShapeEvaluator, data, good, meshes, labels, ps, k, mesh_weights) -> None:
  """Rows: samples (non-empty, spread over classes), their nearest training shape (source mesh,
  squared CD under it) and the mesh of their nearest training weights (L2 under it)."""
  show = picks.per_class(labels, k, candidates=np.nonzero(ps['nonempty'])[0], sort=False)
  if len(show) == 0:
    return
  shape_pos = ps['nn_shape_position'][show]
  w_pos = ps['nn_weight_position'][show]
  near_shapes = [data.meshes[int(good[p])] for p in shape_pos]
  near_fields = [None] * len(show)
  ok = np.nonzero(w_pos >= 0)[0]
  if len(ok):
    for j, m in zip(ok, mesh_weights(ev.train_weights[w_pos[ok]])):
      near_fields[j] = m
  size, pad, left, top = 96, 2, 110, 14
  img = render3d.mesh_grid([[meshes[i] for i in show], near_shapes, near_fields],
                           row_labels=['sample', 'nearest shape', 'nearest weights'],
                           col_labels=[ev.class_name(int(labels[i]))[:14] for i in show], size=size,
                           label_width=left)
  draw = ImageDraw.Draw(img)
  for j, i in enumerate(show):
    x = left + pad + j * (size + pad)
    for row, text in ((1, f"cd {ps['nn_shape_cd'][i]:.4f} {ev.class_name(int(ev.train_labels[shape_pos[j]]))[:6]}"),
                      (2, f"l2 {ps['nn_weight_l2'][i]:.2f}")):
      draw.text((x + 2, top + pad + (row + 1) * (size + pad) - 13), text, fill=0)
  img_utils.save_png(img_utils.captioned(img, 'samples beside their nearest training shapes and fields',
                                         NEIGHBOURS_CAPTION), path)
