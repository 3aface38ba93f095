"""Fitting a whole dataset of fields: a compiled, sharded stack fitter and the chunked, resumable run.

`StackFitter` fits stacks of fields on the mesh (one compiled jit(vmap(fit)) per stack shape, the
field axis sharded over every device). `fit_dataset` is what the fit stage does with it, for any
modality:

1. the shared init (`fit.init='shared'`): candidate inits fitted on one field from different seeds,
   the one whose probe fits are best is kept (fields/shared_init.npy);
   With `fit.prototypes` = K > 0, each class's targets (images: pixels; shapes: voxelised occupancy;
   Modality.prototype_targets) are clustered into K groups (k-means), a field is fitted from the
   shared init to every group's mean or medoid (fit.prototype_target; shapes: the medoid), and every
   field starts from its own group's prototype instead (fields/prototypes.npz);
2. every chunk of `fit.chunk_size` fields not on disk yet is fitted and written atomically
   (fields/chunks/), so a killed run resumes where it stopped and ends with the same dataset;
3. fields under `fit.refit_below` get a second, longer fit (the better result is kept);
4. the chunks are merged into the dataset's arrays.
Every field's randomness is `fold_in(key(seed), field_id)`: results do not depend on chunking.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from nfjax import config as config_lib
from nfjax import processes, sharding
from nfjax.fields import fitting, mlp, stacked
from nfjax.io import fields as field_io
from nfjax.io import files
from nfjax.modalities.base import PrototypeSpace, Quality, prototype_target
from nfjax.tokenizers import kmeans
from nfjax.utils import preemption
from nfjax.utils.logging import MetricsWriter, Progress, log

STAGE = 'fit'


def make_stack_fitter(spec: mlp.FieldSpec, fit_cfg, steps: int, mesh: Mesh,
                      score: Callable | None = None, points: bool = False, per_step: int = -1,
                      formulation: str = 'auto'):
  """The stack fitter, compiled with the field axis sharded over `mesh`: `formulation='stacked'`
  fits the whole stack in big matrix products (nfjax/fields/stacked.py), 'vmap' is the reference,
  jit(vmap(fitting.fit_one)) (or of `fitting.fit_points` with points=True), 'blocked' fits a
  cache-sized block of fields at a time (point fields by `stacked.fit_point_field`, the reference's fit
  with its backward pass written out; grid fields by the reference), 'auto' picks one (`stacked.resolve`).

  `per_step`: inputs drawn per step (-1 = all every step).
  Returns compile_for(params_stack, feats, targets, keys [F], *extra) -> compiled
  fn(params_stack, feats, targets, keys, *extra) -> (params_stack, loss [F], score [F]).
  Images: `feats` is either shared [n, E] (replicated) or per field [F, n, E]; targets [F, n, out].
  Points: `feats` are the raw coordinates per field [F, n, d] and targets the values [F, n].
  `extra` are further per-field arrays (leading axis F) that only `score` reads.
  `score(params, feats, target, *extra)` is a per-field quality number computed after fitting
  (e.g. PSNR, IoU); loss is returned if None.
  The number of fields F must be a multiple of the mesh's field-axis size.
  """
  formulation = stacked.resolve(formulation, points)
  fit_fn = fitting.fit_points if points else fitting.fit_one
  precision = str(fit_cfg.get('matmul_precision', 'highest'))

  def fit_stack(params, feats, targets, keys, *extra):
    feats_axis = 0 if (points or feats.ndim == 3) else None
    fit = lambda p, f, t, k: fit_fn(spec, fit_cfg, steps, p, f, t, k, per_step)
    reference = jax.vmap(fit, in_axes=(0, feats_axis, 0, 0))
    if formulation == 'vmap':
      params, loss = reference(params, feats, targets, keys)
    else:  # each device fits its own fields: shard_map, no partitioner in the way
      if formulation == 'stacked':
        local = lambda p, f, t, k: stacked.fit_stack(spec, fit_cfg, steps, p, f, t, k, per_step, points)
      else:  # 'blocked': a cache-sized block of fields at a time; point fields by stacked.fit_point_field
        block = block_fields(spec, fit_cfg, per_step, feats.shape[-2])
        per_block = reference
        if points:
          per_block = jax.vmap(lambda p, f, t, k: stacked.fit_point_field(spec, fit_cfg, steps, p, f, t, k, per_step))
        local = lambda p, f, t, k: in_blocks(per_block, block, feats_axis, p, f, t, k)
      rows = sharding.logical_spec('fields')
      params, loss = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows if feats_axis == 0 else P(), rows, rows),
                                   out_specs=(rows, rows))(params, feats, targets, keys)
    if score is None:
      return params, loss, loss
    in_axes = (0, feats_axis, 0) + (0,) * len(extra)
    return params, loss, jax.vmap(score, in_axes=in_axes)(params, feats, targets, *extra)

  fields = sharding.named(mesh, 'fields')
  rep = sharding.replicated(mesh)
  per_field = lambda x: sharding.named(mesh, 'fields', *([None] * (x.ndim - 1)))

  def compile_for(params, feats, targets, keys, *extra):
    p_sh = sharding.leading_axis_sharding(mesh, params)
    f_sh = per_field(feats) if (points or feats.ndim == 3) else rep
    in_sh = (p_sh, f_sh, per_field(targets), fields) + tuple(per_field(x) for x in extra)
    jitted = jax.jit(fit_stack, in_shardings=in_sh, out_shardings=(p_sh, fields, fields), donate_argnums=(0,))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, feats, targets, keys, *extra))
    with jax.default_matmul_precision(precision):  # traced into the program's dots
      return jitted.lower(*abstract).compile()

  return compile_for


BLOCK_BYTES = 1 << 20  # the working set one block of the 'blocked' fit aims at: a core's L2 cache


def block_fields(spec: mlp.FieldSpec, fit_cfg, per_step: int, num_inputs: int) -> int:
  """Fields per block of the 'blocked' formulation: `fit.block_fields` if > 0, else as many as keep
  a block's working set (every layer's activations and their gradients over a step's `per_step`
  inputs, or all `num_inputs`; the parameters with their gradient and Adam moments) within
  BLOCK_BYTES, as a power of two (it divides the usual chunks). It depends on the field and the
  config only, never on how many fields a call fits, so that a field's result does not depend on its
  chunk or device (`in_blocks` pads)."""
  want = int(fit_cfg.get('block_fields', 0) or 0)
  if want > 0:
    return want
  inputs = per_step if per_step > 0 else num_inputs
  widths = spec.encoded_dims + sum(o for o, _, _ in spec.layer_dims)
  fitting_fields = max(1, BLOCK_BYTES // (4 * (2 * inputs * widths + 4 * spec.num_params)))
  return 1 << (fitting_fields.bit_length() - 1)


def in_blocks(fit_stack, block: int, feats_axis, params, feats, targets, keys):
  """`fit_stack` (of a stack of fields) on `block` fields at a time, the blocks one after another
  (lax.map): one block's fit, every step of it, stays in cache, where a whole stack's activations
  spill to memory every layer. Every block has `block` fields (the last is padded with copies of
  the last field), so each field is fitted by the same compiled block whatever the stack's size."""
  count = keys.shape[0]
  blocks = -(-count // block)
  pad = blocks * block - count
  per_field = (params, targets, keys) + ((feats,) if feats_axis == 0 else ())
  padded = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
  per_field = jax.tree.map(lambda x: padded(x).reshape((blocks, block) + x.shape[1:]), per_field)

  def one(xs):
    p, t, k = xs[:3]
    return fit_stack(p, xs[3] if feats_axis == 0 else feats, t, k)
  params, loss = jax.lax.map(one, per_field)
  merge = lambda x: x.reshape((blocks * block,) + x.shape[2:])[:count]
  return jax.tree.map(merge, params), merge(loss)


def field_keys(seed: int, ids: np.ndarray, stream: int = 0xF17) -> jax.Array:
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
  compiles once per (steps, padded size, data shapes, fit-key overrides).

  Grid fields (`points=False`): `feats` are encoded coordinates shared by every field (e.g. the
  pixel grid) and the per-field data are the targets [n, k, out]; `score(params, feats, targets)`.
  Point fields (`points=True`, e.g. 3D shapes): no shared features; the per-field data are a tuple
  (coords [n, k, d], values [n, k], *extra) where `extra` (e.g. held-out points and occupancy) is
  read only by `score(params, coords, values, *extra)`. `per_step`: inputs (pixels, points) drawn
  per step, -1 = every one every step.
  """

  def __init__(self, spec, config, mesh, score, feats=None, points: bool = False, per_step: int = -1):
    self.spec, self.config, self.mesh = spec, config, mesh
    self.points, self.per_step = points, int(per_step)
    self.shards = sharding.axis_size(mesh, 'fields')
    self.feats = None if feats is None else sharding.put(np.asarray(feats), sharding.replicated(mesh))
    self.score = score
    self.formulation = stacked.resolve(str(config.fit.formulation), points)
    self._compiled = {}
    self.compile_seconds = 0.0

  def padded_size(self, n: int) -> int:
    return -(-n // self.shards) * self.shards

  def _split(self, rows: tuple):
    """Per-field rows -> (feats, targets, extra) in the compiled function's argument order."""
    if self.points:
      return rows[0], rows[1], tuple(rows[2:])
    return self.feats, rows[0], ()

  def fit_config(self, overrides: dict | None = None):
    """fit.* with `overrides` (fit key -> value) applied; fit.* itself when they change nothing."""
    changed = self._changed(overrides)
    if not changed:
      return self.config.fit
    cfg = self.config.fit.copy_and_resolve_references()
    with cfg.unlocked():
      for name, value in changed:
        cfg[name] = value
    return cfg

  def _changed(self, overrides: dict | None) -> tuple:
    """The overrides that differ from fit.* (a missing key reads as 0.0), as sorted (key, float) pairs."""
    return tuple(sorted((k, float(v)) for k, v in (overrides or {}).items()
                        if float(v) != float(self.config.fit.get(k, 0.0) or 0.0)))

  def compile(self, steps: int, count: int, like, overrides: dict | None = None):
    """The compiled fitter for `count` fields whose per-field data look like `like` (any leading size)."""
    rows = like if isinstance(like, tuple) else (like,)
    shapes = tuple((tuple(r.shape[1:]), str(r.dtype)) for r in rows)
    key = (steps, count, shapes, self._changed(overrides))
    if key not in self._compiled:
      t0 = time.perf_counter()
      keys = field_keys(0, np.arange(count))
      params = jax.eval_shape(jax.vmap(lambda k: mlp.init(self.spec, k)), keys)
      abstract = tuple(jax.ShapeDtypeStruct((count,) + s, d) for s, d in shapes)
      feats, targets, extra = self._split(abstract)
      compile_for = make_stack_fitter(self.spec, self.fit_config(overrides), steps, self.mesh, score=self.score,
                                      points=self.points, per_step=self.per_step,
                                      formulation=self.formulation)
      self._compiled[key] = compile_for(params, feats, targets, keys, *extra)
      self.compile_seconds += time.perf_counter() - t0
    return self._compiled[key]

  def fit(self, steps: int, targets, keys: jax.Array, shared: np.ndarray | None,
          pad_to: int | None = None, overrides: dict | None = None):
    """Per-field data (images: targets [n, pixels, 1]; points: a tuple, see the class), keys [n]
    -> (weights [n, P], loss [n], quality [n]) as numpy. `overrides` (fit key -> float, e.g.
    {'l2': 5.0}) replace fit.* keys for this call."""
    rows = targets if isinstance(targets, tuple) else (targets,)
    n = len(rows[0])
    padded = max(self.padded_size(n), pad_to or 0)
    sel = np.concatenate([np.arange(n), np.full(padded - n, n - 1)])
    keys = keys[sel]
    rows = tuple(np.asarray(r)[sel] for r in rows)
    init = shared[sel] if shared is not None and shared.ndim == 2 else shared
    params = jax.tree.map(np.asarray, _initial_params(self.spec, init, keys))
    compiled = self.compile(steps, padded, rows, overrides)
    mesh = self.mesh
    params = sharding.put(params, sharding.leading_axis_sharding(mesh, params))
    rows = tuple(sharding.put(r, sharding.named(mesh, 'fields', *([None] * (r.ndim - 1)))) for r in rows)
    keys = sharding.put(np.asarray(keys), sharding.named(mesh, 'fields'))
    feats, tgt, extra = self._split(rows)
    params, loss, score = compiled(params, feats, tgt, keys, *extra)
    # every process gets the whole stack (its fields live on every process's devices)
    w = processes.gather(mlp.flatten(self.spec, params)).astype(np.float32)[:n]
    return w, processes.gather(loss)[:n], processes.gather(score).astype(np.float32)[:n]


def search_shared_init(fitter: StackFitter, config, targets, seed: int,
                        quality: Quality) -> tuple[np.ndarray, dict]:
  """Fit candidate inits on one field from different seeds; keep the one whose probe fits are best.

  The candidates are fitted with fit.shared_init_l2 when the config has it and it is >= 0 (NeF-GPT
  penalises only its init field), else with fit.l2; never with fit.anchor (they start from random
  inits, not from a shared one to stay near).
  """
  fit_cfg = config.fit
  k = max(1, int(fit_cfg.shared_init_candidates))
  field = int(fit_cfg.shared_init_index)
  init_l2 = float(fit_cfg.get('shared_init_l2', -1.0))
  init_l2 = None if init_l2 < 0 else init_l2
  q_name = quality.name
  cand_keys = field_keys(seed, np.arange(k), stream=0x1417)
  overrides = {'anchor': 0.0} if init_l2 is None else {'anchor': 0.0, 'l2': init_l2}
  w, _, init_q = fitter.fit(int(fit_cfg.shared_init_steps), take(targets, np.full(k, field)), cand_keys, None,
                            overrides=overrides)
  info = {'field': field, 'candidates': k, f'candidate_{q_name}': init_q.tolist()}
  if k == 1:
    best = 0
  else:
    n = _num_rows(targets)
    rng = np.random.default_rng(seed + 1)
    probe = np.sort(rng.choice(n, min(int(fit_cfg.shared_init_probe), n), replace=False))
    m = len(probe)
    probe_keys = field_keys(seed, probe)
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


def shared_init(stage, fitter: StackFitter, config, targets, seed: int,
                quality: Quality) -> np.ndarray | None:
  """fields/shared_init.npy: read back when a previous run wrote it, else searched and written."""
  if config.fit.init != 'shared':
    return None
  init_path = stage.file('shared_init.npy')
  found = processes.agree('shared init', lambda: files.read_npy(init_path) if files.exists(init_path) else None)
  if found is not None:
    return found
  shared, info = search_shared_init(fitter, config, targets, seed, quality)
  files.write_json(stage.file('shared_init.json'), info)
  files.write_npy(init_path, shared)
  return shared


PROTOTYPE_STREAM = 0x9807


def prototypes(stage, fitter: StackFitter, config, space: PrototypeSpace, labels: np.ndarray, shared: np.ndarray,
               seed: int, quality: Quality) -> dict | None:
  """fields/prototypes.npz (fit.prototypes > 0): read back when a previous run wrote it, else made and
  written. Each class's target vectors (`space` = Modality.prototype_targets) are clustered into
  min(K, members) groups by k-means; a field is fitted from the shared init (fit.shared_init_steps steps,
  as the init's candidates) to every group's mean, or to its medoid -- the member of the group's class
  nearest the mean, a real example (fit.prototype_target; 'auto': the mean where the modality can fit
  one, shapes the medoid).
  Holds weights [M, P] (the prototype fields), quality [M], labels [M] (their class), means [M, D]
  and of_field [N] (the prototype every field starts from: the nearest mean of its own class)."""
  k = fitting.prototypes_of(config.fit)
  if k <= 0:
    return None
  found = processes.agree('prototypes', lambda: field_io.prototypes(stage.path))
  if found is not None:
    return found
  target = prototype_target(config.fit, space)
  vectors = np.asarray(space.vectors, np.float32)
  means, classes, medoids = [], [], []
  of_field = np.zeros(len(labels), np.int32)
  for c in np.unique(labels):
    members = np.nonzero(labels == c)[0]
    x = vectors[members]
    codes, _ = kmeans.kmeans(x, min(k, len(members)), restarts=3, iters=50,
                             seed=(seed * 1000003 + int(c) * 101 + PROTOTYPE_STREAM) % (2 ** 31))
    of_field[members] = sum(len(m) for m in means) + kmeans.assign(x, codes)
    means.append(codes)
    classes.append(np.full(len(codes), c, np.int32))
    if target == 'medoid':   # the member nearest each mean
      medoids += [int(members[np.argmin(((x - code) ** 2).sum(-1))]) for code in codes]
  means, classes = np.concatenate(means), np.concatenate(classes)
  steps = int(config.fit.shared_init_steps)
  t0 = time.perf_counter()
  keys = field_keys(seed, np.arange(len(means)), stream=PROTOTYPE_STREAM)
  rows = space.members(np.asarray(medoids)) if target == 'medoid' else space.means(means, classes)
  w, _, q = fitter.fit(steps, rows, keys, shared)
  out = {'weights': w, 'quality': q, 'labels': classes, 'means': means, 'of_field': of_field}
  files.write_npz(stage.file(field_io.PROTOTYPES), **out)
  used = np.bincount(of_field, minlength=len(means))
  log(STAGE, f"prototypes: {len(means)} fields fitted from the shared init to the {target}s of the k-means clusters of "
             f"each class's targets ({k} per class, {steps} steps, {time.perf_counter() - t0:.1f}s, {quality.label} mean "
             f"{quality.fmt(float(np.nanmean(q)))}); every field starts from its cluster's "
             f"({used.min()}-{used.max()} fields each)")
  return out


def starts(shared: np.ndarray | None, proto: dict | None, ids: np.ndarray) -> np.ndarray | None:
  """Where fields `ids` start: their prototypes [n, P] with fit.prototypes, else the shared init (or None)."""
  if proto is None:
    return shared
  return np.asarray(proto['weights'])[np.asarray(proto['of_field'])[ids]]


def fit_chunks(stage, config, fitter: StackFitter, targets, labels: np.ndarray,
               source_index: np.ndarray, shared: np.ndarray | None, seed: int,
               quality: Quality, proto: dict | None = None) -> tuple[int, float]:
  """Fit every chunk not on disk yet, writing each atomically. Returns (fields fitted, seconds)."""
  n = _num_rows(targets)
  chunk = int(config.fit.chunk_size)
  num_chunks = -(-n // chunk)
  have = processes.agree('chunks', lambda: {c for c in field_io.finished_chunks(stage.path) if c < num_chunks})
  fields_done = sum(min(chunk, n - c * chunk) for c in have)
  if have:
    log(STAGE, f"resuming: {len(have)}/{num_chunks} chunks already fitted ({fields_done} fields)")
  metrics = MetricsWriter(stage.path, namespace=STAGE)
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
                            field_keys(seed, np.arange(lo, hi)), starts(shared, proto, np.arange(lo, hi)),
                            pad_to=pad_to)
    flags = quality_flags(config, w, loss, q, quality)
    field_io.write_chunk(stage.path, c, weights=w, labels=labels[lo:hi], source_index=source_index[lo:hi],
                         quality=q, flags=flags)
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
    if preemption.requested(step=c):   # SIGTERM: the chunk in flight was finished and written
      metrics.close()
      preemption.stop(STAGE, f"{fields_done}/{n} fields fitted and written (chunk {c + 1}/{num_chunks} finished)")
  metrics.close()
  return fitted_now, fit_seconds



def quality_flags(config, w, loss, q, quality: Quality) -> np.ndarray:
  flags = np.zeros(len(w), np.uint8)
  flags[~(np.isfinite(loss) & np.isfinite(w).all(1))] |= field_io.FLAG_NONFINITE
  flags[~(q >= float(config_lib.get(config, quality.floor_key)))] |= field_io.FLAG_LOW_QUALITY
  return flags


def refit(stage, config, fitter, targets, shared, seed, num_chunks, chunk,
           quality: Quality, proto: dict | None = None) -> dict | None:
  """Second chance for the fields under fit.refit_below: longer fit, keep the better result."""
  threshold = float(config.fit.get('refit_below', 0.0))
  if threshold <= 0:
    return None
  path = stage.file('chunks', 'refit.npz')

  def read():   # process 0 reads what it wrote, for everyone
    if files.exists(path):
      return files.read_npz(path), None
    return None, np.concatenate([field_io.read_chunk(stage.path, c)['quality'] for c in range(num_chunks)])
  done, q = processes.agree('refit', read)
  if done is not None:
    return done
  ids = np.nonzero(~(q >= threshold))[0]
  steps = int(config.fit.steps) * int(config.fit.refit_steps_factor)
  out = {'ids': ids, 'weights': np.zeros((0, fitter.spec.num_params), np.float32),
         'quality': np.zeros((0,), np.float32), 'loss': np.zeros((0,), np.float32)}
  if len(ids):
    t0 = time.perf_counter()
    keys = field_keys(seed, ids, stream=0x2EF17)
    w, loss, new_q = fitter.fit(steps, take(targets, ids), keys, starts(shared, proto, ids))
    before = q[ids]
    better = np.nan_to_num(new_q, nan=-np.inf) > np.nan_to_num(before, nan=-np.inf)
    name = quality.label
    log(STAGE, f"refit {len(ids)} field(s) under {quality.fmt(threshold)} with {steps} steps in "
               f"{time.perf_counter() - t0:.1f}s: mean {name} {np.nanmean(before):.{quality.digits}f} -> "
               f"{quality.fmt(np.nanmean(np.where(better, new_q, before)))} ({int(better.sum())} improved)")
    out = {'ids': ids[better], 'weights': w[better], 'quality': new_q[better], 'loss': loss[better]}
  files.write_npz(path, **out)
  return out


def merge_chunks(stage, config, num_chunks, refit, quality: Quality) -> dict[str, np.ndarray]:
  """The finished chunks (and refits) -> the dataset's arrays."""
  parts = [field_io.read_chunk(stage.path, c) for c in range(num_chunks)]
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in field_io.ARRAYS}
  if refit is not None and len(refit['ids']):
    ids = refit['ids']
    arrays['weights'][ids] = refit['weights']
    arrays['quality'][ids] = refit['quality']
    arrays['flags'][ids] = quality_flags(config, refit['weights'], refit['loss'], refit['quality'], quality)
  return arrays


def fit_dataset(stage, config, fitter: StackFitter, rows: tuple, labels: np.ndarray, source_index: np.ndarray,
                quality: Quality, prototype_space=None) -> tuple[dict | None, int, float]:
  """Shared init, prototypes (`prototype_space`: Modality.prototype_targets, for fit.prototypes > 0),
  every missing chunk, refits: (refit, fields fitted now, fit seconds). Every process
  of a multi-process run takes part (each fits its devices' share of every stack); the chunks are
  then on disk for `merge_chunks`."""
  n = _num_rows(rows)
  seed = int(config.seed)
  chunk = int(config.fit.chunk_size)
  num_chunks = -(-n // chunk)
  shared = shared_init(stage, fitter, config, rows, seed, quality)
  proto = prototypes(stage, fitter, config, prototype_space, labels, shared, seed, quality)
  fitted_now, fit_seconds = fit_chunks(stage, config, fitter, rows, labels, source_index, shared, seed, quality,
                                       proto)
  redo = refit(stage, config, fitter, rows, shared, seed, num_chunks, chunk, quality, proto)
  return redo, fitted_now, fit_seconds

