"""Headless pictures of triangle meshes: a NumPy triangle rasterizer (no OpenGL, no GPU).

Camera: orthographic. World y is up; the camera orbits about the y axis (`azimuth`, degrees,
0 = looking down -z from +z) and tilts `elevation` degrees above the horizon. The view box is
either fixed (`extent` = half its width in world units, centred on the origin, so sizes compare
across pictures) or fitted to the mesh (extent=None: the bounding sphere about the bounding-box
centre, which does not change as the mesh turns).

Rasterization: every face is projected to pixels; the pixel centres inside its bounding box are
tested with barycentric coordinates (edges inclusive, so a closed mesh leaves no cracks), faces
grouped by bounding-box size so the tests are vectorized; a z-buffer (`np.maximum.at`) keeps the
nearest fragment. Shading is two-sided Lambert (ambient + diffuse from a light above-left of the
camera) with the face normal, so a mesh with mixed winding still looks solid. `supersample`
renders at k x the size and box-filters down (anti-aliased edges).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nfjax.utils import images as img_utils
from nfjax.io.files import write_bytes

Mesh = tuple  # (vertices [V, 3], faces [F, 3])

_LIGHT = np.array([-0.45, 0.6, 0.85])
_LIGHT = _LIGHT / np.linalg.norm(_LIGHT)
_MAX_CANDIDATES = 1 << 22


def view_rotation(azimuth: float, elevation: float) -> np.ndarray:
  """[3, 3] world -> camera rotation (camera looks down -z, y up)."""
  a, e = math.radians(azimuth), math.radians(elevation)
  ry = np.array([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
  rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(e), -math.sin(e)], [0.0, math.sin(e), math.cos(e)]])
  return rx @ ry


def _frame(vertices: np.ndarray, extent: float | None) -> tuple[np.ndarray, float]:
  if extent is not None:
    return np.zeros(3), float(extent)
  lo, hi = vertices.min(0), vertices.max(0)
  centre = (lo + hi) / 2.0
  radius = float(np.sqrt(((vertices - centre) ** 2).sum(1).max()))
  return centre, max(radius * 1.02, 1e-6)


def _fragments(px: np.ndarray, py: np.ndarray, pz: np.ndarray, size: int):
  """Pixel-centre fragments of projected triangles [F, 3] -> (pixel index, depth, face index)."""
  x0 = np.ceil(px.min(1) - 0.5).astype(np.int64)
  x1 = np.floor(px.max(1) - 0.5).astype(np.int64)
  y0 = np.ceil(py.min(1) - 0.5).astype(np.int64)
  y1 = np.floor(py.max(1) - 0.5).astype(np.int64)
  x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
  x1, y1 = np.minimum(x1, size - 1), np.minimum(y1, size - 1)
  w, h = x1 - x0 + 1, y1 - y0 + 1
  area = (px[:, 1] - px[:, 0]) * (py[:, 2] - py[:, 0]) - (px[:, 2] - px[:, 0]) * (py[:, 1] - py[:, 0])
  ok = (w > 0) & (h > 0) & (np.abs(area) > 1e-12)
  side = np.maximum(w, h)
  bucket = np.where(ok, np.ceil(np.log2(np.maximum(side, 1))).astype(np.int64), -1)
  pix, dep, fid = [], [], []
  for b in np.unique(bucket[bucket >= 0]):
    s = 1 << int(b)
    faces = np.nonzero(bucket == b)[0]
    dy, dx = np.divmod(np.arange(s * s), s)
    step = max(1, _MAX_CANDIDATES // (s * s))
    for i in range(0, len(faces), step):
      f = faces[i:i + step]
      cx = x0[f, None] + dx[None]
      cy = y0[f, None] + dy[None]
      valid = (dx[None] < w[f, None]) & (dy[None] < h[f, None])
      qx, qy = cx + 0.5, cy + 0.5
      ax, ay = px[f, 0, None], py[f, 0, None]
      bx, by = px[f, 1, None], py[f, 1, None]
      ex, ey = px[f, 2, None], py[f, 2, None]
      inv = 1.0 / area[f, None]
      l1 = ((qx - ax) * (ey - ay) - (ex - ax) * (qy - ay)) * inv
      l2 = ((bx - ax) * (qy - ay) - (qx - ax) * (by - ay)) * inv
      l0 = 1.0 - l1 - l2
      eps = -1e-9
      inside = valid & (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
      rows, cols = np.nonzero(inside)
      if not len(rows):
        continue
      z = (l0 * pz[f, 0, None] + l1 * pz[f, 1, None] + l2 * pz[f, 2, None])[rows, cols]
      pix.append(cy[rows, cols] * size + cx[rows, cols])
      dep.append(z)
      fid.append(f[rows])
  if not pix:
    return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
  return np.concatenate(pix), np.concatenate(dep), np.concatenate(fid)


def render_mesh(vertices: np.ndarray, faces: np.ndarray, size: int = 192, azimuth: float = 30.0,
                elevation: float = 20.0, extent: float | None = None, background: int = 255,
                supersample: int = 2) -> np.ndarray:
  """A shaded grayscale picture of a mesh: uint8 [size, size] (background where nothing is hit).

  vertices float [V, 3], faces int [F, 3]; an empty mesh gives a blank image. See the module
  docstring for the camera, `extent` and shading.
  """
  size = int(size)
  k = max(1, int(supersample))
  big = size * k
  img = np.full(big * big, float(background), np.float64)
  v = np.asarray(vertices, np.float64).reshape(-1, 3)
  f = np.asarray(faces, np.int64).reshape(-1, 3)
  if len(v) and len(f):
    centre, ext = _frame(v[np.unique(f)], extent)
    cam = (v - centre) @ view_rotation(azimuth, elevation).T
    scale = big / (2.0 * ext)
    sx = cam[:, 0] * scale + big / 2.0
    sy = big / 2.0 - cam[:, 1] * scale
    tri = cam[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    normal *= np.where(normal[:, 2:3] < 0, -1.0, 1.0)          # two-sided: face the camera
    shade = 0.22 + 0.78 * np.clip(normal @ _LIGHT, 0.0, 1.0)
    pix, depth, fid = _fragments(sx[f], sy[f], cam[f][:, :, 2], big)
    if len(pix):
      zbuf = np.full(big * big, -np.inf)
      np.maximum.at(zbuf, pix, depth)
      win = depth >= zbuf[pix]
      img[pix[win]] = 255.0 * (0.08 + 0.84 * shade[fid[win]])
  img = img.reshape(big, big)
  if k > 1:
    img = img.reshape(size, k, size, k).mean((1, 3))
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _is_empty(m) -> bool:
  return m is None or len(m[0]) == 0 or len(m[1]) == 0


def mesh_grid(meshes: Sequence[Sequence[Mesh | None]], row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, size: int = 128, azimuth: float = 30.0,
              elevation: float = 20.0, extent: float | None = None, label_width: int = 90,
              cell_labels: Sequence[Sequence[str]] | None = None) -> Image.Image:
  """Rows of meshes (each (vertices, faces), or None) -> one labelled grayscale PIL image.

  Empty meshes (or None) are drawn as a grey tile marked 'empty'; cell_labels[i][j] is written under
  tile j of row i.
  """
  rows, blanks = [], []
  for i, row in enumerate(meshes):
    tiles = []
    for j, m in enumerate(row):
      if _is_empty(m):
        tiles.append(np.full((size, size), 0.78, np.float32))
        blanks.append((i, j))
      else:
        tiles.append(render_mesh(m[0], m[1], size, azimuth, elevation, extent).astype(np.float32) / 255.0)
    rows.append(np.stack(tiles) if tiles else np.zeros((0, size, size), np.float32))
  if not rows or all(len(r) == 0 for r in rows):
    raise ValueError("mesh_grid needs at least one mesh")
  pad = 2
  image = img_utils.grid(rows, row_labels=row_labels, col_labels=col_labels, scale=1, pad=pad,
                         label_width=label_width, cell_labels=cell_labels)
  draw = ImageDraw.Draw(image)
  top = 14 if col_labels else 0
  left = label_width if row_labels else 0
  below = img_utils.CELL_TEXT if cell_labels else 0
  for i, j in blanks:
    x = left + pad + j * (size + pad)
    y = top + pad + i * (size + below + pad)
    draw.text((x + size // 2 - 14, y + size // 2 - 6), 'empty', fill=60)
  return image


def mesh_grid_png(path: str, meshes: Sequence[Sequence[Mesh | None]], row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, **kwargs) -> None:
  """`mesh_grid` written as a PNG (atomically). Rows are whatever the caller groups (e.g. classes)."""
  img_utils.save_png(mesh_grid(meshes, row_labels, col_labels, **kwargs), path)


def turntable_gif(path: str, vertices: np.ndarray, faces: np.ndarray, frames: int = 24, size: int = 160,
                  elevation: float = 20.0, extent: float | None = None, duration_ms: int = 80) -> None:
  """An animated GIF of the mesh turning once about the vertical axis (fixed scale over frames)."""
  v = np.asarray(vertices, np.float64).reshape(-1, 3)
  f = np.asarray(faces, np.int64).reshape(-1, 3)
  if extent is None and len(v) and len(f):
    centre, extent = _frame(v[np.unique(f)], None)
    v = v - centre
  pics = [Image.fromarray(render_mesh(v, f, size, 360.0 * t / frames, elevation, extent if len(f) else 1.0))
          for t in range(int(frames))]
  buf = io.BytesIO()
  pics[0].save(buf, format='GIF', save_all=True, append_images=pics[1:], duration=int(duration_ms), loop=0)
  write_bytes(path, buf.getvalue())
