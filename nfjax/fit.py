"""The fit stage: images -> WORKDIR/fields (the weight dataset, see nfjax/data/weights.py).

Fields are fitted in chunks of `fit.chunk_size`; each chunk is one call of a compiled
jit(vmap(fit_one)) with the field axis sharded over every device. Finished chunks are written
atomically, so a killed run re-run with the same command skips them and ends with the same
dataset. `fit.init='shared'` first fits one field from scratch (NeF-GPT's "unconditioned" NeF)
and starts every field from it, which aligns weights across fields.
"""

from __future__ import annotations

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


def validate(config) -> mlp.FieldSpec:
  """Everything that can be checked before loading data or compiling."""
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


class StackFitter:
  """Fits stacks of fields on the mesh; pads each stack to a multiple of the field-axis shards and
  compiles once per (steps, padded size)."""

  def __init__(self, spec, config, mesh, feats):
    self.spec, self.config, self.mesh = spec, config, mesh
    self.shards = sharding.axis_size(mesh, 'fields')
    self.feats = jax.device_put(feats, sharding.replicated(mesh))
    self._compiled = {}
    self.compile_seconds = 0.0

  def padded_size(self, n: int) -> int:
    return -(-n // self.shards) * self.shards

  def _get(self, steps: int, params, targets, keys):
    key = (steps, keys.shape[0])
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = fitting.make_stack_fitter(self.spec, self.config.fit, steps, self.mesh,
                                                      score=_score_fn(self.spec))(params, self.feats, targets, keys)
      self.compile_seconds += time.perf_counter() - t0
    return self._compiled[key]

  def fit(self, steps: int, targets: np.ndarray, keys: jax.Array, shared: np.ndarray | None,
          pad_to: int | None = None):
    """targets [n, pixels, 1], keys [n] -> (weights [n, P], loss [n], psnr [n]) as numpy."""
    n = len(targets)
    padded = max(self.padded_size(n), pad_to or 0)
    sel = np.concatenate([np.arange(n), np.full(padded - n, n - 1)])
    keys = keys[sel]
    init = shared[sel] if shared is not None and shared.ndim == 2 else shared
    params = _initial_params(self.spec, init, keys)
    tgt = jnp.asarray(targets[sel])
    compiled = self._get(steps, params, tgt, keys)
    mesh = self.mesh
    params = jax.device_put(params, sharding.leading_axis_sharding(mesh, params))
    tgt = jax.device_put(tgt, sharding.named(mesh, 'fields', None, None))
    keys = jax.device_put(keys, sharding.named(mesh, 'fields'))
    params, loss, score = compiled(params, self.feats, tgt, keys)
    w = np.asarray(mlp.flatten(self.spec, params), np.float32)[:n]
    return w, np.asarray(loss)[:n], np.asarray(score, np.float32)[:n]


def _search_shared_init(fitter: StackFitter, config, targets: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
  """Fit candidate inits on one field from different seeds; keep the one whose probe fits are best."""
  fit_cfg = config.fit
  k = max(1, int(fit_cfg.shared_init_candidates))
  field = int(fit_cfg.shared_init_index)
  cand_keys = _field_keys(seed, np.arange(k), stream=0x1417)
  w, _, init_psnr = fitter.fit(int(fit_cfg.shared_init_steps), np.repeat(targets[field:field + 1], k, 0),
                               cand_keys, None)
  info = {'field': field, 'candidates': k, 'candidate_psnr': init_psnr.tolist()}
  if k == 1:
    best = 0
  else:
    rng = np.random.default_rng(seed + 1)
    probe = np.sort(rng.choice(len(targets), min(int(fit_cfg.shared_init_probe), len(targets)), replace=False))
    m = len(probe)
    probe_keys = _field_keys(seed, probe)
    inits = np.repeat(w, m, axis=0)  # candidate-major: [k*m, P]
    _, _, q = fitter.fit(int(fit_cfg.steps), np.tile(targets[probe], (k, 1, 1)),
                         jnp.tile(probe_keys, (k, 1)), inits)
    probe_mean = np.nan_to_num(q.reshape(k, m), nan=-np.inf).mean(1)
    best = int(np.argmax(probe_mean))
    info.update(probe_fields=probe.tolist(), probe_psnr_mean=probe_mean.tolist())
  info['chosen'] = best
  log(STAGE, f"shared init: {k} candidate(s) fitted on field {field} ({fit_cfg.shared_init_steps} steps, PSNR "
             f"{', '.join(f'{x:.1f}' for x in init_psnr)} dB)"
             + (f"; probe mean PSNR {', '.join(f'{x:.2f}' for x in info['probe_psnr_mean'])} dB on {m} fields"
                if k > 1 else '') + f"; chose candidate {best}")
  return w[best], info


def run(config, workdir: str) -> dict:
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

  shared = None
  if config.fit.init == 'shared':
    init_path = stage.file('shared_init.npy')
    if os.path.exists(init_path):
      shared = np.load(init_path)
    else:
      shared, info = _search_shared_init(fitter, config, targets, seed)
      io.write_json(stage.file('shared_init.json'), info)
      io.write_npy(init_path, shared)

  have = {c for c in wds.finished_chunks(stage.path) if c < num_chunks}
  fields_done = sum(min(chunk, n - c * chunk) for c in have)
  if have:
    log(STAGE, f"resuming: {len(have)}/{num_chunks} chunks already fitted ({fields_done} fields)")
  metrics = MetricsWriter(stage.path)
  progress = Progress(STAGE, n, 'fields')
  fitted_now = 0
  fit_seconds = 0.0
  pad_to = fitter.padded_size(min(chunk, n))
  for c in range(num_chunks):
    if c in have:
      continue
    lo, hi = c * chunk, min(n, (c + 1) * chunk)
    if progress.t0 is None:  # compile before the clock starts: rates and ETA exclude compilation
      fitter._get(int(config.fit.steps), *_abstract_inputs(fitter, spec, pad_to, targets, shared, seed))
      progress.start(fields_done)
    w, loss, psnr = fitter.fit(int(config.fit.steps), targets[lo:hi], _field_keys(seed, np.arange(lo, hi)),
                               shared, pad_to=pad_to)
    flags = _flags(config, w, loss, psnr)
    io.write_npz(wds.chunk_path(stage.path, c), weights=w, labels=data.labels[lo:hi],
                 source_index=data.source_index[lo:hi], quality=psnr, flags=flags)
    fields_done += hi - lo
    fitted_now += hi - lo
    finite = psnr[np.isfinite(psnr)]
    mean, low = (float(finite.mean()), float(finite.min())) if len(finite) else (float('nan'), float('nan'))
    rate = progress.update(fields_done, f"chunk {c + 1}/{num_chunks} PSNR mean {mean:.2f} min {low:.2f} dB"
                                        + (f"  {int((flags > 0).sum())} flagged" if flags.any() else ''))
    metrics.write(fields_done, psnr_mean=mean, psnr_min=low, fields_per_sec=rate, flagged=int((flags > 0).sum()))
    fit_seconds = progress.elapsed
  metrics.close()
  refit = _refit(stage, config, fitter, targets, shared, seed, num_chunks, chunk)
  return _finish(stage, config, spec, data, num_chunks, chunk, (height, width), refit,
                 fitted_now, fit_seconds, fitter.compile_seconds, time.perf_counter() - t_start, mesh)


def _abstract_inputs(fitter, spec, padded, targets, shared, seed):
  keys = _field_keys(seed, np.arange(padded))
  init = _initial_params(spec, shared, keys)
  return init, jnp.zeros((padded,) + targets.shape[1:], jnp.float32), keys


def _flags(config, w, loss, psnr) -> np.ndarray:
  flags = np.zeros(len(w), np.uint8)
  flags[~(np.isfinite(loss) & np.isfinite(w).all(1))] |= wds.FLAG_NONFINITE
  flags[~(psnr >= float(config.fit.psnr_floor))] |= wds.FLAG_LOW_QUALITY
  return flags


def _refit(stage, config, fitter, targets, shared, seed, num_chunks, chunk) -> dict | None:
  """Second chance for the fields under fit.refit_below dB: longer fit, keep the better result."""
  threshold = float(config.fit.refit_below)
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
    w, loss, psnr = fitter.fit(steps, targets[ids], keys, shared)
    before = q[ids]
    better = np.nan_to_num(psnr, nan=-np.inf) > np.nan_to_num(before, nan=-np.inf)
    log(STAGE, f"refit {len(ids)} field(s) under {threshold:.1f} dB with {steps} steps in "
               f"{time.perf_counter() - t0:.1f}s: mean PSNR {np.nanmean(before):.2f} -> "
               f"{np.nanmean(np.where(better, psnr, before)):.2f} dB ({int(better.sum())} improved)")
    out = {'ids': ids[better], 'weights': w[better], 'quality': psnr[better], 'loss': loss[better]}
  io.write_npz(path, **out)
  return out


def _finish(stage, config, spec, data, num_chunks, chunk, shape, refit, fitted_now, fit_seconds,
            compile_seconds, seconds, mesh) -> dict:
  parts = [wds.read_chunk(stage.path, c) for c in range(num_chunks)]
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in wds.ARRAYS}
  if refit is not None and len(refit['ids']):
    ids = refit['ids']
    arrays['weights'][ids] = refit['weights']
    arrays['quality'][ids] = refit['quality']
    arrays['flags'][ids] = _flags(config, refit['weights'], refit['loss'], refit['quality'])
  for k in wds.ARRAYS:
    io.write_npy(stage.file(f'{k}.npy'), arrays[k])
  n = len(arrays['weights'])
  meta = {
      'format': wds.FORMAT, 'kind': 'image', 'field': spec.to_dict(), 'layout': spec.layout,
      'params_per_field': spec.num_params, 'num_fields': n, 'image_shape': list(shape),
      'num_classes': data.num_classes, 'source': data.source, 'init': config.fit.init,
      'quality_metric': 'psnr_db', 'shared_init_index': int(config.fit.shared_init_index),
      'fingerprint': stage.fingerprint, 'chunk_size': chunk,
  }
  io.write_json(stage.file('meta.json'), meta)

  q, flags = arrays['quality'], arrays['flags']
  finite = q[np.isfinite(q)]
  flagged = np.nonzero(flags)[0]
  if len(flagged):
    log(STAGE, f"WARNING: {len(flagged)} field(s) flagged (non-finite or PSNR < {config.fit.psnr_floor} dB), "
               f"kept in the dataset but excluded from later stages: ids {flagged[:20].tolist()}"
               + (' ...' if len(flagged) > 20 else ''))
  _reconstructions_png(stage, config, spec, data, arrays, shape)
  summary = {
      'num_fields': n, 'params_per_field': spec.num_params,
      'psnr_mean': float(finite.mean()) if len(finite) else float('nan'),
      'psnr_p10': float(np.percentile(finite, 10)) if len(finite) else float('nan'),
      'psnr_min': float(finite.min()) if len(finite) else float('nan'),
      'num_flagged': int(len(flagged)), 'num_nonfinite': int(((flags & wds.FLAG_NONFINITE) > 0).sum()),
      'fields_fitted_this_run': int(fitted_now),
      'fields_per_sec': float(fitted_now / fit_seconds) if fit_seconds > 0 and fitted_now else float('nan'),
      'seconds': float(seconds), 'compile_seconds': float(compile_seconds),
      'device_kind': jax.devices()[0].device_kind, 'num_devices': int(mesh.size),
      'steps_per_field': int(config.fit.steps), 'init': config.fit.init, 'source': data.source,
      'num_refitted': int(len(refit['ids'])) if refit is not None else 0,
  }
  stage.write_summary(summary)
  shutil.rmtree(stage.file('chunks'), ignore_errors=True)
  log(STAGE, f"done: {n} fields, PSNR mean {summary['psnr_mean']:.2f} / p10 {summary['psnr_p10']:.2f} / "
             f"min {summary['psnr_min']:.2f} dB, {summary['fields_per_sec']:.1f} fields/s "
             f"(compile {compile_seconds:.1f}s, total {seconds:.1f}s) -> {stage.path}")
  return summary


def _reconstructions_png(stage, config, spec, data, arrays, shape) -> None:
  k = min(int(config.fit.num_reconstructions), len(arrays['weights']))
  if k <= 0:
    return
  # Spread over classes: the first field of each class in turn.
  labels = arrays['labels']
  order = []
  per_class = [list(np.nonzero(labels == c)[0]) for c in range(int(labels.max()) + 1)]
  while len(order) < k and any(per_class):
    for lst in per_class:
      if lst and len(order) < k:
        order.append(lst.pop(0))
  idx = np.array(sorted(order))
  recon = mlp.render_weights(spec, arrays['weights'][idx], *shape)
  cols = [f"{labels[i]} {arrays['quality'][i]:.1f}dB" for i in idx]
  img = img_utils.grid([data.images[idx], recon], row_labels=['original', 'fitted'], col_labels=cols)
  img_utils.save_png(img, stage.file('reconstructions.png'))
