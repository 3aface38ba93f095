"""The shapes modality: 3D occupancy (or SDF / +-1) fields of meshes, scored by held-out IoU.

The fit stage fits, per shape, a set of training points; each shape is a set of
training points [n, 3] in [-0.5, 0.5]^3 with a label per point (`data.label`: 'occupancy' 0/1,
'sdf', or 'pm1' = NeF-GPT's -1 inside / +1 outside), plus held-out uniform points with their
occupancy, on which each fitted field's IoU is measured. Fitting is the modality-free machinery of
nfjax/fields/stack.py (chunks, resume, the shared init, refit) with two differences:

* every step draws `fit.points_per_step` of a field's points (with replacement, from
  `fold_in(field key, step)`) and encodes only that batch; the raw coordinates [F, n, 3] travel to
  the devices sharded on the field axis, never an [F, n, E] feature tensor;
* the per-field quality is the IoU on the held-out points (summary: iou_mean, iou_p10, iou_min),
  and fields under `fit.iou_floor` are flagged.

A point is inside the fitted shape where the field's output (after `field.output_activation`)
is above `level` (occupancy) or below it (sdf, pm1); `surface()` gives the level and side, and
meta.json records them as `surface` for meshing.

Parity fields (configs in docs/shapes_fit.md): NeF-GPT's 3,712-parameter field (raw xyz + sin/cos
at 1, 2 -> 4 x 32 GELU -> tanh, no output bias; MSE against +-1 labels, 8,192 points per step)
and HyperDiffusion's 36,737-parameter field (raw xyz + sin/cos at 1, 2, 4, 8 -> 3 x 128 ReLU ->
1 logit; BCE against occupancy, 2,048 points per step).

Pictures: fields/shapes.png (meshes of fitted fields beside their shapes, with IoU), per sampling setting meshes.npz, PLY files
and grid.png, samples/turntable.gif. Tokenize reports the held-out IoU before / after
tokenization; evaluate follows HyperDiffusion's protocol (nfjax/modalities/shapes/evaluate.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import config as cfg_utils
from nfjax import extras, modalities
from nfjax.data import shapes as shape_data
from nfjax.errors import ConfigError, DataError
from nfjax.fields import fitting, meshing, mlp
from nfjax.fields.stack import StackFitter
from nfjax.io import fields as field_io
from nfjax.io import files
from nfjax.io import samples as sample_io
from nfjax.modalities.base import FitData, Modality, PrototypeSpace, Quality, SampleOutput
from nfjax.modalities.shapes import evaluate as shape_eval
from nfjax.utils import images as img_utils
from nfjax.utils import picks, render3d
from nfjax.utils.logging import log

STAGE = 'fit'
LABELS = ('occupancy', 'sdf', 'pm1')
IOU = Quality('iou', 'IoU', 'iou', 'fit.iou_floor', '', 3)
IOU_CHUNK = 4096  # held-out points evaluated at a time per field


def surface(spec: mlp.FieldSpec, loss: str, label: str) -> tuple[float, bool]:
  """(level, inside_above): where a field's output (mlp.apply) marks a point as inside.

  bce fits logits: inside where the logit > 0 (output > 0.5 for a sigmoid output). mse/l1 on
  occupancy: output > 0.5. sdf and pm1 (NeF-GPT: -1 inside): output < 0.
  """
  if loss == 'bce':
    return (0.5 if spec.output_activation == 'sigmoid' else 0.0), True
  if label == 'occupancy':
    return 0.5, True
  return 0.0, False


def _validate_fit(config) -> None:
  """The fit keys of shape fields (the shared ones: nfjax/configs/checks.py)."""
  label = cfg_utils.check_choice(config, 'data.label', LABELS)
  spec = mlp.FieldSpec.from_config(config.field)
  if spec.in_dims != 3:
    raise ConfigError(f"config key field.in_dims={spec.in_dims}: shape fields take 3-D coordinates "
                      f"(data.modality='shapes'); set field.in_dims=3")
  if spec.out_dims != 1:
    raise ConfigError(f"config key field.out_dims={spec.out_dims}: shape fields have one output")
  if fitting.prototypes_of(config.fit) > 0 and config.fit.get('prototype_target', 'auto') == 'mean':
    raise ConfigError("config key fit.prototype_target='mean': a cluster's mean occupancy is no shape (thin parts "
                      "average under 0.5 and vanish), so shape prototypes are fitted to medoids; set "
                      "fit.prototype_target='medoid' (or 'auto')")
  loss = config.fit.loss
  if loss == 'bce' and label != 'occupancy':
    raise ConfigError(f"config key fit.loss='bce' fits occupancy logits and needs data.label='occupancy', "
                      f"not {label!r}; use fit.loss='mse' or 'l1' for {label!r} labels")
  if label != 'occupancy' and spec.output_activation == 'sigmoid':
    raise ConfigError(f"config key field.output_activation='sigmoid' cannot produce the negative values of "
                      f"data.label={label!r}; use 'tanh' (pm1) or 'none' (sdf)")
  floor = float(config.fit.iou_floor)
  if not 0.0 <= floor <= 1.0:
    raise ConfigError(f"config key fit.iou_floor={floor} must be in [0, 1]")
  cfg_utils.check_positive(config, 'fit.points_per_step', allow_minus_one=True)
  cfg_utils.check_positive(config, 'fit.sdf_clamp', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.render_resolution')
  for key in ('fit.shared_init_l2', 'fit.refit_below', 'fit.refit_steps_factor'):
    cfg_utils.get(config, key)  # must exist: they are part of the stage's fingerprint


def load_data(config, workdir: str):
  """The ShapeSet to fit (nfjax.data.shapes.load), cached under shape_data.cache_dir(config, workdir)."""
  return shape_data.load(config, shape_data.cache_dir(config, workdir))


def check_data(config, spec: mlp.FieldSpec, data) -> tuple:
  """Shapes of the ShapeSet against each other and the config -> per-field rows for the fitter:
  (points [N, n, 3], values [N, n], heldout_points [N, m, 3], heldout_occupancy [N, m])."""
  pts, vals = np.asarray(data.points), np.asarray(data.values)
  hp, ho = np.asarray(data.heldout_points), np.asarray(data.heldout_occupancy)
  if vals.ndim == 3 and vals.shape[-1] == 1:
    vals = vals[..., 0]
  if ho.ndim == 3 and ho.shape[-1] == 1:
    ho = ho[..., 0]
  n = len(pts)
  if n == 0:
    raise ConfigError(f"no shapes to fit from {data.source}: data.num_fields selected 0 shapes")
  if pts.ndim != 3 or pts.shape[-1] != spec.in_dims:
    raise DataError(f"shape points are {pts.shape}, expected [N, n, {spec.in_dims}] (field.in_dims)")
  if vals.shape != pts.shape[:2]:
    raise DataError(f"shape values are {vals.shape}, expected {pts.shape[:2]} (one per training point)")
  if hp.ndim != 3 or hp.shape[0] != n or hp.shape[-1] != spec.in_dims or ho.shape != hp.shape[:2]:
    raise DataError(f"held-out points {hp.shape} / occupancy {ho.shape} do not match {n} shapes of "
                    f"{spec.in_dims}-D points")
  if hp.shape[1] == 0:
    raise DataError("the shapes have no held-out points: the IoU of a fit cannot be measured")
  for name, arr in (('labels', data.labels), ('source_index', data.source_index)):
    if len(arr) != n:
      raise DataError(f"ShapeSet.{name} has {len(arr)} entries for {n} shapes")
  per_step, k = int(config.fit.points_per_step), pts.shape[1]
  if per_step > k:
    raise ConfigError(f"config key fit.points_per_step={per_step} is more than the {k} training points per "
                      f"shape; use at most {k}, or -1 for every point every step")
  _check_sign(config.data.label, pts, vals)
  index = int(config.fit.shared_init_index)
  if config.fit.init == 'shared' and not 0 <= index < n:
    raise ConfigError(f"config key fit.shared_init_index={index} is outside the {n} selected shapes")
  return pts, vals, hp, ho


def inside_labels(label: str, values: np.ndarray) -> np.ndarray:
  """Which training labels mark a point inside: occupancy 1, sdf < 0, pm1 -1 (NeF-GPT)."""
  if label == 'occupancy':
    return values > 0.5
  return values < 0


def _check_sign(label: str, points: np.ndarray, values: np.ndarray, sample: int = 4096) -> None:
  """Shapes lie inside [-0.475, 0.475]^3 (HyperDiffusion's and nfjax's normalisation), so training
  points beyond 0.49 on some axis are outside; if most of them are labelled inside, the labels use
  the other sign convention, and every IoU would be near 0: refuse with the convention spelled out."""
  p, v = points[:, :sample], values[:, :sample]
  far = np.abs(p).max(-1) > 0.49
  if far.sum() < 100:
    return
  inside = inside_labels(label, v)[far].mean()
  if inside > 0.5:
    conv = {'occupancy': '1 inside, 0 outside', 'sdf': 'negative inside',
            'pm1': '-1 inside, +1 outside (NeF-GPT)'}[label]
    raise DataError(f"data.label={label!r}: {inside:.0%} of the training points outside the shapes' box "
                    f"(|coordinate| > 0.49) are labelled inside; nfjax's convention for {label!r} is {conv}")


def occupancy_grid_size(points_per_shape: int) -> int:
  """Side r of the r^3 voxel grid that fit.prototypes clusters shapes on: about 8 training points per
  voxel, between 4 and 16 (the quick preset's 32,768 points: 16^3 voxels)."""
  return int(np.clip(np.round((points_per_shape / 8.0) ** (1.0 / 3.0)), 4, 16))


def voxel_occupancy(points: np.ndarray, inside: np.ndarray, r: int, chunk: int = 64) -> np.ndarray:
  """Each shape's training points voxelised: [N, r^3] share of a voxel's points that are inside (0 where
  a voxel has no point). Voxel (i, j, k) covers [-0.5, 0.5]^3 / r at (x, y, z) index (i, j, k), flattened
  in C order. `chunk` shapes at a time, so memory stays at chunk x points whatever N is."""
  out = np.zeros((len(points), r ** 3), np.float32)
  for lo in range(0, len(points), chunk):
    p = np.asarray(points[lo:lo + chunk], np.float32)
    idx = np.clip(np.floor((p + 0.5) * r).astype(np.int64), 0, r - 1)
    flat = (idx[..., 0] * r + idx[..., 1]) * r + idx[..., 2] + np.arange(len(p))[:, None] * r ** 3
    total = np.bincount(flat.ravel(), minlength=len(p) * r ** 3)
    hits = np.bincount(flat.ravel(), weights=np.asarray(inside[lo:lo + chunk], np.float64).ravel(),
                       minlength=len(p) * r ** 3)
    out[lo:lo + len(p)] = (hits / np.maximum(total, 1)).reshape(len(p), -1)
  return out


def _iou_score(spec: mlp.FieldSpec, level: float, inside_above: bool):
  def score(params, coords, values, held_points, held_occupancy):
    del coords, values
    return fitting.occupancy_iou(spec, level, inside_above, held_points, held_occupancy, params, IOU_CHUNK)
  return score


SHAPES_CAPTION = ("each pair: the shape the field was fitted to (its normalised mesh, or where there is none its "
                  "held-out inside points voxelised), then the field meshed at fit.render_resolution; "
                  "IoU = the field's IoU on the shape's held-out points")


def truth_mesh(data, i: int, resolution: int = 24):
  """The ground truth of shape i for a picture: its normalised mesh (data.meshes), else a mesh of its
  held-out occupancy voxelised on a resolution^3 grid (a voxel is inside when most of its points are)."""
  meshes = getattr(data, 'meshes', None)
  if meshes is not None:
    v, f = meshes[i]
    return np.asarray(v, np.float32), np.asarray(f, np.int32)
  pts = np.asarray(data.heldout_points[i], np.float64)
  occ = np.asarray(data.heldout_occupancy[i], np.float64) > 0.5
  r = int(resolution)
  idx = np.clip(np.round((pts + 0.5) * (r - 1)).astype(np.int64), 0, r - 1)
  flat = np.ravel_multi_index(idx.T, (r, r, r))
  total = np.bincount(flat, minlength=r ** 3)
  inside = np.bincount(flat, weights=occ.astype(np.float64), minlength=r ** 3)
  vol = np.where(total > 0, inside / np.maximum(total, 1), 0.0).reshape(r, r, r)
  return meshing.marching_cubes(vol, 0.5, 'above')


def shapes_panels(field_meshes, truths, quality, groups, row_labels):
  """The layout of fields/shapes.png: per row (class) a (ground truth, fitted field) pair per field,
  with the field's IoU under it. Returns (rows, col_labels, cell_labels)."""
  per_row = max(len(g) for g in groups)
  rows, cells, at = [], [], 0
  for g in groups:
    row, cell = [], []
    for j in range(per_row):
      if j < len(g):
        row += [truths[at + j], field_meshes[at + j]]
        cell += ['', f"IoU {float(quality[g[j]]):.3f}"]
      else:
        row += [None, None]
        cell += ['', '']
    rows.append(row)
    cells.append(cell)
    at += len(g)
  return rows, ['shape', 'field'] * per_row, cells


def _shapes_png(stage, config, spec, arrays, level: float, inside_above: bool, class_names: list[str],
                mesh, data=None) -> None:
  """fields/shapes.png: up to fit.num_reconstructions fitted fields, one row per class, each meshed
  (marching cubes at fit.render_resolution) beside its ground-truth shape, its held-out IoU under it.
  A failure here is logged, never fatal: the fitted dataset is already written."""
  k = min(int(config.fit.num_reconstructions), len(arrays['weights']))
  if k <= 0:
    return
  labels = np.asarray(arrays['labels'])
  classes = sorted(set(labels.tolist()))
  per_row = max(1, k // len(classes))  # equal rows: one per class, in dataset order
  groups = [np.nonzero(labels == c)[0][:per_row] for c in classes]
  try:
    weights = np.concatenate([arrays['weights'][g] for g in groups])
    meshes = meshing.mesh_fields(spec, weights, int(config.fit.render_resolution), level,
                                 'above' if inside_above else 'below', mesh=mesh)
    order = np.concatenate(groups)
    truths = [None] * len(order)
    if data is not None:
      for n, i in enumerate(order):
        try:
          truths[n] = truth_mesh(data, int(i))
        except Exception as e:  # noqa: BLE001 - a missing ground truth leaves its tile empty
          log(STAGE, f"shapes.png: no ground truth for shape {int(i)}: {type(e).__name__}: {e}")
    row_labels = [str(class_names[c]) if c < len(class_names) else f"class {c}" for c in classes]
    for name, g in zip(row_labels, groups):
      log(STAGE, f"shapes.png row {name}: fields {g.tolist()} IoU "
                 f"{' '.join(f'{x:.3f}' for x in arrays['quality'][g])}")
    rows, cols, cells = shapes_panels(meshes, truths, arrays['quality'], groups, row_labels)
    img = render3d.mesh_grid(rows, row_labels=row_labels, col_labels=cols, cell_labels=cells)
    title = (f"fitted fields beside their shapes (held-out IoU, mean of all {len(arrays['quality'])} fields: "
             f"{float(np.nanmean(arrays['quality'])):.3f})")
    img_utils.save_png(img_utils.captioned(img, title, SHAPES_CAPTION), stage.file('shapes.png'))
  except Exception as e:  # noqa: BLE001 - a picture must never cost the fitted dataset
    log(STAGE, f"WARNING: shapes.png not written: {type(e).__name__}: {e}")


def _prototypes_png(stage, config, spec, proto: dict, level: float, inside_above: bool, class_names: list[str],
                    mesh) -> None:
  """fields/prototypes.png: each class's prototype fields (fit.prototypes) meshed, one row per class, with how
  many shapes start from each. Never fatal."""
  try:
    labels = np.asarray(proto['labels'])
    used = np.bincount(np.asarray(proto['of_field']), minlength=len(labels))
    meshes = meshing.mesh_fields(spec, np.asarray(proto['weights']), int(config.fit.render_resolution), level,
                                 'above' if inside_above else 'below', mesh=mesh)
    classes = sorted(set(labels.tolist()))
    rows = [[meshes[i] for i in np.nonzero(labels == c)[0]] for c in classes]
    cells = [[f"{used[i]} shape{'' if used[i] == 1 else 's'}" for i in np.nonzero(labels == c)[0]] for c in classes]
    names = [str(class_names[c]) if c < len(class_names) else f"class {c}" for c in classes]
    img = render3d.mesh_grid(rows, row_labels=names, cell_labels=cells)
    img_utils.save_png(img_utils.captioned(
        img, 'prototype fields: each fitted to the medoid shape of a k-means cluster of its class (fit.prototypes)',
        'under each: how many shapes start from it'), stage.file('prototypes.png'))
  except Exception as e:  # noqa: BLE001 - a picture must never cost the fitted dataset
    log(STAGE, f"WARNING: prototypes.png not written: {type(e).__name__}: {e}")


def heldout_iou(config, workdir: str, meta: dict, weights: dict[str, np.ndarray], rows: np.ndarray,
                batch: int = 64) -> dict[str, np.ndarray]:
  """IoU on the held-out points of the shapes at `rows` (indices into the fit stage's shapes) for
  each named weight set [len(rows), P] (e.g. fitted, tokenized); the data is read once from the cache."""
  spec = mlp.FieldSpec.from_dict(meta['field'])
  level, above = float(meta['surface']['level']), meta['surface']['inside'] == 'above'
  hp, ho = shape_data.heldout(config, shape_data.cache_dir(config, workdir))   # not the training points
  score = jax.jit(jax.vmap(lambda p, x, o: fitting.occupancy_iou(spec, level, above, x, o, p, IOU_CHUNK)))

  def one(w_all: np.ndarray) -> np.ndarray:
    out = []
    for lo in range(0, len(rows), batch):
      idx = rows[lo:lo + batch]
      pad = batch - len(idx) if len(rows) > batch else 0   # one compiled shape for every batch
      sel = np.concatenate([idx, np.full(pad, idx[-1])]).astype(np.int64)
      w = np.concatenate([w_all[lo:lo + len(idx)], np.repeat(w_all[lo + len(idx) - 1:lo + len(idx)], pad, 0)])
      out.append(np.asarray(score(mlp.unflatten(spec, jnp.asarray(w)), jnp.asarray(hp[sel]),
                                  jnp.asarray(ho[sel])))[:len(idx)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  return {name: one(w) for name, w in weights.items()}


class Shapes(Modality):
  name = 'shapes'
  quality = IOU
  fit_keys = ('fit.sdf_clamp', 'fit.points_per_step', 'fit.shared_init_l2', 'fit.iou_floor')
  evaluate_keys = ('data.source', 'data.mesh_dir', 'data.synsets', 'data.split_file', 'data.normalize', 'evaluate')
  headline_keys = shape_eval.HEADLINE_KEYS

  def validate(self, config, stages):
    if stages & {'fit', 'sample', 'evaluate'}:   # meshes: reading them, marching cubes
      extras.require('shapes')
    if stages & {'fit', 'tokenize', 'evaluate'}:
      shape_data.validate(config)
    if 'fit' in stages:
      _validate_fit(config)
    if 'sample' in stages:
      if int(cfg_utils.check_positive(config, 'sample.mesh_resolution')) < 2:
        raise ConfigError(f"config key sample.mesh_resolution={config.sample.mesh_resolution} must be >= 2")
      cfg_utils.check_positive(config, 'sample.mesh_files', allow_zero=True)
      cfg_utils.get(config, 'sample.meshes_npz')
    if 'evaluate' in stages:
      shape_eval.validate(config)

  # -- fit -----------------------------------------------------------------------------------------
  def load(self, config, workdir):
    spec = mlp.FieldSpec.from_config(config.field)
    data = load_data(config, workdir)
    rows = check_data(config, spec, data)
    n, k = rows[0].shape[:2]
    level, above = surface(spec, config.fit.loss, config.data.label)
    per_step = int(config.fit.points_per_step)
    meta = {'class_names': list(data.class_names), 'names': list(data.names), 'label': config.data.label,
            'loss': config.fit.loss, 'surface': {'level': level, 'inside': 'above' if above else 'below', 'of': 'output'},
            'points_per_shape': int(k), 'heldout_points_per_shape': int(rows[2].shape[1]),
            'skipped': list(getattr(data, 'skipped', []) or [])}
    return FitData(rows=rows, labels=np.asarray(data.labels), source_index=np.asarray(data.source_index),
                   source=data.source, num_classes=int(data.num_classes), meta=meta, handle=data,
                   description=(f"{n} shapes from {data.source} ({k} points each, {rows[2].shape[1]} held out; labels "
                                f"{config.data.label}, loss {config.fit.loss}; {per_step if 0 < per_step < k else k} "
                                f"points per step)"))

  def make_fitter(self, spec, config, mesh, data):
    level, above = surface(spec, config.fit.loss, config.data.label)
    return StackFitter(spec, config, mesh, _iou_score(spec, level, above), points=True,
                       per_step=int(config.fit.points_per_step))

  def prototype_targets(self, data):
    """fit.prototypes: shapes share no points, so each is voxelised (its training points' inside share per
    voxel, `voxel_occupancy`) and clustered on that. A cluster's mean occupancy is no shape (thin parts
    average to shares under 0.5 and vanish), so its prototype field is fitted to the cluster's medoid: the
    shape of the cluster's class nearest its mean, with its own points and held-out IoU (fit.prototype_target
    'mean' is refused)."""
    points = data.rows[0]
    vectors = voxel_occupancy(points, inside_labels(data.meta['label'], np.asarray(data.rows[1])),
                              occupancy_grid_size(points.shape[1]))
    return PrototypeSpace(vectors, lambda idx: tuple(np.asarray(r)[idx] for r in data.rows), None)

  def fit_summary(self, config):
    return {'label': config.data.label, 'loss': config.fit.loss, 'points_per_step': int(config.fit.points_per_step)}

  def fit_pictures(self, stage, config, spec, data, arrays, mesh):
    s = data.meta['surface']
    _shapes_png(stage, config, spec, arrays, s['level'], s['inside'] == 'above', data.meta['class_names'], mesh,
                data=data.handle)
    proto = field_io.prototypes(stage.path)
    if proto is not None:
      _prototypes_png(stage, config, spec, proto, s['level'], s['inside'] == 'above', data.meta['class_names'], mesh)

  # -- tokenize ------------------------------------------------------------------------------------
  def tokenize_quality(self, config, workdir, fields, good, weights, labels, val_rows, stage):
    iou = heldout_iou(config, workdir, fields.meta, weights, good)
    out = {
        'iou_fields_mean': float(iou['fitted'].mean()), 'iou_tokenized_mean': float(iou['tokenized'].mean()),
        'iou_drop': float((iou['fitted'] - iou['tokenized']).mean()),
        'uniform_iou_tokenized_mean': float(iou['uniform'].mean()),
        'uniform_iou_drop': float((iou['fitted'] - iou['uniform']).mean()),
    }
    text = (f"IoU {out['iou_fields_mean']:.3f} -> {out['iou_tokenized_mean']:.3f} (uniform bins: "
            f"{out['uniform_iou_tokenized_mean']:.3f})")
    return out, text

  # -- sample / evaluate ---------------------------------------------------------------------------
  def sample_output(self, config, fields, spec):
    return ShapeOutput(config, fields, spec)

  def evaluator(self, config, workdir, fields, mesh):
    return shape_eval.ShapeEval(config, workdir, fields, mesh)


class ShapeOutput(SampleOutput):
  """Shape fields: every sample meshed at sample.mesh_resolution at the fields' surface level;
  meshes.npz (all), PLY files (the first sample.mesh_files), a grid PNG (rows = classes),
  meshes.json (empty meshes counted); a turntable GIF of one sample."""

  picture = 'turntable.gif'
  PER_CLASS = 8

  def __init__(self, config, fields, spec):
    surface = fields.meta.get('surface')
    if not surface or surface.get('inside') not in ('above', 'below'):
      raise DataError("fields/meta.json of a shape dataset has no valid 'surface' {level, inside}: "
                       "re-run the fit stage")
    self.spec = spec
    self.level, self.inside = float(surface['level']), str(surface['inside'])
    self.resolution = int(config.sample.mesh_resolution)
    self.num_files = int(config.sample.mesh_files)
    self.npz = bool(config.sample.meshes_npz)
    self.class_names = list(fields.meta.get('class_names') or [])

  def _mesh(self, weights):
    w = np.asarray(weights, np.float32)
    # Non-finite weights (a failed decode) mesh as empty: marching cubes counts NaN as outside.
    return meshing.mesh_fields(self.spec, w, self.resolution, self.level, self.inside)

  def _name(self, c: int) -> str:
    return str(self.class_names[c]) if c < len(self.class_names) else f"class {c}"

  def write(self, d, weights, labels, num_classes, setting=None) -> None:
    t0 = time.perf_counter()
    meshes = self._mesh(weights)
    seconds = time.perf_counter() - t0
    empty = [len(f) == 0 for _, f in meshes]
    if self.npz:
      files.write_npz(files.join(d, 'meshes.npz'), **sample_io.pack_meshes(
          meshes, resolution=self.resolution, level=self.level, inside=self.inside))
    for i, (v, f) in enumerate(meshes[:self.num_files]):
      meshing.write_ply(files.join(d, 'meshes', f'sample_{i:05d}.ply'), v, f)
    rows = picks.class_rows(labels, num_classes, self.PER_CLASS)
    img = render3d.mesh_grid([[meshes[i] for i in idx] for _, idx in rows],
                             row_labels=[self._name(c) for c, _ in rows], size=96)
    caption = (f"rows: the class each sample was conditioned on; one sample per tile, meshed at "
               f"{self.resolution}^3; 'empty' = no surface")
    img_utils.save_png(img_utils.captioned(img, img_utils.setting_title(setting or {}), caption),
                       files.join(d, 'grid.png'))
    faces = np.array([len(f) for _, f in meshes if len(f)], np.float64)
    files.write_json(files.join(d, 'meshes.json'), {
        'num_meshes': len(meshes), 'num_empty': int(sum(empty)), 'resolution': self.resolution,
        'level': self.level, 'inside': self.inside, 'faces_mean': float(faces.mean()) if len(faces) else 0.0,
        'meshing_seconds': seconds, 'ply_files': min(self.num_files, len(meshes)), 'npz': self.npz})
    log('sample', f"{files.basename(d)}: meshed {len(meshes)} samples at {self.resolution}^3 in {seconds:.1f}s, "
               f"{sum(empty)} empty")

  def summary(self, stage, settings) -> dict:
    stats = {st['name']: files.read_json(stage.file(st['name'], 'meshes.json')) for st in settings}
    return {'num_empty': {k: v['num_empty'] for k, v in stats.items()}, 'mesh_resolution': self.resolution,
            'meshing_seconds': float(sum(v['meshing_seconds'] for v in stats.values())),
            'surface': {'level': self.level, 'inside': self.inside}}

  def animate(self, stage, settings, decode, fields, prefix, tries: int = 16) -> None:
    """The first non-empty sample turning once (from meshes.npz, else the first `tries` samples of
    each setting meshed again)."""
    del decode, fields, prefix
    for st in settings:
      stored = sample_io.load_meshes(stage.workdir, st['name'])
      if stored is not None:
        meshes = stored[0]
      else:
        meshes = self._mesh(files.read_npy(stage.file(st['name'], 'weights.npy'))[:tries])
      for i, (v, f) in enumerate(meshes):
        if len(f):
          render3d.turntable_gif(stage.file(self.picture), v, f, frames=24, size=128)
          log('sample', f"{self.picture}: sample {i} of {st['name']}")
          return
    log('sample', f"{self.picture} not written: no sample of any setting has a non-empty mesh")


modalities.register(Shapes())
