"""3D fields -> triangle meshes: grid evaluation, iso-levels, marching cubes, OBJ / PLY files.

The grid. A resolution-R grid samples every axis at `linspace(-0.5, 0.5, R)`, i.e. voxel spacing
1 / (R - 1), and `volume[b, i, j, k]` is field b at (x_i, y_j, z_k) (axis 0 = x). Marching-cubes
vertex (i, j, k) in index space (fractional along one axis) maps back to -0.5 + (i, j, k) / (R - 1)
exactly, so a field meshes where it is. HyperDiffusion's and NeF-GPT's DeepSDF-derived
`create_mesh` builds its sample points with `(index / N) % N` under true division, so lattice cell
(a, b, c) is evaluated at (a + b/N + c/N^2, b + c/N, c) voxels while marching cubes assumes (a, b,
c): the mesh is sheared by up to one voxel. nfjax evaluates the lattice it meshes (tested with an
off-centre sphere field: centroid and radius come back within a small fraction of a voxel).

Iso-levels (`level_for`, `inside_for`) are in the space of the field's value, i.e. after
`output_activation`:
  fit.loss = 'bce'          raw output = occupancy logit; level = output_activation(logit(p)),
                            p = 0.5 by default (logit 0); HyperDiffusion's test meshes use
                            p = 0.8, logit 1.386 (`HYPERDIFFUSION_TEST_LEVEL`) at R = 356.
                            Inside = above the level.
  fit.loss = 'mse' / 'l1'   regression targets: NeF-GPT's tanh'd +-1 labels (-1 inside) or a
                            signed distance (negative inside): level 0, inside = below; 0/1
                            occupancy targets (data.label='occupancy'; without a label, assumed
                            for a sigmoid output): level 0.5, inside = above.
`marching_cubes` orders every face counter-clockwise seen from outside (normals point out) for
either convention.

Evaluation is one jitted function per (fields per call, chunk): fields are vmapped, the encoded
coordinates of a chunk are computed on the device from the flat grid index and shared by all
fields, and a call walks `steps` chunks with `lax.map`, so memory is bounded by
fields x chunk x widest layer whatever R is (R = 256 is 16.7M points per field). The field axis of
a call is sharded over a mesh's devices when one is given.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import extras, sharding
from nfjax.errors import ConfigError, NfjaxError
from nfjax.fields import mlp
from nfjax.io.files import write_bytes

HYPERDIFFUSION_TEST_LEVEL = 1.386     # logit of p = 0.8, as written in HyperDiffusion's test code
HYPERDIFFUSION_TEST_RESOLUTION = 356
LOGIT_LOSSES = ('bce',)
REGRESSION_LOSSES = ('mse', 'l1')
INSIDE = ('above', 'below')
LABELS = ('occupancy', 'sdf', 'pm1')

# Per call: fields x chunk x widest layer floats for activations, fields x points-per-call outputs.
_ACTIVATION_BUDGET = 1 << 26
_OUTPUT_BUDGET = 1 << 24


def grid_coords(resolution: int) -> np.ndarray:
  """Sample positions along one axis: float32 [R] = linspace(-0.5, 0.5, R), spacing 1 / (R - 1)."""
  r = int(resolution)
  if r < 2:
    raise ConfigError(f"a meshing grid needs resolution >= 2, got {resolution}")
  return np.linspace(-0.5, 0.5, r, dtype=np.float64).astype(np.float32)


def index_to_coords(index: np.ndarray, resolution: int) -> np.ndarray:
  """Continuous grid indices [..., 3] (e.g. marching-cubes vertices) -> field coordinates, float32."""
  return (-0.5 + np.asarray(index, np.float64) / (int(resolution) - 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Iso-levels.

def _check_loss(fit_loss: str, label: str | None) -> None:
  if fit_loss not in LOGIT_LOSSES + REGRESSION_LOSSES:
    raise ConfigError(f"fit.loss={fit_loss!r}: meshing knows {LOGIT_LOSSES + REGRESSION_LOSSES}")
  if label is not None and label not in LABELS:
    raise ConfigError(f"data.label={label!r}: meshing knows {LABELS}")


def _occupancy_targets(spec: mlp.FieldSpec, fit_loss: str, label: str | None) -> bool:
  if fit_loss in LOGIT_LOSSES:
    return True
  return label == 'occupancy' if label is not None else spec.output_activation == 'sigmoid'


def level_for(spec: mlp.FieldSpec, fit_loss: str = 'bce', occupancy: float = 0.5, label: str | None = None
              ) -> float:
  """Iso-level in field-value space (after output_activation) for a field fitted with `fit_loss`.

  bce: the value whose sigmoid probability is `occupancy` (0.5 -> logit 0; HyperDiffusion's test
  meshing uses 0.8 -> 1.386), passed through the output activation. mse / l1: 0.5 on 0/1
  occupancy targets (data.label='occupancy', or a sigmoid output when no label is given), else 0
  (signed distance, NeF-GPT's +-1 labels).
  """
  _check_loss(fit_loss, label)
  if fit_loss in LOGIT_LOSSES:
    if not 0.0 < occupancy < 1.0:
      raise ConfigError(f"occupancy threshold must be in (0, 1), got {occupancy}")
    logit = math.log(occupancy / (1.0 - occupancy))
    return float(mlp.output(spec, jnp.float32(logit)))
  return 0.5 if _occupancy_targets(spec, fit_loss, label) else 0.0


def inside_for(spec: mlp.FieldSpec, fit_loss: str = 'bce', label: str | None = None) -> str:
  """'above' if values above the level are inside the shape (occupancy targets or logits), 'below'
  otherwise (signed distance, negative inside; 'pm1' = NeF-GPT's -1-inside labels)."""
  _check_loss(fit_loss, label)
  return 'above' if _occupancy_targets(spec, fit_loss, label) else 'below'


# ---------------------------------------------------------------------------------------------
# Grid evaluation.

def _check_spec(spec: mlp.FieldSpec) -> None:
  if spec.in_dims != 3 or spec.out_dims != 1:
    raise ConfigError(f"meshing needs a 3D scalar field (in_dims=3, out_dims=1), got in_dims={spec.in_dims}, "
                      f"out_dims={spec.out_dims}")


def _call_fn(spec: mlp.FieldSpec, resolution: int, batch: int, chunk: int, steps: int, raw: bool, mesh):
  axis = jnp.asarray(grid_coords(resolution))
  r = int(resolution)

  def call(w, start):
    params = mlp.unflatten(spec, w)

    def step(s):
      idx = start + s * chunk + jnp.arange(chunk, dtype=jnp.int32)
      ijk = (idx // (r * r), (idx // r) % r, idx % r)
      coords = jnp.stack([jnp.take(axis, a, mode='clip') for a in ijk], axis=-1)   # [chunk, 3]
      feats = mlp.encode(spec, coords)                                               # shared by fields
      out = jax.vmap(lambda p: mlp.apply_encoded(spec, p, feats)[:, 0])(params)      # [batch, chunk]
      return out if raw else mlp.output(spec, out)

    outs = jax.lax.map(step, jnp.arange(steps, dtype=jnp.int32))                    # [steps, batch, chunk]
    return jnp.transpose(outs, (1, 0, 2)).reshape(batch, steps * chunk)

  if mesh is None:
    return jax.jit(call)
  rows = sharding.named(mesh, 'fields', None)
  return jax.jit(call, in_shardings=(rows, sharding.replicated(mesh)), out_shardings=rows)


_FN_CACHE: dict = {}


def _plan(spec: mlp.FieldSpec, resolution: int, num_fields: int, batch: int | None, chunk: int | None,
          steps: int | None, mesh) -> tuple[int, int, int]:
  shards = sharding.axis_size(mesh, 'fields') if mesh is not None else 1
  if batch is None:
    batch = min(max(num_fields, 1), 16)
  batch = max(shards, -(-int(batch) // shards) * shards)
  total = int(resolution) ** 3
  widest = max([spec.encoded_dims, *spec.hidden])
  if chunk is None:
    chunk = 1 << max(10, int(math.log2(max(1, _ACTIVATION_BUDGET // (batch * widest)))))
  chunk = max(1, min(int(chunk), total))
  most = -(-total // chunk)
  if steps is None:
    steps = _OUTPUT_BUDGET // (batch * chunk)
  steps = max(1, min(int(steps), most))
  return batch, chunk, steps


def eval_grid(spec: mlp.FieldSpec, weights: np.ndarray, resolution: int = 256, *, batch: int | None = None,
              chunk: int | None = None, steps: int | None = None, mesh=None, raw: bool = False) -> np.ndarray:
  """Evaluate fields on the resolution^3 grid.

  weights: flat weight vectors [B, P] (or one [P]). Returns float32 numpy [B, R, R, R] with
  volume[b, i, j, k] = field b at (x_i, y_j, z_k), x/y/z = `grid_coords(R)`; field values after
  output_activation (raw network outputs if raw=True). `batch` fields are evaluated per call
  (default min(B, 16), rounded up to a multiple of the mesh's field shards; short batches are
  padded), `chunk` grid points per field per inner step (default: bounded by ~2^26 floats of
  activations per step), `steps` chunks per call (default: ~2^24 output floats per call). Results
  do not depend on batch, chunk or steps.
  """
  _check_spec(spec)
  weights = np.asarray(weights, np.float32)
  if weights.ndim == 1:
    weights = weights[None]
  if weights.ndim != 2 or weights.shape[1] != spec.num_params:
    raise NfjaxError(f"weights must be [B, {spec.num_params}] for this field, got shape {weights.shape}")
  r = int(resolution)
  grid_coords(r)
  total = r ** 3
  if total >= 2 ** 31 - 2 ** 26:
    raise ConfigError(f"meshing resolution {r} is too large for int32 grid indices")
  n = len(weights)
  out = np.empty((n, total), np.float32)
  if n == 0:
    return out.reshape(0, r, r, r)
  batch, chunk, steps = _plan(spec, r, n, batch, chunk, steps, mesh)
  key = (spec, r, batch, chunk, steps, raw, mesh)
  fn = _FN_CACHE.get(key)
  if fn is None:
    fn = _FN_CACHE[key] = _call_fn(spec, r, batch, chunk, steps, raw, mesh)
  per_call = chunk * steps
  pending = []

  def fetch(item):
    arr, b0, nb, start = item
    stop = min(start + per_call, total)
    out[b0:b0 + nb, start:stop] = np.asarray(arr)[:nb, :stop - start]

  for b0 in range(0, n, batch):
    wb = weights[b0:b0 + batch]
    nb = len(wb)
    if nb < batch:
      wb = np.concatenate([wb, np.zeros((batch - nb, wb.shape[1]), np.float32)])
    wd = jnp.asarray(wb) if mesh is None else jax.device_put(wb, sharding.named(mesh, 'fields', None))
    for start in range(0, total, per_call):
      pending.append((fn(wd, jnp.int32(start)), b0, nb, start))
      if len(pending) > 1:          # fetch the previous call while this one runs
        fetch(pending.pop(0))
  for item in pending:
    fetch(item)
  return out.reshape(n, r, r, r)


# ---------------------------------------------------------------------------------------------
# Marching cubes.

def empty_mesh() -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)


def marching_cubes(volume: np.ndarray, level: float = 0.0, inside: str = 'above'
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Iso-surface of a grid volume [R, R, R] (as from `eval_grid`).

  Returns (vertices float32 [V, 3] in field coordinates, faces int32 [F, 3]); faces are
  counter-clockwise seen from outside, where outside is where values are below the level
  (inside='above', occupancy) or above it (inside='below', signed distance). A volume that does not
  cross the level gives an empty mesh (V = F = 0). Non-finite values count as outside.
  """
  measure = extras.load('skimage.measure', 'shapes')
  if inside not in INSIDE:
    raise ConfigError(f"inside={inside!r} is not one of {INSIDE}")
  vol = np.asarray(volume, np.float32)
  if vol.ndim != 3 or min(vol.shape) < 2 or len(set(vol.shape)) != 1:
    raise NfjaxError(f"marching_cubes needs a cubic volume [R, R, R] with R >= 2, got shape {vol.shape}")
  level = float(level)
  if not np.all(np.isfinite(vol)):
    outside = level - 1.0 if inside == 'above' else level + 1.0
    vol = np.nan_to_num(vol, nan=outside, posinf=np.float32(1e6), neginf=np.float32(-1e6))
  lo, hi = float(vol.min()), float(vol.max())
  if not lo < level < hi:
    return empty_mesh()
  try:
    verts, faces, _, _ = measure.marching_cubes(vol, level)
  except (ValueError, RuntimeError):
    return empty_mesh()
  faces = np.asarray(faces, np.int32)
  # skimage's winding is outward for an inside-below (signed distance) volume; flip it otherwise.
  if inside == 'above':
    faces = faces[:, [0, 2, 1]]
  return index_to_coords(verts, vol.shape[0]), np.ascontiguousarray(faces)


def mesh_fields(spec: mlp.FieldSpec, weights: np.ndarray, resolution: int = 256, level: float = 0.0,
                inside: str = 'above', *, batch: int | None = None, chunk: int | None = None,
                steps: int | None = None, mesh=None) -> list[tuple[np.ndarray, np.ndarray]]:
  """Flat weights [B, P] -> B meshes (vertices f32 [V, 3], faces i32 [F, 3]); empty where the
  level is not crossed. Evaluates `batch` fields at a time so host memory stays at batch x R^3."""
  weights = np.asarray(weights, np.float32)
  if weights.ndim == 1:
    weights = weights[None]
  shards = sharding.axis_size(mesh, 'fields') if mesh is not None else 1
  group = batch or min(max(len(weights), 1), 16)
  group = max(shards, -(-group // shards) * shards)
  meshes = []
  for b0 in range(0, len(weights), group):
    vols = eval_grid(spec, weights[b0:b0 + group], resolution, batch=group, chunk=chunk, steps=steps, mesh=mesh)
    meshes.extend(marching_cubes(v, level, inside) for v in vols)
  return meshes


# ---------------------------------------------------------------------------------------------
# Files.

def _check_mesh(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
  v = np.asarray(vertices, np.float32).reshape(-1, 3)
  f = np.asarray(faces, np.int64).reshape(-1, 3)
  if len(f) and (f.min() < 0 or f.max() >= len(v)):
    raise NfjaxError(f"faces index vertices 0..{int(f.max())}, the mesh has {len(v)}")
  return v, f


def obj_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
  v, f = _check_mesh(vertices, faces)
  buf = io.StringIO()
  buf.write(f"# nfjax mesh: {len(v)} vertices, {len(f)} faces\n")
  if len(v):
    np.savetxt(buf, v, fmt='v %.9g %.9g %.9g')
  if len(f):
    np.savetxt(buf, f + 1, fmt='f %d %d %d')
  return buf.getvalue().encode()


def ply_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
  """Binary little-endian PLY: float x, y, z per vertex; uchar count + int vertex_indices per face."""
  v, f = _check_mesh(vertices, faces)
  header = ("ply\nformat binary_little_endian 1.0\ncomment nfjax mesh\n"
            f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
            f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
  rec = np.empty(len(f), dtype=[('n', 'u1'), ('idx', '<i4', (3,))])
  rec['n'] = 3
  rec['idx'] = f
  return header.encode('ascii') + v.astype('<f4').tobytes() + rec.tobytes()


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray) -> None:
  """Wavefront OBJ (1-based faces), written atomically."""
  write_bytes(path, obj_bytes(vertices, faces))


def write_ply(path: str, vertices: np.ndarray, faces: np.ndarray) -> None:
  """Binary little-endian PLY, written atomically."""
  write_bytes(path, ply_bytes(vertices, faces))


def write_meshes(directory: str, meshes: Sequence[tuple[np.ndarray, np.ndarray]], fmt: str = 'ply',
                 prefix: str = 'mesh') -> list[str]:
  """Write meshes as DIR/{prefix}_{i:05d}.{fmt} (fmt 'ply' or 'obj'); returns the paths."""
  import os
  writer = {'ply': write_ply, 'obj': write_obj}.get(fmt)
  if writer is None:
    raise ConfigError(f"mesh format {fmt!r} is not one of ('ply', 'obj')")
  paths = []
  for i, (v, f) in enumerate(meshes):
    p = os.path.join(directory, f"{prefix}_{i:05d}.{fmt}")
    writer(p, v, f)
    paths.append(p)
  return paths
