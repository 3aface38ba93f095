"""Triangle-mesh geometry shared by shape data, meshing and shape metrics.

Meshes are plain arrays: vertices float [V, 3], faces int [F, 3] (counter-clockwise seen from
outside, so normals point out).

The point queries (`winding_number`, `occupancy`, `unsigned_distance`, `signed_distance`) are
exact and brute force over all (point, face) pairs, in JAX on whatever device JAX uses. Points go
through one jitted function in chunks of fixed size (the last chunk padded); inside it a loop runs
over blocks of `face_chunk` faces, so memory is O(chunk * face_chunk) whatever the mesh size, and
the face array is padded to a power-of-two number of blocks with the used count passed as a traced
value, so meshes of similar size share one compilation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Points per jitted call (the last chunk is padded) and faces per loop step, measured best:
# CPU (2 cores) 16,384 x 1; H100 65,536 x 256 (125 G pairs/s winding, 67 G distance; 1,024-face
# tiles compile for minutes there).
CPU_CHUNKS = (16384, 1)
ACCELERATOR_CHUNKS = (65536, 256)


def triangles(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
  """[F, 3, 3] corner coordinates of every face."""
  return np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
  t = triangles(vertices, faces)
  return 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=-1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int,
                   rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n points uniformly distributed over the surface (area-weighted faces, uniform barycentrics).

  Returns (points float32 [n, 3], face index int64 [n]). Raises ValueError for a mesh with no area.
  """
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  areas = face_areas(vertices, faces)
  total = areas.sum()
  if not np.isfinite(total) or total <= 0:
    raise ValueError("mesh has no surface area (no faces, or all faces degenerate)")
  face = rng.choice(len(areas), size=n, p=areas / total)
  u, v = rng.random(n), rng.random(n)
  flip = u + v > 1
  u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
  t = triangles(vertices, faces)[face]
  pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
  return pts.astype(np.float32), face


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
  """Enclosed volume by the divergence theorem: positive for a closed mesh with outward normals."""
  t = triangles(vertices, faces)
  return float(np.einsum('fi,fi->f', t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


# ---------------------------------------------------------------------------------------------
# Point queries (JAX). Inner loops are written per coordinate (structure of arrays): points as
# [C, 1] columns, faces as [1, Fc] rows of precomputed per-face features, which XLA fuses into one
# vectorised loop over (point, face) pairs.

def _atan2(y, x):
  """float32 atan2 with a degree-15 odd minimax polynomial (max error 1e-6 rad), ~1.6x faster
  than XLA's on CPU; atan2(±0, x<0) = +π."""
  ax, ay = jnp.abs(x), jnp.abs(y)
  hi, lo = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
  a = lo / jnp.where(hi > 0, hi, 1.0)
  s = a * a
  r = (((((((-0.0040540580 * s + 0.0218612288) * s - 0.0559098861) * s + 0.0964200441) * s
          - 0.1390853351) * s + 0.1994653599) * s - 0.3332985605) * s) * a + a
  r = jnp.where(ay > ax, 0.5 * np.pi - r, r)
  r = jnp.where(x < 0, np.pi - r, r)
  return jnp.where(y < 0, -r, r)


def _winding_features(tri: np.ndarray) -> np.ndarray:
  """[9, F]: the corners a, b, c. Padding faces are all-zero triangles (solid angle 0)."""
  return tri.reshape(-1, 9).T


def _distance_features(tri: np.ndarray) -> np.ndarray:
  """[33, F] per-face constants of the point-triangle distance (float64 in, cast by the caller)."""
  a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
  ab, bc, ca = b - a, c - b, a - c
  n = np.cross(ab, c - a)

  def inv(x):
    with np.errstate(divide='ignore'):
      return np.where(x > 0, 1.0 / np.where(x > 0, x, 1.0), 0.0)

  n2 = np.einsum('fi,fi->f', n, n)
  cols = [a, b, c, ab, bc, ca,
          np.cross(n, ab), np.cross(n, bc), np.cross(n, ca),   # inward edge normals in the plane
          n * np.sqrt(inv(n2))[:, None]]                          # unit normal (0 if degenerate)
  scal = [inv(np.einsum('fi,fi->f', e, e)) for e in (ab, bc, ca)]
  return np.concatenate([np.concatenate(cols, 1).T, np.stack(scal)], 0)


def _pack(vertices, faces, face_chunk: int, what: str) -> tuple[np.ndarray, int]:
  """(face features [K, D, B] float32, number of used blocks). B = face_chunk faces per block;
  K is a power of two so meshes of similar size share one compilation. The last used block is
  padded with all-zero triangles (solid angle 0) or copies of a real face (distance unchanged)."""
  faces = np.asarray(faces).reshape(-1, 3)
  if len(faces) == 0:
    raise ValueError("mesh has no faces")
  tri = triangles(vertices, faces)
  f = len(tri)
  used = -(-f // face_chunk)
  blocks = max(8, 1 << math.ceil(math.log2(used)))
  full = np.zeros((blocks * face_chunk, 3, 3), np.float64)
  full[:f] = tri
  if what == 'sqdist':
    full[f:] = tri[0]
  feats = _winding_features(full) if what == 'winding' else _distance_features(full)
  feats = feats.reshape(len(feats), blocks, face_chunk).transpose(1, 0, 2)
  return np.ascontiguousarray(feats).astype(np.float32), used


def _solid_angle_sum(p, t):
  """Sum over faces of the signed solid angle (Van Oosterom–Strackee): p [3, C, 1], t [9, Fc]."""
  ax, ay, az = t[0] - p[0], t[1] - p[1], t[2] - p[2]
  bx, by, bz = t[3] - p[0], t[4] - p[1], t[5] - p[2]
  cx, cy, cz = t[6] - p[0], t[7] - p[1], t[8] - p[2]
  la = jnp.sqrt(ax * ax + ay * ay + az * az)
  lb = jnp.sqrt(bx * bx + by * by + bz * bz)
  lc = jnp.sqrt(cx * cx + cy * cy + cz * cz)
  det = ax * (by * cz - bz * cy) + ay * (bz * cx - bx * cz) + az * (bx * cy - by * cx)
  den = (la * lb * lc + (ax * bx + ay * by + az * bz) * lc + (bx * cx + by * cy + bz * cz) * la
         + (cx * ax + cy * ay + cz * az) * lb)
  return jnp.sum(2.0 * _atan2(det, den), -1)


def _min_sq_distance(p, t):
  """Min over faces of the exact squared point-triangle distance: p [3, C, 1], t [33, Fc].

  The closest point lies inside the face (then it is the projection onto the plane) or on its
  boundary (then on one of the three edges, vertices included). The plane case counts only when
  the projection falls inside all three edges, and degenerate (zero-area) triangles have a zero
  normal, so they fall back to their edges: slivers in real meshes cannot give wrong distances.
  """
  def dot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]

  def row(i):
    return (t[i], t[i + 1], t[i + 2])

  a, b, c, ab, bc, ca, m0, m1, m2, n = (row(3 * k) for k in range(10))
  inv_ab, inv_bc, inv_ca = t[30], t[31], t[32]
  ap = tuple(p[i] - a[i] for i in range(3))
  bp = tuple(p[i] - b[i] for i in range(3))
  cp = tuple(p[i] - c[i] for i in range(3))

  def seg(q, e, inv_len2):
    s = jnp.clip(dot(q, e) * inv_len2, 0.0, 1.0)
    d = tuple(q[i] - s * e[i] for i in range(3))
    return dot(d, d)

  edges = jnp.minimum(jnp.minimum(seg(ap, ab, inv_ab), seg(bp, bc, inv_bc)), seg(cp, ca, inv_ca))
  inside = (dot(ap, m0) > 0) & (dot(bp, m1) > 0) & (dot(cp, m2) > 0)  # all False if degenerate
  h = dot(ap, n)
  d2 = jnp.where(inside, jnp.minimum(h * h, edges), edges)
  return jnp.min(d2, -1)


@functools.partial(jax.jit, static_argnames=('what',))
def _query(points, feats, num_blocks, what: str):
  """One chunk: points [C, 3], face features [K, D, B] of which the first `num_blocks` blocks are
  used (a traced count, so every mesh padded to the same K shares one compilation) -> [C]
  (winding number or squared distance)."""
  p = points.T[:, :, None]

  def body(i, acc):
    t = jax.lax.dynamic_index_in_dim(feats, i, 0, keepdims=False)[:, None, :]
    if what == 'winding':
      return acc + _solid_angle_sum(p, t)
    return jnp.minimum(acc, _min_sq_distance(p, t))

  init = jnp.zeros if what == 'winding' else functools.partial(jnp.full, fill_value=jnp.inf)
  out = jax.lax.fori_loop(0, num_blocks, body, init(points.shape[:1], dtype=jnp.float32))
  return out / (4.0 * np.pi) if what == 'winding' else out


def _defaults(chunk: int | None, face_chunk: int | None) -> tuple[int, int]:
  """Points per call and faces per loop step. On CPU one face per step keeps every intermediate a
  [chunk] vector in cache (5x faster than [chunk, 512] tiles, which XLA materialises in memory);
  accelerators get [chunk, 256] tiles."""
  default = CPU_CHUNKS if jax.default_backend() == 'cpu' else ACCELERATOR_CHUNKS
  return (chunk or default[0]), (face_chunk or default[1])


def _run(points, vertices, faces, what: str, chunk: int | None, face_chunk: int | None) -> np.ndarray:
  chunk, face_chunk = _defaults(chunk, face_chunk)
  points = np.asarray(points, np.float32).reshape(-1, 3)
  feats, num_blocks = _pack(vertices, faces, face_chunk, what)
  feats = jnp.asarray(feats)
  n = len(points)
  chunk = max(1, min(chunk, 1 << math.ceil(math.log2(max(n, 1)))))  # few distinct shapes to compile
  outs = []
  for start in range(0, n, chunk):
    part = points[start:start + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part), 3), np.float32)])
    outs.append(_query(jnp.asarray(part), feats, num_blocks, what))
  if not outs:
    return np.zeros((0,), np.float32)
  return np.concatenate([np.asarray(o) for o in outs])[:n]


def winding_number(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, chunk: int | None = None,
                   face_chunk: int | None = None) -> np.ndarray:
  """Generalized winding number float32 [N] of points [N, 3] with respect to a triangle mesh.

  Sum over faces of the signed solid angle (Van Oosterom–Strackee) / 4π: ≈1 inside and ≈0
  outside a closed outward-oriented mesh, and a robust inside measure (threshold 0.5) for meshes
  with holes or self-intersections. Overlapping closed parts give values > 1 in the overlap.
  `chunk` (points per compiled call) and `face_chunk` (faces per loop step) default to
  CPU_CHUNKS or ACCELERATOR_CHUNKS by backend; they change speed and memory, not results.
  """
  return _run(points, vertices, faces, 'winding', chunk, face_chunk)


def occupancy(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, chunk: int | None = None,
              face_chunk: int | None = None) -> np.ndarray:
  """bool [N]: winding number > 0.5."""
  return winding_number(points, vertices, faces, chunk, face_chunk) > 0.5


def unsigned_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, chunk: int | None = None,
                      face_chunk: int | None = None) -> np.ndarray:
  """Exact Euclidean distance float32 [N] from points [N, 3] to the nearest triangle of the mesh."""
  return np.sqrt(_run(points, vertices, faces, 'sqdist', chunk, face_chunk))


def signed_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, chunk: int | None = None,
                    face_chunk: int | None = None) -> np.ndarray:
  """float32 [N]: unsigned distance, negative inside (winding number > 0.5), positive outside."""
  inside = occupancy(points, vertices, faces, chunk, face_chunk)
  return np.where(inside, -1.0, 1.0).astype(np.float32) * unsigned_distance(points, vertices, faces, chunk,
                                                                               face_chunk)
