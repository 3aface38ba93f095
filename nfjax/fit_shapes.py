"""The fit stage for 3D shapes: point sets with labels -> WORKDIR/fields (see nfjax/data/weights.py).

`nfjax.fit.run` hands the stage here when `data.kind == 'shape'`. Each shape is a set of
training points [n, 3] in [-0.5, 0.5]^3 with a label per point (`data.label`: 'occupancy' 0/1,
'sdf', or 'pm1' = NeF-GPT's -1 inside / +1 outside), plus held-out uniform points with their
occupancy, on which each fitted field's IoU is measured. Fitting is `nfjax.fit`'s machinery
(chunks, resume, the shared init, refit, the weight-dataset files) with two differences:

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
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import fit as fit_stage
from nfjax import sharding
from nfjax.data import weights as wds
from nfjax.errors import ConfigError, DataError
from nfjax.fields import fitting, mlp
from nfjax.utils import config as cfg_utils
from nfjax.utils import io
from nfjax.utils.logging import log
from nfjax.utils.stage import StageDir

STAGE = fit_stage.STAGE
DIRNAME = fit_stage.DIRNAME
LABELS = ('occupancy', 'sdf', 'pm1')
IOU = fit_stage.Quality('iou', 'IoU', 'iou', 'fit.iou_floor', '', 3)
FINGERPRINT_KEYS = ('seed', 'data', 'field', 'fit.steps', 'fit.lr', 'fit.schedule', 'fit.warmup_steps',
                    'fit.end_lr_factor', 'fit.b1', 'fit.b2', 'fit.loss', 'fit.l2', 'fit.sdf_clamp',
                    'fit.points_per_step', 'fit.init', 'fit.shared_init_index', 'fit.shared_init_steps',
                    'fit.shared_init_candidates', 'fit.shared_init_probe', 'fit.shared_init_l2',
                    'fit.refit_below', 'fit.refit_steps_factor', 'fit.chunk_size', 'fit.iou_floor')
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


def validate(config) -> mlp.FieldSpec:
  """Everything that can be checked before loading data or compiling."""
  try:
    from nfjax.data import shapes as shape_data
  except ImportError:  # the shape data module is optional until it lands; run() says so
    shape_data = None
  if shape_data is not None and hasattr(shape_data, 'validate'):
    shape_data.validate(config)
  fitting.validate(config, per_step_key='fit.points_per_step')
  label = cfg_utils.check_choice(config, 'data.label', LABELS)
  spec = mlp.FieldSpec.from_config(config.field)
  if spec.in_dims != 3:
    raise ConfigError(f"config key field.in_dims={spec.in_dims}: shape fields take 3-D coordinates "
                      f"(data.kind='shape'); set field.in_dims=3")
  if spec.out_dims != 1:
    raise ConfigError(f"config key field.out_dims={spec.out_dims}: shape fields have one output")
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
  cfg_utils.check_positive(config, 'fit.sdf_clamp', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.num_reconstructions', allow_zero=True)
  cfg_utils.check_positive(config, 'fit.render_resolution')
  for key in ('fit.shared_init_l2', 'fit.refit_below', 'fit.refit_steps_factor'):
    cfg_utils.get(config, key)  # must exist: they are part of the stage's fingerprint
  sharding.mesh_shape(config.mesh)
  return spec


def shape_cache_dir(config, workdir: str) -> str:
  """Where the shapes' points are cached: data.cache_dir, or WORKDIR/shape_data."""
  return config.data.get('cache_dir', '') or os.path.join(workdir, 'shape_data')


def load_data(config, workdir: str):
  """The ShapeSet to fit (nfjax.data.shapes.load), cached under shape_cache_dir(config, workdir)."""
  try:
    from nfjax.data import shapes as shape_data
  except ImportError as e:
    raise DataError("data.kind='shape' needs the shape data module nfjax/data/shapes.py") from e
  return shape_data.load(config, shape_cache_dir(config, workdir))


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


def _iou_score(spec: mlp.FieldSpec, level: float, inside_above: bool):
  def score(params, coords, values, held_points, held_occupancy):
    del coords, values
    return fitting.occupancy_iou(spec, level, inside_above, held_points, held_occupancy, params, IOU_CHUNK)
  return score


def make_fitter(spec: mlp.FieldSpec, config, mesh) -> fit_stage.StackFitter:
  """The fit stage's StackFitter for point fields, scoring each field by held-out IoU."""
  level, above = surface(spec, config.fit.loss, config.data.label)
  return fit_stage.StackFitter(spec, config, mesh, score=_iou_score(spec, level, above), points=True)


def run(config, workdir: str, data=None) -> dict:
  """The fit stage on shapes. `data` (a ShapeSet) replaces nfjax.data.shapes.load(config) when given."""
  t_start = time.perf_counter()
  spec = validate(config)
  stage = StageDir(workdir, DIRNAME, config, FINGERPRINT_KEYS)
  done = stage.finished()
  if done is not None:
    log(STAGE, f"already finished in {stage.path} ({done['num_fields']} fields, "
               f"IoU mean {done['iou_mean']:.3f}); skipping")
    return done

  data = load_data(config, workdir) if data is None else data
  rows = check_data(config, spec, data)
  n, k = rows[0].shape[:2]
  seed = int(config.seed)
  mesh = sharding.make_mesh(config.mesh)
  fitter = make_fitter(spec, config, mesh)
  chunk = int(config.fit.chunk_size)
  num_chunks = -(-n // chunk)
  per_step = int(config.fit.points_per_step)
  log(STAGE, f"{n} shapes from {data.source} ({k} points each, {rows[2].shape[1]} held out; labels "
             f"{config.data.label}, loss {config.fit.loss}); field {spec.num_params} params; {num_chunks} chunk(s) "
             f"of {min(chunk, n)} over {mesh.size} {jax.devices()[0].device_kind} device(s); {config.fit.steps} "
             f"steps of {per_step if 0 < per_step < k else k} points per field; init={config.fit.init}")

  shared = fit_stage.shared_init(stage, fitter, config, rows, seed, IOU)
  fitted_now, fit_seconds = fit_stage.fit_chunks(stage, config, fitter, rows, np.asarray(data.labels),
                                                 np.asarray(data.source_index), shared, seed, IOU)
  refit = fit_stage._refit(stage, config, fitter, rows, shared, seed, num_chunks, chunk, IOU)
  arrays = fit_stage.merge_chunks(stage, config, num_chunks, refit, IOU)
  level, above = surface(spec, config.fit.loss, config.data.label)
  meta = {
      'format': wds.FORMAT, 'kind': 'shape', 'field': spec.to_dict(), 'layout': spec.layout,
      'params_per_field': spec.num_params, 'num_fields': len(arrays['weights']),
      'num_classes': int(data.num_classes), 'class_names': list(data.class_names), 'names': list(data.names),
      'source': data.source, 'init': config.fit.init, 'quality_metric': IOU.metric,
      'shared_init_index': int(config.fit.shared_init_index), 'fingerprint': stage.fingerprint,
      'chunk_size': chunk, 'label': config.data.label, 'loss': config.fit.loss,
      'surface': {'level': level, 'inside': 'above' if above else 'below', 'of': 'output'},
      'points_per_shape': int(k), 'heldout_points_per_shape': int(rows[2].shape[1]),
      'skipped': list(getattr(data, 'skipped', []) or []),
  }
  io.write_json(stage.file('meta.json'), meta)
  _shapes_png(stage, config, spec, arrays, level, above, list(data.class_names), mesh)
  extra = {'label': config.data.label, 'loss': config.fit.loss, 'points_per_step': per_step}
  return fit_stage.finish(stage, config, spec, arrays, refit, fitted_now, fit_seconds, fitter.compile_seconds,
                          time.perf_counter() - t_start, mesh, data.source, IOU, extra)


def _shapes_png(stage, config, spec, arrays, level: float, inside_above: bool, class_names: list[str],
                mesh) -> None:
  """fields/shapes.png: marching-cubes meshes of up to fit.num_reconstructions fitted fields at
  fit.render_resolution, one row per class. A failure here is logged, never fatal: the fitted
  dataset is already written."""
  k = min(int(config.fit.num_reconstructions), len(arrays['weights']))
  if k <= 0:
    return
  try:
    from nfjax.fields import meshing
    from nfjax.utils import render3d
  except ImportError:
    log(STAGE, "shapes.png skipped: nfjax.fields.meshing / nfjax.utils.render3d are not available")
    return
  labels = np.asarray(arrays['labels'])
  classes = sorted(set(labels.tolist()))
  per_row = max(1, k // len(classes))  # equal rows: one per class, in dataset order
  groups = [np.nonzero(labels == c)[0][:per_row] for c in classes]
  try:
    weights = np.concatenate([arrays['weights'][g] for g in groups])
    meshes = meshing.mesh_fields(spec, weights, int(config.fit.render_resolution), level,
                                 'above' if inside_above else 'below', mesh=mesh)
    rows, row_labels, at = [], [], 0
    for c, g in zip(classes, groups):
      rows.append(meshes[at:at + len(g)] + [None] * (per_row - len(g)))
      at += len(g)
      row_labels.append(str(class_names[c]) if c < len(class_names) else str(c))
      log(STAGE, f"shapes.png row {row_labels[-1]}: fields {g.tolist()} IoU "
                 f"{' '.join(f'{x:.3f}' for x in arrays['quality'][g])}")
    render3d.mesh_grid_png(stage.file('shapes.png'), rows, row_labels=row_labels)
  except Exception as e:  # noqa: BLE001 - a picture must never cost the fitted dataset
    log(STAGE, f"WARNING: shapes.png not written: {type(e).__name__}: {e}")


def heldout_iou(config, workdir: str, meta: dict, weights: dict[str, np.ndarray], rows: np.ndarray,
                batch: int = 64) -> dict[str, np.ndarray]:
  """IoU on the held-out points of the shapes at `rows` (indices into the fit stage's shapes) for
  each named weight set [len(rows), P] (e.g. fitted, tokenized); the data is read once from the cache."""
  spec = mlp.FieldSpec.from_dict(meta['field'])
  level, above = float(meta['surface']['level']), meta['surface']['inside'] == 'above'
  from nfjax.data import shapes as shape_data
  hp, ho = shape_data.heldout(config, shape_cache_dir(config, workdir))   # not the training points
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
