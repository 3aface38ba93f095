"""Shape sources for 3D fields: labelled training points per shape, preprocessed in cached chunks.

A shape source yields meshes (the procedural family of nfjax/data/procedural.py, or real
OBJ/PLY/OFF files found by nfjax/data/meshes.py); each mesh is normalised into [-0.475, 0.475]^3
and turned into training points with labels:

  points  = num_uniform uniform points in [-0.5, 0.5]^3, then num_surface area-weighted surface
            samples + N(0, surface_sigma^2) noise per axis (clipped to the cube), as HyperDiffusion;
  values  = occupancy (generalised winding number > 0.5, as 0/1), or sdf (exact distance to the
            triangles, negative inside), or pm1 (NeF-GPT's -1 inside or within data.pm1_shell =
            0.005 outside the surface, +1 elsewhere);
  heldout = num_heldout further uniform points with their occupancy, for IoU.

Every shape draws its points from its own RNG, seeded by (seed, index of the shape in its
source), so a shape's points do not depend on which other shapes are loaded.

Config keys read (config.data unless said otherwise):
  source         'procedural' | 'meshes'
  mesh_dir       root of the meshes (source='meshes'); layouts in nfjax/data/meshes.py
  synsets        meshes: class directories / ShapeNet synset ids or names ('airplane'), label
                 order; procedural: class names from procedural.CLASSES. () = all
  split_file     meshes: a HyperDiffusion .lst or a CSV of model ids to keep ('' = all)
  num_fields     how many shapes; -1 = all meshes (procedural: required > 0, classes cycle)
  normalize      'mean' (HyperDiffusion, NeF-GPT) | 'bbox'
  num_uniform    uniform points per shape (parity 100_000)
  num_surface    near-surface points per shape (parity 100_000)
  surface_sigma  std of the noise added to surface samples (parity 0.01)
  label          'occupancy' | 'sdf' | 'pm1'
  pm1_shell      optional, label='pm1': -1 also within this distance outside (NeF-GPT 0.005; 0 = off)
  num_heldout    held-out uniform points per shape for IoU (e.g. 20_000; 0 = none)
  cache_chunk    optional, shapes per cache file (default 32)
  seed           (top level) selects the meshes, the procedural shapes and all points

Cache (when `load` gets a cache_dir): CACHE_DIR/manifest.json holds the fingerprint of everything
above that changes the data plus the identity of the inputs (file sizes and mtimes, generator
version); CACHE_DIR/chunk_XXXXX.npz holds `cache_chunk` consecutive shapes:
  index int64 [c]            position of each shape in the selection
  points float16 [c, n, 3]   labels are computed on these float16 values, so they agree exactly
  occupancy uint8 [c, n]     sdf float16 [c, n] (label='sdf', or 'pm1' with a shell)
  heldout_points float16 [c, m, 3], heldout_occupancy uint8 [c, m]
  skipped_index int64 [s], skipped_reason str [s]   unusable meshes of this chunk
Finished chunks are reused on re-run; a cache with another fingerprint is deleted and rebuilt.
float16 has a spacing of 2^-12 = 0.00024 in [0.25, 0.5): far below the surface noise (0.01).

`catalog(config, cache_dir)` gives the same shapes as `load` (a ShapeCatalog: names, labels,
source indices, skipped meshes, the reference meshes) from a finished cache, reading only the small
`index` / `skipped_*` arrays of each chunk, never the points: for stages after fit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Callable

import numpy as np

from nfjax import geometry
from nfjax.data import meshes as mesh_io
from nfjax.data import procedural
from nfjax.data.images import select
from nfjax.errors import ConfigError, DataError
from nfjax import config as cfg_utils
from nfjax.io import files
from nfjax.io.workdir import SHAPE_DATA
from nfjax.utils.logging import Progress, log

SOURCES = ('procedural', 'meshes')
LABEL_MODES = ('occupancy', 'sdf', 'pm1')
NORMALIZE_MODES = ('mean', 'bbox')
EXTENT = 0.475          # max |coordinate| after normalisation (HyperDiffusion: 0.5 * 0.95)
CACHE_VERSION = 1
DEFAULT_CACHE_CHUNK = 32
STAGE = 'fit'


class ShapeMeshes:
  """The normalised reference mesh of every shape of a ShapeSet: `meshes[i]` or `meshes(i)` ->
  (vertices float32 [V, 3], faces int32 [F, 3]), loaded or regenerated on demand."""

  def __init__(self, get: Callable[[int], tuple[np.ndarray, np.ndarray]], ids: np.ndarray, normalize: str):
    self._get, self._ids, self._normalize = get, np.asarray(ids, np.int64), normalize

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    v, f = self._get(int(self._ids[i]))
    return mesh_io.normalize(v, self._normalize, EXTENT), f

  __call__ = __getitem__


@dataclasses.dataclass
class ShapeCatalog:
  """The shapes a config selects that have usable meshes, without their points (see `catalog`)."""
  labels: np.ndarray             # [N] int32 class
  source_index: np.ndarray       # [N] int64 index of the shape in its source (mesh list / procedural index)
  names: list[str]               # per shape: 'plane_00017' or '<synset>/<model_id>'
  source: str                    # 'procedural:<k>-classes' or 'meshes:<root>'
  num_classes: int
  class_names: list[str]
  skipped: list[dict]            # [{'index', 'name', 'reason'}] meshes that could not be used
  meshes: ShapeMeshes            # meshes[i] -> normalised (vertices, faces) of shape i
  label_mode: str = 'occupancy'

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(kw_only=True)
class ShapeSet(ShapeCatalog):
  """A ShapeCatalog plus every shape's training and held-out points (keyword construction)."""
  points: np.ndarray             # [N, n, 3] float32 in [-0.5, 0.5]^3: num_uniform uniform, then near-surface
  values: np.ndarray             # [N, n] float32: occupancy 0/1, sdf (negative inside) or pm1 (-1 inside)
  heldout_points: np.ndarray     # [N, m, 3] float32 uniform points drawn apart from `points`, for IoU
  heldout_occupancy: np.ndarray  # [N, m] float32 0/1, whatever the label mode


@dataclasses.dataclass
class _Source:
  """The shapes a config selects, before any geometry is computed."""
  ids: np.ndarray                # [S] int64 source index of each selected shape
  labels: np.ndarray             # [S] int32
  names: list[str]
  get: Callable[[int], tuple[np.ndarray, np.ndarray]]   # source index -> raw (vertices, faces)
  source: str
  class_names: list[str]
  identity: dict                 # what the cache fingerprint must know about the inputs


def validate(config) -> None:
  """Checks config.data for a shape source; ConfigError naming the key."""
  d = config.data
  source = cfg_utils.check_choice(config, 'data.source', SOURCES)
  cfg_utils.check_choice(config, 'data.normalize', NORMALIZE_MODES)
  cfg_utils.check_choice(config, 'data.label', LABEL_MODES)
  cfg_utils.check_positive(config, 'data.num_fields', allow_minus_one=True)
  for key in ('data.num_uniform', 'data.num_surface', 'data.num_heldout', 'data.surface_sigma'):
    cfg_utils.check_positive(config, key, allow_zero=True)
  if int(d.num_uniform) + int(d.num_surface) <= 0:
    raise ConfigError("config keys data.num_uniform + data.num_surface must be > 0 (points per shape)")
  if int(d.num_surface) > 0 and float(d.surface_sigma) > 0.1:
    raise ConfigError(f"config key data.surface_sigma={d.surface_sigma!r} must be <= 0.1 (shapes span 0.95)")
  cache_chunk = d.get('cache_chunk', DEFAULT_CACHE_CHUNK)
  if not isinstance(cache_chunk, int) or cache_chunk <= 0:
    raise ConfigError(f"config key data.cache_chunk={cache_chunk!r} must be an integer > 0")
  synsets = cfg_utils.get(config, 'data.synsets')
  if isinstance(synsets, str) or not all(isinstance(s, str) for s in synsets):
    raise ConfigError(f"config key data.synsets={synsets!r} must be a tuple of strings, e.g. ('02691156',)")
  cfg_utils.get(config, 'data.split_file')
  mesh_dir = cfg_utils.get(config, 'data.mesh_dir')
  if source == 'procedural':
    unknown = [s for s in synsets if s not in procedural.CLASSES]
    if unknown:
      raise ConfigError(f"config key data.synsets={tuple(synsets)!r}: {', '.join(map(repr, unknown))} not a "
                        f"procedural class ({', '.join(procedural.CLASSES)})")
    if int(d.num_fields) == -1:
      raise ConfigError("config key data.num_fields=-1 (all) needs data.source='meshes'; the procedural source "
                        "generates exactly data.num_fields shapes")
    if d.split_file:
      raise ConfigError("config key data.split_file only applies to data.source='meshes'")
    if mesh_dir:
      raise ConfigError(f"config key data.mesh_dir={mesh_dir!r} is set but data.source='procedural' does not read "
                        f"it; add --config.data.source=meshes to fit those meshes, or leave data.mesh_dir empty")
  elif not mesh_dir:
    raise ConfigError("config key data.mesh_dir must name a directory of meshes when data.source='meshes'")


# ---------------------------------------------------------------------------------------------
# Sources.

def _procedural_source(config) -> _Source:
  d = config.data
  classes = tuple(d.synsets) or procedural.CLASSES
  class_ids = [procedural.CLASSES.index(c) for c in classes]
  n = int(d.num_fields)
  seed = int(config.seed)

  def get(i: int):
    shape_seed = int(np.random.SeedSequence([seed, 0x9C0C, i]).generate_state(1)[0])
    return procedural.make_shape(class_ids[i % len(classes)], shape_seed)

  ids = np.arange(n, dtype=np.int64)
  labels = (ids % len(classes)).astype(np.int32)
  names = [f"{classes[i % len(classes)]}_{i:05d}" for i in range(n)]
  return _Source(ids=ids, labels=labels, names=names, get=get, source=f"procedural:{len(classes)}-classes",
                 class_names=list(classes),
                 identity={'generator': procedural.GENERATOR_VERSION, 'classes': list(classes)})


def _mesh_source(config) -> _Source:
  d = config.data
  root = files.absolute(d.mesh_dir)
  split_file = files.absolute(d.split_file) if d.split_file else ''
  entries = mesh_io.find_meshes(root, tuple(d.synsets), split_file)
  ids = select(len(entries), int(d.num_fields), int(config.seed))
  chosen = [entries[i] for i in ids]
  if d.synsets:
    synsets = [mesh_io.resolve_synset(s) for s in d.synsets]
  else:
    by_label = {e.label: e.synset for e in entries}
    synsets = [by_label.get(k, '') for k in range(max(by_label) + 1)]
  digest = hashlib.sha256()
  for e in chosen:
    try:
      st = os.stat(e.path)
      digest.update(f"{e.path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError:
      digest.update(f"{e.path}:missing\n".encode())

  def get(i: int):
    return mesh_io.load_mesh(entries[i].path)

  return _Source(ids=np.asarray(ids, np.int64), labels=np.array([e.label for e in chosen], np.int32),
                 names=[e.name for e in chosen], get=get, source=f"meshes:{root}",
                 class_names=[mesh_io.class_name(s) for s in synsets],
                 identity={'mesh_dir': root, 'split_file': split_file, 'num_found': len(entries),
                           'files': digest.hexdigest()[:16]})


def _source(config) -> _Source:
  return _procedural_source(config) if config.data.source == 'procedural' else _mesh_source(config)


# ---------------------------------------------------------------------------------------------
# Points and labels.

def shape_rng(seed: int, source_index: int, stream: int) -> np.random.Generator:
  """The RNG of one shape's points (stream 0: training points, 1: held-out points)."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5D47A, int(source_index), stream]))


def sample_points(vertices: np.ndarray, faces: np.ndarray, num_uniform: int, num_surface: int,
                  sigma: float, rng: np.random.Generator) -> np.ndarray:
  """float32 [num_uniform + num_surface, 3]: uniform in [-0.5, 0.5]^3, then area-weighted surface
  samples plus N(0, sigma^2) noise per axis, clipped to the cube."""
  uniform = rng.uniform(-0.5, 0.5, (num_uniform, 3))
  if num_surface:
    surface, _ = geometry.sample_surface(vertices, faces, num_surface, rng)
    surface = np.clip(surface + rng.normal(0.0, sigma, surface.shape), -0.5, 0.5)
  else:
    surface = np.zeros((0, 3))
  return np.concatenate([uniform, surface]).astype(np.float32)


def _quantize(points: np.ndarray) -> np.ndarray:
  """The float16 values the cache stores (labels are computed on exactly these)."""
  return points.astype(np.float16)


def _prepare(src: _Source, d, seed: int, pos: int, normalize: str):
  """Everything before the JAX queries, for shape `pos` of the selection (runs in a worker thread).

  Returns (vertices, faces, points f16, heldout f16) or an error string.
  """
  i = int(src.ids[pos])
  try:
    v, f = src.get(i)
    v = mesh_io.normalize(v, normalize, EXTENT)
    pts = sample_points(v, f, int(d.num_uniform), int(d.num_surface), float(d.surface_sigma), shape_rng(seed, i, 0))
    held = shape_rng(seed, i, 1).uniform(-0.5, 0.5, (int(d.num_heldout), 3))
  except DataError as e:
    return str(e)
  except ValueError as e:  # degenerate geometry found after loading
    return f"{src.names[pos]}: {e}"
  return v, f, _quantize(pts), _quantize(held)


def pm1_shell(d) -> float:
  """NeF-GPT's inflation of its +-1 labels: points within this distance outside the surface are
  labelled -1 too (`sd <= 0.005`); 0 = none. Only for label='pm1'."""
  return float(d.get('pm1_shell', 0.0)) if d.label == 'pm1' else 0.0


def _needs_sdf(d) -> bool:
  return d.label == 'sdf' or pm1_shell(d) > 0


def _label(v, f, pts16, held16, label_mode: str, need_sdf: bool = False) -> dict:
  """Occupancy (and sdf) of the training and held-out points of one shape, in one pass."""
  pts, held = pts16.astype(np.float32), held16.astype(np.float32)
  wn = geometry.winding_number(np.concatenate([pts, held]), v, f)
  inside = wn > 0.5
  out = {'points': pts16, 'occupancy': inside[:len(pts)].astype(np.uint8),
         'heldout_points': held16, 'heldout_occupancy': inside[len(pts):].astype(np.uint8)}
  if label_mode == 'sdf' or need_sdf:
    dist = geometry.unsigned_distance(pts, v, f)
    out['sdf'] = np.where(inside[:len(pts)], -dist, dist).astype(np.float16)
  return out


def _process_chunk(src: _Source, d, seed: int, positions: list[int], pool) -> dict:
  futures = [pool.submit(_prepare, src, d, seed, pos, d.normalize) for pos in positions]
  done, skipped_index, skipped_reason = [], [], []
  for pos, fut in zip(positions, futures):
    prepared = fut.result()
    if isinstance(prepared, str):
      log(STAGE, f"skipping shape {src.names[pos]} (source index {src.ids[pos]}): {prepared}")
      skipped_index.append(pos)
      skipped_reason.append(prepared)
      continue
    done.append((pos, _label(*prepared, d.label, _needs_sdf(d))))
  n, m = int(d.num_uniform) + int(d.num_surface), int(d.num_heldout)
  arrays = {
      'index': np.array([p for p, _ in done], np.int64),
      'points': np.stack([a['points'] for _, a in done]) if done else np.zeros((0, n, 3), np.float16),
      'occupancy': np.stack([a['occupancy'] for _, a in done]) if done else np.zeros((0, n), np.uint8),
      'heldout_points': (np.stack([a['heldout_points'] for _, a in done]) if done
                         else np.zeros((0, m, 3), np.float16)),
      'heldout_occupancy': (np.stack([a['heldout_occupancy'] for _, a in done]) if done
                            else np.zeros((0, m), np.uint8)),
      'skipped_index': np.array(skipped_index, np.int64),
      'skipped_reason': np.array(skipped_reason, dtype=np.str_) if skipped_reason else np.zeros((0,), '<U1'),
  }
  if _needs_sdf(d):
    arrays['sdf'] = np.stack([a['sdf'] for _, a in done]) if done else np.zeros((0, n), np.float16)
  return arrays


# ---------------------------------------------------------------------------------------------
# Cache.

def fingerprint(config, src: _Source) -> dict:
  """Everything the cached points depend on."""
  d = config.data
  fp = {'version': CACHE_VERSION, 'seed': int(config.seed), 'source': d.source,
        'synsets': list(d.synsets), 'num_fields': int(d.num_fields), 'normalize': d.normalize,
        'extent': EXTENT, 'num_uniform': int(d.num_uniform), 'num_surface': int(d.num_surface),
        'surface_sigma': float(d.surface_sigma), 'label': d.label, 'num_heldout': int(d.num_heldout),
        'pm1_shell': pm1_shell(d),
        'cache_chunk': int(d.get('cache_chunk', DEFAULT_CACHE_CHUNK)), 'inputs': src.identity,
        'selection': hashlib.sha256(json.dumps([src.ids.tolist(), src.names]).encode()).hexdigest()[:16]}
  return json.loads(json.dumps(fp))


def _chunk_path(cache_dir: str, k: int) -> str:
  return files.join(cache_dir, f"chunk_{k:05d}.npz")


def _claim_cache(cache_dir: str, fp: dict, num_chunks: int) -> None:
  """Delete a cache built with other settings; write the manifest of this one."""
  path = files.join(cache_dir, 'manifest.json')
  if files.exists(path):
    try:
      old = files.read_json(path).get('fingerprint')
    except (DataError, AttributeError):
      old = None
    if old == fp:
      return
    changes = '; '.join(cfg_utils.diff(old or {}, fp)[:6])
    log(STAGE, f"shape cache {cache_dir} was built with other settings ({changes}): rebuilding it")
  stale = files.glob(files.join(cache_dir, 'chunk_*.npz'))
  for p in stale:
    files.remove(p)
  files.write_json(path, {'fingerprint': fp, 'num_chunks': num_chunks, 'format': __name__})


CATALOG_KEYS = ('index', 'skipped_index', 'skipped_reason')   # the small arrays of a cache chunk


def _read_npz(path: str, keys=None) -> dict:
  """The arrays `keys` (all by default) of an .npz file; np.load reads a key only when asked for it."""
  return files.read_npz(path, keys)


def _read_chunk(path: str) -> dict | None:
  try:
    return _read_npz(path)
  except DataError as e:  # a damaged file is recomputed, not trusted
    log(STAGE, f"shape cache file {path} is unreadable ({type(e).__name__}); recomputing it")
    return None


def _plan(config) -> tuple[_Source, int, int]:
  """(source, shapes per cache chunk, number of chunks) of a config; validates it first."""
  validate(config)
  src = _source(config)
  chunk = int(config.data.get('cache_chunk', DEFAULT_CACHE_CHUNK))
  return src, chunk, -(-len(src.ids) // chunk)


def cache_dir(config, workdir: str) -> str:
  """Where the shapes' points are cached: data.cache_dir (its `~` expanded), or WORKDIR/shape_data."""
  given = config.data.get('cache_dir', '')
  return files.expand(given) if given else files.join(workdir, SHAPE_DATA)


def load(config, cache_dir: str | None = None) -> ShapeSet:
  """The shapes a run fits, with their training points and labels (see the module docstring).

  With a cache_dir, finished chunks are reused and new ones written atomically; without one,
  everything is computed in memory. Unusable meshes are logged and listed in `skipped`; no usable
  mesh at all raises DataError.
  """
  d = config.data
  seed = int(config.seed)
  src, chunk, num_chunks = _plan(config)
  total = len(src.ids)
  if cache_dir:
    _claim_cache(cache_dir, fingerprint(config, src), num_chunks)
  log(STAGE, f"{total} shapes from {src.source} ({', '.join(src.class_names)}); "
             f"{int(d.num_uniform)}+{int(d.num_surface)} points + {int(d.num_heldout)} held out per shape, "
             f"label {d.label!r}; {num_chunks} chunk(s) of {chunk}")
  chunks: list[dict | None] = [None] * num_chunks
  if cache_dir:
    for k in range(num_chunks):
      if files.exists(_chunk_path(cache_dir, k)):
        chunks[k] = _read_chunk(_chunk_path(cache_dir, k))
    cached = sum(c is not None for c in chunks)
    if cached:
      log(STAGE, f"shape cache {cache_dir}: reusing {cached}/{num_chunks} finished chunk(s)")
  todo = [k for k in range(num_chunks) if chunks[k] is None]
  if todo:
    progress = Progress(STAGE, total, 'shapes')
    done = total - sum(len(range(k * chunk, min(total, (k + 1) * chunk))) for k in todo)
    progress.start(done)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      for k in todo:
        positions = list(range(k * chunk, min(total, (k + 1) * chunk)))
        chunks[k] = _process_chunk(src, d, seed, positions, pool)
        if cache_dir:
          files.write_npz(_chunk_path(cache_dir, k), **chunks[k])
        done += len(positions)
        progress.update(done, f"chunk {k + 1}/{num_chunks}")
  return _assemble(config, src, chunks)


def catalog(config, cache_dir: str, stage: str | None = None) -> ShapeCatalog:
  """The shapes `load(config, cache_dir)` gives (same selection, order, skipped meshes), without
  their points: from a cache the fit stage finished, reading only each chunk's CATALOG_KEYS.

  DataError (run the fit stage) where the cache is missing, incomplete, unreadable or was built with
  other settings; nothing is computed. `stage`: the log tag of a summary line (None: silent).
  """
  src, chunks = _finished_chunks(config, cache_dir, CATALOG_KEYS)
  cat = _catalog(config, src, chunks, stage)
  if stage:
    log(stage, f"{len(cat)} shapes from {cat.source} ({', '.join(cat.class_names)}), as cached in {cache_dir}")
  return cat


def heldout(config, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(heldout_points float32 [N, m, 3], heldout_occupancy float32 [N, m]) of the usable shapes, as
  `load` gives them, read from a finished cache without the training points (see `catalog`)."""
  _, chunks = _finished_chunks(config, cache_dir, CATALOG_KEYS + ('heldout_points', 'heldout_occupancy'))
  return (np.concatenate([c['heldout_points'] for c in chunks]).astype(np.float32),
          np.concatenate([c['heldout_occupancy'] for c in chunks]).astype(np.float32))


def _finished_chunks(config, cache_dir: str, keys: tuple[str, ...]) -> tuple[_Source, list[dict]]:
  """The arrays `keys` of every chunk of a finished cache that matches the config (DataError if none)."""
  src, chunk, num_chunks = _plan(config)
  total = len(src.ids)
  hint = "; run the fit stage with this config first (it computes and caches the shapes)"
  manifest = files.join(cache_dir, 'manifest.json')
  try:
    old = files.read_json(manifest).get('fingerprint')
  except (DataError, AttributeError):
    raise DataError(f"no finished shape cache in {cache_dir} (manifest.json missing or unreadable){hint}") from None
  fp = fingerprint(config, src)
  if old != fp:
    changes = '; '.join(cfg_utils.diff(old or {}, fp)[:6])
    raise DataError(f"shape cache {cache_dir} was built with other settings ({changes}){hint}")
  chunks = []
  for k in range(num_chunks):
    path = _chunk_path(cache_dir, k)
    try:
      c = _read_npz(path, keys)
    except DataError as e:
      raise DataError(f"shape cache {cache_dir} is incomplete: {os.path.basename(path)} is missing or unreadable "
                      f"({type(e).__name__}){hint}") from None
    positions = list(range(k * chunk, min(total, (k + 1) * chunk)))
    if sorted(c['index'].tolist() + c['skipped_index'].tolist()) != positions:
      raise DataError(f"shape cache {cache_dir}: {os.path.basename(path)} does not hold shapes "
                      f"{positions[0]}..{positions[-1]}{hint}")
    chunks.append(c)
  return src, chunks


def _catalog(config, src: _Source, chunks: list[dict], stage: str | None) -> ShapeCatalog:
  """The usable shapes of finished chunks (their `index` / `skipped_*` arrays), in selection order;
  DataError when none is usable. `stage`: the log tag of the skipped-meshes warning (None: silent)."""
  index = np.concatenate([c['index'] for c in chunks]).astype(np.int64)
  skipped = [{'index': int(src.ids[p]), 'name': src.names[p], 'reason': str(r)}
             for c in chunks for p, r in zip(c['skipped_index'], c['skipped_reason'])]
  if len(index) == 0:
    reasons = '; '.join(s['reason'] for s in skipped[:3])
    raise DataError(f"no usable shape in {src.source}: all {len(skipped)} meshes were skipped ({reasons})")
  if skipped and stage:
    log(stage, f"WARNING: {len(skipped)} of {len(src.ids)} shape(s) skipped (unreadable or empty meshes), "
               f"e.g. {skipped[0]['name']}: {skipped[0]['reason']}")
  ids = src.ids[index]
  return ShapeCatalog(
      labels=src.labels[index], source_index=ids, names=[src.names[p] for p in index], source=src.source,
      num_classes=len(src.class_names), class_names=list(src.class_names), skipped=skipped,
      meshes=ShapeMeshes(src.get, ids, config.data.normalize), label_mode=config.data.label)


def _assemble(config, src: _Source, chunks: list[dict]) -> ShapeSet:
  d = config.data
  cat = _catalog(config, src, chunks, STAGE)
  points = np.concatenate([c['points'] for c in chunks]).astype(np.float32)
  occupancy = np.concatenate([c['occupancy'] for c in chunks]).astype(np.float32)
  if d.label == 'sdf':
    values = np.concatenate([c['sdf'] for c in chunks]).astype(np.float32)
  elif d.label == 'pm1':
    inside = occupancy > 0.5
    shell = pm1_shell(d)
    if shell > 0:      # NeF-GPT: sd <= shell -> -1, i.e. inside or within `shell` outside the surface
      inside |= np.concatenate([c['sdf'] for c in chunks]).astype(np.float32) <= shell
    values = np.where(inside, -1.0, 1.0).astype(np.float32)   # NeF-GPT's sign: -1 inside, +1 outside
  else:
    values = occupancy
  return ShapeSet(
      points=points, values=values,
      heldout_points=np.concatenate([c['heldout_points'] for c in chunks]).astype(np.float32),
      heldout_occupancy=np.concatenate([c['heldout_occupancy'] for c in chunks]).astype(np.float32),
      **{f.name: getattr(cat, f.name) for f in dataclasses.fields(ShapeCatalog)})
