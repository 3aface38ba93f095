"""The fit stage: images -> WORKDIR/fields (the weight dataset, see nfjax/data/weights.py).

Fields are fitted in chunks of `fit.chunk_size`; each chunk is one call of a compiled
jit(vmap(fit_one)) with the field axis sharded over every device. Finished chunks are written
atomically, so a killed run re-run with the same command skips them and ends with the same
dataset. `fit.init='shared'` first fits one field from scratch (NeF-GPT's "unconditioned" NeF)
and starts every field from it, which aligns weights across fields.

Two kinds of field, chosen by `data.kind` ('image' when the key is absent, or 'shape'): images
are fitted here; `data.kind='shape'` hands the whole stage to nfjax/fit_shapes.py, which reuses
this module's fitter, shared-init search, chunk loop, refit and dataset writing with point
batches and IoU in place of the pixel grid and PSNR.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import sharding
from nfjax.data import images as image_data
from nfjax.data import weights as wds
from nfjax.errors import ConfigError
from nfjax.fields import fitting, mlp
from nfjax.utils import config as cfg_utils
from nfjax.utils import images as img_utils
from nfjax.utils import io
from nfjax.utils.logging import MetricsWriter, Progress, log
from nfjax.utils.stage import StageDir

STAGE = 'fit'
DIRNAME = 'fields'
FINGERPRINT_KEYS = ('seed', 'data', 'field', 'fit.steps', 'fit.lr', 'fit.schedule', 'fit.warmup_steps',
                    'fit.end_lr_factor', 'fit.b1', 'fit.b2', 'fit.loss', 'fit.l2', 'fit.pixels_per_step',
                    'fit.init', 'fit.shared_init_index', 'fit.shared_init_steps', 'fit.shared_init_candidates',
                    'fit.shared_init_probe', 'fit.refit_below', 'fit.refit_steps_factor', 'fit.chunk_size',
                    'fit.psnr_floor')


KINDS = ('image', 'shape')


@dataclasses.dataclass(frozen=True)
class Quality:
  """How a field kind scores its fits (higher is better)."""
  name: str          # summary.json prefix (psnr_mean, iou_mean, ...)
  label: str         # in logs
  metric: str        # meta.json quality_metric
  floor_key: str     # config key of the flagging floor
  unit: str
  digits: int

  def fmt(self, x: float) -> str:
    return f"{x:.{self.digits}f}{self.unit}"


PSNR = Quality('psnr', 'PSNR', 'psnr_db', 'fit.psnr_floor', ' dB', 2)


def field_kind(config) -> str:
  """'image' or 'shape': `data.kind`, 'image' when the config has no such key."""
  kind = config.data.get('kind', 'image')
  if kind not in KINDS:
    raise ConfigError(f"config key data.kind={kind!r} is not one of {', '.join(map(repr, KINDS))}")
  return kind


def fingerprint_keys(config) -> tuple[str, ...]:
  """The config keys the fields/ directory depends on, for this config's field kind."""
  if field_kind(config) == 'shape':
    from nfjax import fit_shapes
    return fit_shapes.FINGERPRINT_KEYS
  return FINGERPRINT_KEYS


def validate(config) -> mlp.FieldSpec:
  """Everything that can be checked before loading data or compiling."""
  if field_kind(config) == 'shape':
    from nfjax import fit_shapes
    return fit_shapes.validate(config)
  image_data.validate(config)
  fitting.validate(config)
  spec = mlp.FieldSpec.from_config(config.field)
  if spec.in_dims != 2:
    raise ConfigError(f"config key field.in_dims={spec.in_dims}: image fields take 2-D coordinates")
  sharding.mesh_shape(config.mesh)
  return spec


def _score_fn(spec: mlp.FieldSpec):
  def score(params, feats, target):
    raw = mlp.apply_encoded(spec, params, feats)
    pred = jax.nn.sigmoid(raw) if spec.output_activation == 'none' else mlp.output(spec, raw)
    return mlp.psnr(pred, target, axis=(0, 1))
  return score


def _field_keys(seed: int, ids: np.ndarray, stream: int = 0xF17) -> jax.Array:
  base = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))


def _initial_params(spec, shared: np.ndarray | None, keys: jax.Array):
  """The shared init broadcast to every field, or a per-field random init from its key."""
  if shared is not None:
    if shared.ndim == 2:  # one init per field
      return mlp.unflatten(spec, jnp.asarray(shared))
    return mlp.stack(mlp.unflatten(spec, jnp.asarray(shared)), keys.shape[0])
  return jax.vmap(lambda k: mlp.init(spec, jax.random.fold_in(k, 1)))(keys)


def take(targets, idx):
  """Rows `idx` of per-field data: an array, or a tuple of arrays with a common leading axis."""
  if isinstance(targets, tuple):
    return tuple(np.asarray(t)[idx] for t in targets)
  return targets[idx]


def _num_rows(targets) -> int:
  return len(targets[0]) if isinstance(targets, tuple) else len(targets)


class StackFitter:
  """Fits stacks of fields on the mesh; pads each stack to a multiple of the field-axis shards and
  compiles once per (steps, padded size, data shapes, l2 override).

  Image fields (the default): `feats` are the encoded pixel grid shared by every field and the
  per-field data are the targets [n, pixels, 1]. Point fields (`points=True`, 3D shapes): no
  shared features; the per-field data are a tuple (coords [n, k, d], values [n, k], *extra) where
  `extra` (e.g. held-out points and occupancy) is read only by `score(params, coords, values, *extra)`.
  """

  def __init__(self, spec, config, mesh, feats=None, score=None, points: bool = False):
    self.spec, self.config, self.mesh = spec, config, mesh
    self.points = points
    self.shards = sharding.axis_size(mesh, 'fields')
    self.feats = None if feats is None else jax.device_put(feats, sharding.replicated(mesh))
    self.score = score if score is not None else _score_fn(spec)
    self._compiled = {}
    self.compile_seconds = 0.0

  def padded_size(self, n: int) -> int:
    return -(-n // self.shards) * self.shards

  def _split(self, rows: tuple):
    """Per-field rows -> (feats, targets, extra) in the compiled function's argument order."""
    if self.points:
      return rows[0], rows[1], tuple(rows[2:])
    return self.feats, rows[0], ()

  def fit_config(self, l2: float | None = None):
    if l2 is None or float(l2) == float(self.config.fit.l2):
      return self.config.fit
    cfg = self.config.fit.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.l2 = float(l2)
    return cfg

  def compile(self, steps: int, count: int, like, l2: float | None = None):
    """The compiled fitter for `count` fields whose per-field data look like `like` (any leading size)."""
    rows = like if isinstance(like, tuple) else (like,)
    shapes = tuple((tuple(r.shape[1:]), str(r.dtype)) for r in rows)
    l2 = None if l2 is None or float(l2) == float(self.config.fit.l2) else float(l2)
    key = (steps, count, shapes, l2)
    if key not in self._compiled:
      t0 = time.perf_counter()
      keys = _field_keys(0, np.arange(count))
      params = jax.eval_shape(jax.vmap(lambda k: mlp.init(self.spec, k)), keys)
      abstract = tuple(jax.ShapeDtypeStruct((count,) + s, d) for s, d in shapes)
      feats, targets, extra = self._split(abstract)
      compile_for = fitting.make_stack_fitter(self.spec, self.fit_config(l2), steps, self.mesh,
                                              score=self.score, points=self.points)
      self._compiled[key] = compile_for(params, feats, targets, keys, *extra)
      self.compile_seconds += time.perf_counter() - t0
    return self._compiled[key]

  def fit(self, steps: int, targets, keys: jax.Array, shared: np.ndarray | None,
          pad_to: int | None = None, l2: float | None = None):
    """Per-field data (images: targets [n, pixels, 1]; points: a tuple, see the class), keys [n]
    -> (weights [n, P], loss [n], quality [n]) as numpy. `l2` overrides fit.l2 for this call."""
    rows = targets if isinstance(targets, tuple) else (targets,)
    n = len(rows[0])
    padded = max(self.padded_size(n), pad_to or 0)
    sel = np.concatenate([np.arange(n), np.full(padded - n, n - 1)])
    keys = keys[sel]
    rows = tuple(np.asarray(r)[sel] for r in rows)
    init = shared[sel] if shared is not None and shared.ndim == 2 else shared
    params = _initial_params(self.spec, init, keys)
    compiled = self.compile(steps, padded, rows, l2)
    mesh = self.mesh
    params = jax.device_put(params, sharding.leading_axis_sharding(mesh, params))
    rows = tuple(jax.device_put(r, sharding.named(mesh, 'fields', *([None] * (r.ndim - 1)))) for r in rows)
    keys = jax.device_put(keys, sharding.named(mesh, 'fields'))
    feats, tgt, extra = self._split(rows)
    params, loss, score = compiled(params, feats, tgt, keys, *extra)
    w = np.asarray(mlp.flatten(self.spec, params), np.float32)[:n]
    return w, np.asarray(loss)[:n], np.asarray(score, np.float32)[:n]


def _search_shared_init(fitter: StackFitter, config, targets, seed: int,
                        quality: Quality = PSNR) -> tuple[np.ndarray, dict]:
  """Fit candidate inits on one field from different seeds; keep the one whose probe fits are best.

  The candidates are fitted with fit.shared_init_l2 when the config has it and it is >= 0 (NeF-GPT
  penalises only its init field), else with fit.l2.
  """
  fit_cfg = config.fit
  k = max(1, int(fit_cfg.shared_init_candidates))
  field = int(fit_cfg.shared_init_index)
  init_l2 = float(fit_cfg.get('shared_init_l2', -1.0))
  init_l2 = None if init_l2 < 0 else init_l2
  q_name = quality.name
  cand_keys = _field_keys(seed, np.arange(k), stream=0x1417)
  w, _, init_q = fitter.fit(int(fit_cfg.shared_init_steps), take(targets, np.full(k, field)), cand_keys, None,
                            l2=init_l2)
  info = {'field': field, 'candidates': k, f'candidate_{q_name}': init_q.tolist()}
  if k == 1:
    best = 0
  else:
    n = _num_rows(targets)
    rng = np.random.default_rng(seed + 1)
    probe = np.sort(rng.choice(n, min(int(fit_cfg.shared_init_probe), n), replace=False))
    m = len(probe)
    probe_keys = _field_keys(seed, probe)
    inits = np.repeat(w, m, axis=0)  # candidate-major: [k*m, P]
    _, _, q = fitter.fit(int(fit_cfg.steps), take(targets, np.tile(probe, k)), jnp.tile(probe_keys, (k, 1)), inits)
    probe_mean = np.nan_to_num(q.reshape(k, m), nan=-np.inf).mean(1)
    best = int(np.argmax(probe_mean))
    info.update({'probe_fields': probe.tolist(), f'probe_{q_name}_mean': probe_mean.tolist()})
  info['chosen'] = best
  upper = quality.label
  log(STAGE, f"shared init: {k} candidate(s) fitted on field {field} ({fit_cfg.shared_init_steps} steps, {upper} "
             f"{', '.join(quality.fmt(x) for x in init_q)}"
             + (f", l2 {init_l2:g}" if init_l2 is not None else '') + ")"
             + (f"; probe mean {upper} {', '.join(quality.fmt(x) for x in info[f'probe_{q_name}_mean'])} "
                f"on {m} fields" if k > 1 else '') + f"; chose candidate {best}")
  return w[best], info


def shared_init(stage: StageDir, fitter: StackFitter, config, targets, seed: int,
                quality: Quality = PSNR) -> np.ndarray | None:
  """fields/shared_init.npy: read back when a previous run wrote it, else searched and written."""
  if config.fit.init != 'shared':
    return None
  init_path = stage.file('shared_init.npy')
  if os.path.exists(init_path):
    return np.load(init_path)
  shared, info = _search_shared_init(fitter, config, targets, seed, quality)
  io.write_json(stage.file('shared_init.json'), info)
  io.write_npy(init_path, shared)
  return shared


def fit_chunks(stage: StageDir, config, fitter: StackFitter, targets, labels: np.ndarray,
               source_index: np.ndarray, shared: np.ndarray | None, seed: int,
               quality: Quality = PSNR) -> tuple[int, float]:
  """Fit every chunk not on disk yet, writing each atomically. Returns (fields fitted, seconds)."""
  n = _num_rows(targets)
  chunk = int(config.fit.chunk_size)
  num_chunks = -(-n // chunk)
  have = {c for c in wds.finished_chunks(stage.path) if c < num_chunks}
  fields_done = sum(min(chunk, n - c * chunk) for c in have)
  if have:
    log(STAGE, f"resuming: {len(have)}/{num_chunks} chunks already fitted ({fields_done} fields)")
  metrics = MetricsWriter(stage.path)
  progress = Progress(STAGE, n, 'fields')
  fitted_now = 0
  fit_seconds = 0.0
  pad_to = fitter.padded_size(min(chunk, n))
  q_name = quality.name
  for c in range(num_chunks):
    if c in have:
      continue
    lo, hi = c * chunk, min(n, (c + 1) * chunk)
    if progress.t0 is None:  # compile before the clock starts: rates and ETA exclude compilation
      fitter.compile(int(config.fit.steps), pad_to, take(targets, np.arange(lo, lo + 1)))
      progress.start(fields_done)
    w, loss, q = fitter.fit(int(config.fit.steps), take(targets, np.arange(lo, hi)),
                            _field_keys(seed, np.arange(lo, hi)), shared, pad_to=pad_to)
    flags = _flags(config, w, loss, q, quality)
    io.write_npz(wds.chunk_path(stage.path, c), weights=w, labels=labels[lo:hi],
                 source_index=source_index[lo:hi], quality=q, flags=flags)
    fields_done += hi - lo
    fitted_now += hi - lo
    finite = q[np.isfinite(q)]
    mean, low = (float(finite.mean()), float(finite.min())) if len(finite) else (float('nan'), float('nan'))
    rate = progress.update(fields_done, f"chunk {c + 1}/{num_chunks} {quality.label} "
                                        f"mean {mean:.{quality.digits}f} min {quality.fmt(low)}"
                                        + (f"  {int((flags > 0).sum())} flagged" if flags.any() else ''))
    metrics.write(fields_done, **{f'{q_name}_mean': mean, f'{q_name}_min': low}, fields_per_sec=rate,
                  flagged=int((flags > 0).sum()))
    fit_seconds = progress.elapsed
  metrics.close()
  return fitted_now, fit_seconds


def run(config, workdir: str) -> dict:
  if field_kind(config) == 'shape':
    from nfjax import fit_shapes
    return fit_shapes.run(config, workdir)
  t_start = time.perf_counter()
  spec = validate(config)
  stage = StageDir(workdir, DIRNAME, config, FINGERPRINT_KEYS)
  done = stage.finished()
  if done is not None:
    log(STAGE, f"already finished in {stage.path} ({done['num_fields']} fields, "
               f"PSNR mean {done['psnr_mean']:.2f} dB); skipping")
    return done

  data = image_data.load(config)
  n = len(data.images)
  if n == 0:
    raise ConfigError("no images to fit: data.num_fields selected 0 images")
  init_index = int(config.fit.shared_init_index)
  if config.fit.init == 'shared' and not 0 <= init_index < n:
    raise ConfigError(f"config key fit.shared_init_index={init_index} is outside the {n} selected images")
  height, width = data.images.shape[1:]
  targets = data.images.reshape(n, height * width, 1)
  seed = int(config.seed)
  mesh = sharding.make_mesh(config.mesh)
  fitter = StackFitter(spec, config, mesh, mlp.encode(spec, jnp.asarray(mlp.pixel_centres(height, width))))
  chunk = int(config.fit.chunk_size)
  num_chunks = -(-n // chunk)
  log(STAGE, f"{n} images from {data.source}; field {spec.num_params} params; {num_chunks} chunk(s) of "
             f"{min(chunk, n)} over {mesh.size} {jax.devices()[0].device_kind} device(s); "
             f"{config.fit.steps} steps per field; init={config.fit.init}")

  shared = shared_init(stage, fitter, config, targets, seed)
  fitted_now, fit_seconds = fit_chunks(stage, config, fitter, targets, data.labels, data.source_index, shared, seed)
  refit = _refit(stage, config, fitter, targets, shared, seed, num_chunks, chunk)
  arrays = merge_chunks(stage, config, num_chunks, refit)
  meta = {
      'format': wds.FORMAT, 'kind': 'image', 'field': spec.to_dict(), 'layout': spec.layout,
      'params_per_field': spec.num_params, 'num_fields': len(arrays['weights']), 'image_shape': [height, width],
      'num_classes': data.num_classes, 'source': data.source, 'init': config.fit.init,
      'quality_metric': PSNR.metric, 'shared_init_index': int(config.fit.shared_init_index),
      'fingerprint': stage.fingerprint, 'chunk_size': chunk,
  }
  io.write_json(stage.file('meta.json'), meta)
  _reconstructions_png(stage, config, spec, data, arrays, (height, width))
  return finish(stage, config, spec, arrays, refit, fitted_now, fit_seconds, fitter.compile_seconds,
                time.perf_counter() - t_start, mesh, data.source)


def _flags(config, w, loss, q, quality: Quality = PSNR) -> np.ndarray:
  flags = np.zeros(len(w), np.uint8)
  flags[~(np.isfinite(loss) & np.isfinite(w).all(1))] |= wds.FLAG_NONFINITE
  flags[~(q >= float(cfg_utils.get(config, quality.floor_key)))] |= wds.FLAG_LOW_QUALITY
  return flags


def _refit(stage, config, fitter, targets, shared, seed, num_chunks, chunk,
           quality: Quality = PSNR) -> dict | None:
  """Second chance for the fields under fit.refit_below: longer fit, keep the better result."""
  threshold = float(config.fit.get('refit_below', 0.0))
  if threshold <= 0:
    return None
  path = stage.file('chunks', 'refit.npz')
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  q = np.concatenate([wds.read_chunk(stage.path, c)['quality'] for c in range(num_chunks)])
  ids = np.nonzero(~(q >= threshold))[0]
  steps = int(config.fit.steps) * int(config.fit.refit_steps_factor)
  out = {'ids': ids, 'weights': np.zeros((0, fitter.spec.num_params), np.float32),
         'quality': np.zeros((0,), np.float32), 'loss': np.zeros((0,), np.float32)}
  if len(ids):
    t0 = time.perf_counter()
    keys = _field_keys(seed, ids, stream=0x2EF17)
    w, loss, new_q = fitter.fit(steps, take(targets, ids), keys, shared)
    before = q[ids]
    better = np.nan_to_num(new_q, nan=-np.inf) > np.nan_to_num(before, nan=-np.inf)
    name = quality.label
    log(STAGE, f"refit {len(ids)} field(s) under {quality.fmt(threshold)} with {steps} steps in "
               f"{time.perf_counter() - t0:.1f}s: mean {name} {np.nanmean(before):.{quality.digits}f} -> "
               f"{quality.fmt(np.nanmean(np.where(better, new_q, before)))} ({int(better.sum())} improved)")
    out = {'ids': ids[better], 'weights': w[better], 'quality': new_q[better], 'loss': loss[better]}
  io.write_npz(path, **out)
  return out


def merge_chunks(stage, config, num_chunks, refit, quality: Quality = PSNR) -> dict[str, np.ndarray]:
  """The finished chunks (and refits) -> the dataset's .npy files; returns the arrays."""
  parts = [wds.read_chunk(stage.path, c) for c in range(num_chunks)]
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in wds.ARRAYS}
  if refit is not None and len(refit['ids']):
    ids = refit['ids']
    arrays['weights'][ids] = refit['weights']
    arrays['quality'][ids] = refit['quality']
    arrays['flags'][ids] = _flags(config, refit['weights'], refit['loss'], refit['quality'], quality)
  for k in wds.ARRAYS:
    io.write_npy(stage.file(f'{k}.npy'), arrays[k])
  return arrays


def finish(stage, config, spec, arrays, refit, fitted_now, fit_seconds, compile_seconds, seconds, mesh,
           source: str, quality: Quality = PSNR, extra: dict | None = None) -> dict:
  """summary.json (written last: it marks the dataset complete); removes the chunks."""
  n = len(arrays['weights'])
  q, flags = arrays['quality'], arrays['flags']
  finite = q[np.isfinite(q)]
  flagged = np.nonzero(flags)[0]
  floor = cfg_utils.get(config, quality.floor_key)
  if len(flagged):
    log(STAGE, f"WARNING: {len(flagged)} field(s) flagged (non-finite or {quality.label} < {quality.fmt(floor)}), "
               f"kept in the dataset but excluded from later stages: ids {flagged[:20].tolist()}"
               + (' ...' if len(flagged) > 20 else ''))
  stats = {
      'mean': float(finite.mean()) if len(finite) else float('nan'),
      'p10': float(np.percentile(finite, 10)) if len(finite) else float('nan'),
      'min': float(finite.min()) if len(finite) else float('nan'),
  }
  summary = {
      'num_fields': n, 'params_per_field': spec.num_params,
      **{f'{quality.name}_{k}': v for k, v in stats.items()},
      'quality_metric': quality.metric, **{f'quality_{k}': v for k, v in stats.items()},
      'num_flagged': int(len(flagged)), 'num_nonfinite': int(((flags & wds.FLAG_NONFINITE) > 0).sum()),
      'fields_fitted_this_run': int(fitted_now),
      'fields_per_sec': float(fitted_now / fit_seconds) if fit_seconds > 0 and fitted_now else float('nan'),
      'seconds': float(seconds), 'compile_seconds': float(compile_seconds),
      'device_kind': jax.devices()[0].device_kind, 'num_devices': int(mesh.size),
      'steps_per_field': int(config.fit.steps), 'init': config.fit.init, 'source': source,
      'num_refitted': int(len(refit['ids'])) if refit is not None else 0,
      **(extra or {}),
  }
  stage.write_summary(summary)
  shutil.rmtree(stage.file('chunks'), ignore_errors=True)
  name = quality.label
  d = quality.digits
  log(STAGE, f"done: {n} fields, {name} mean {stats['mean']:.{d}f} / p10 {stats['p10']:.{d}f} / "
             f"min {quality.fmt(stats['min'])}, {summary['fields_per_sec']:.1f} fields/s "
             f"(compile {compile_seconds:.1f}s, total {seconds:.1f}s) -> {stage.path}")
  return summary


def spread_over_classes(labels: np.ndarray, k: int) -> np.ndarray:
  """k field ids spread over classes (the first field of each class in turn), sorted."""
  order = []
  per_class = [list(np.nonzero(labels == c)[0]) for c in range(int(labels.max()) + 1)] if len(labels) else []
  while len(order) < k and any(per_class):
    for lst in per_class:
      if lst and len(order) < k:
        order.append(lst.pop(0))
  return np.array(sorted(order), np.int64)


def _reconstructions_png(stage, config, spec, data, arrays, shape) -> None:
  k = min(int(config.fit.num_reconstructions), len(arrays['weights']))
  if k <= 0:
    return
  labels = arrays['labels']
  idx = spread_over_classes(labels, k)
  recon = mlp.render_weights(spec, arrays['weights'][idx], *shape)
  cols = [f"{labels[i]} {arrays['quality'][i]:.1f}dB" for i in idx]
  img = img_utils.grid([data.images[idx], recon], row_labels=['original', 'fitted'], col_labels=cols)
  img_utils.save_png(img, stage.file('reconstructions.png'))
