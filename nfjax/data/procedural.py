"""A procedural family of 3D shapes: the offline default and the test data of the shape pipeline.

Each shape is a union of closed, outward-oriented triangle meshes (surfaces of revolution and
hexahedra), with proportions drawn from a seed. Parts overlap; the winding number counts the
union correctly (it is >= 1 inside any part, > 1 where parts overlap), so no boolean operations
are needed. Axes: y up; planes fly along +z.

Classes (index: name — what varies):
  0 plane — fuselage length/radius/nose/tail upsweep; wing span, chord, taper, sweep, dihedral,
            high/low mount; tailplane (conventional or T-tail); fin; 0, 2 or 4 engines.
  1 chair — seat size/height/thickness; 4 square or round splayed legs, or a pedestal on a star
            base; solid or slatted back with tilt; optional armrests.
  2 table — rectangular or round top, size, thickness, height; 4 legs (+ optional shelf) or a
            pedestal on a disc or a cross foot.
  3 lamp  — disc or box base; straight or two-segment angled stem; cone, drum or dome shade.

`make_shape(class_index, seed)` is deterministic and returns a few hundred to ~1.5k faces,
normalised into [-0.45, 0.45]^3 (bounding-box centred).
"""

from __future__ import annotations

import numpy as np

from nfjax import geometry
from nfjax.data.meshes import normalize

CLASSES = ('plane', 'chair', 'table', 'lamp')
EXTENT = 0.45
GENERATOR_VERSION = 1  # bump whenever make_shape's output changes: it invalidates shape caches

Mesh = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Primitives: closed meshes with outward normals (float64 vertices, int64 faces).

def _oriented(v: np.ndarray, f: np.ndarray) -> Mesh:
  """Flip every face if the mesh encloses negative volume (e.g. after a mirror)."""
  if geometry.signed_volume(v, f) < 0:
    f = f[:, ::-1]
  return v, np.ascontiguousarray(f)


def revolve(radii, heights, segments: int = 16) -> Mesh:
  """Surface of revolution about the y axis of the profile (radii[i], heights[i]), bottom to top.

  Profile ends with a radius > 0 are closed by a flat cap (a pole on the axis); interior radii
  must be > 0. Returns a closed mesh with outward normals.
  """
  r = [float(x) for x in radii]
  y = [float(x) for x in heights]
  tiny = 1e-9 * max(r)
  r = [x if x > tiny else 0.0 for x in r]  # e.g. sin(pi) is a pole, not a ring
  if r[0] > 0:
    r, y = [0.0] + r, [y[0]] + y
  if r[-1] > 0:
    r, y = r + [0.0], y + [y[-1]]
  rings = len(r) - 2
  theta = 2 * np.pi * np.arange(segments) / segments
  ring_v = np.stack([np.stack([r[i] * np.cos(theta), np.full(segments, y[i]), r[i] * np.sin(theta)], -1)
                     for i in range(1, rings + 1)]).reshape(-1, 3)
  v = np.concatenate([[[0.0, y[0], 0.0]], ring_v, [[0.0, y[-1], 0.0]]])
  top = len(v) - 1
  j = np.arange(segments)
  k = (j + 1) % segments
  faces = [np.stack([np.zeros(segments, int), 1 + j, 1 + k], -1)]
  for i in range(rings - 1):
    lo, hi = 1 + i * segments, 1 + (i + 1) * segments
    faces.append(np.stack([lo + j, hi + j, lo + k], -1))
    faces.append(np.stack([lo + k, hi + j, hi + k], -1))
  last = 1 + (rings - 1) * segments
  faces.append(np.stack([np.full(segments, top), last + k, last + j], -1))
  return _oriented(v, np.concatenate(faces))


def hexahedron(corners) -> Mesh:
  """A closed 6-faced solid from 8 corners indexed x_bit + 2*y_bit + 4*z_bit (like a box's)."""
  quads = ((0, 4, 6, 2), (1, 3, 7, 5), (0, 1, 5, 4), (2, 6, 7, 3), (0, 2, 3, 1), (4, 5, 7, 6))
  f = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
  return _oriented(np.asarray(corners, np.float64).reshape(8, 3), f)


def box(center, size) -> Mesh:
  bits = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], np.float64) - 0.5
  return hexahedron(np.asarray(center, np.float64) + bits * np.asarray(size, np.float64))


def _align_y(direction) -> np.ndarray:
  """Rotation matrix [3, 3] taking +y onto `direction`."""
  d = np.asarray(direction, np.float64)
  d = d / np.linalg.norm(d)
  c = d[1]
  if c < -1 + 1e-9:
    return np.diag([1.0, -1.0, -1.0])
  vx = np.array([[0, d[0], 0], [-d[0], 0, -d[2]], [0, d[2], 0]], np.float64)  # [y x d]_x
  return np.eye(3) + vx + vx @ vx / (1 + c)


def place(mesh: Mesh, rotation=None, translation=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> Mesh:
  """Scale, then rotate, then translate (the orientation is re-checked, so mirrors are safe)."""
  v, f = mesh
  v = v * np.asarray(scale, np.float64)
  if rotation is not None:
    v = v @ np.asarray(rotation, np.float64).T
  return _oriented(v + np.asarray(translation, np.float64), f)


def cylinder(p0, p1, r0: float, r1: float | None = None, segments: int = 12) -> Mesh:
  """A closed (possibly tapered) cylinder from point p0 (radius r0) to p1 (radius r1)."""
  p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
  length = np.linalg.norm(p1 - p0)
  mesh = revolve([r0, r0 if r1 is None else r1], [0.0, length], segments)
  return place(mesh, _align_y(p1 - p0), p0)


def ellipsoid(center, radii, segments: int = 16, rings: int = 8) -> Mesh:
  phi = np.linspace(0, np.pi, rings + 1)
  mesh = revolve(np.sin(phi), -np.cos(phi), segments)
  return place(mesh, None, center, radii)


def combine(parts: list[Mesh]) -> Mesh:
  vs, fs, n = [], [], 0
  for v, f in parts:
    vs.append(v)
    fs.append(f + n)
    n += len(v)
  return np.concatenate(vs), np.concatenate(fs)


# ---------------------------------------------------------------------------------------------
# Classes.

def _plane(rng: np.random.Generator) -> list[Mesh]:
  length = 1.0
  radius = length * rng.uniform(0.04, 0.075)
  nose, tail = rng.uniform(0.1, 0.22), rng.uniform(0.25, 0.4)
  tail_r = radius * rng.uniform(0.12, 0.4)
  upsweep = radius * rng.uniform(0.0, 1.0)
  # Fuselage: stations s in [0, 1] from tail (z = -L/2) to nose (z = +L/2).
  s_nose = 1 - nose * (1 - np.cos(np.linspace(0, np.pi / 2, 6)))[::-1]  # denser near the tip
  s_nose = np.concatenate([s_nose[:-1], [1.0]])
  r_nose = radius * np.sqrt(np.clip(1 - ((s_nose - (1 - nose)) / nose) ** 2, 0, 1))
  s_tail = np.linspace(0, tail, 5)
  r_tail = tail_r + (radius - tail_r) * (s_tail / tail) ** 0.8
  s = np.concatenate([s_tail, s_nose])
  r = np.concatenate([r_tail, r_nose])
  r[-1] = 0.0
  fv, ff = revolve(r, s * length - length / 2, segments=14)
  fv = fv[:, [0, 2, 1]]  # revolve axis y -> z (a mirror; re-oriented below)
  ts = np.clip((-length / 2 + tail * length - fv[:, 2]) / (tail * length), 0, 1)
  fv[:, 1] += upsweep * ts ** 2
  parts = [_oriented(fv, ff)]

  span = length * rng.uniform(0.8, 1.3)
  root = length * rng.uniform(0.14, 0.28)
  taper = rng.uniform(0.25, 0.7)
  sweep = np.radians(rng.uniform(0, 40))
  dihedral = np.radians(rng.uniform(-4, 8))
  z_le = length / 2 - length * rng.uniform(0.35, 0.55)
  y_w = radius * rng.uniform(-0.6, 0.5)
  tc = rng.uniform(0.08, 0.14)

  def surface(half_span, chord, tip_chord, sweep_, lift, z_lead, y0, thick):
    """Right half of a lifting surface (x >= 0) as a hexahedron: root at x=0, tip at half_span."""
    c = []
    for i in range(8):
      xb, yb, zb = i & 1, (i >> 1) & 1, (i >> 2) & 1
      x = half_span * xb
      ch = tip_chord if xb else chord
      lead = z_lead - x * np.tan(sweep_)
      z = lead if zb else lead - ch
      y = y0 + x * np.tan(lift) + (yb - 0.5) * thick * ch
      c.append((x, y, z))
    return hexahedron(c)

  def mirrored(mesh):
    return [mesh, place(mesh, None, (0, 0, 0), (-1, 1, 1))]

  parts += mirrored(surface(span / 2, root, root * taper, sweep, dihedral, z_le, y_w, tc))

  fin_chord = root * rng.uniform(0.5, 0.9)
  fin_h = span * rng.uniform(0.12, 0.2)
  fin_sweep = np.radians(rng.uniform(25, 50))
  z_tail = -length / 2 + fin_chord * rng.uniform(1.0, 1.3)
  y_top = upsweep * 0.8 + tail_r * 0.5
  fin = []
  for i in range(8):
    xb, yb, zb = i & 1, (i >> 1) & 1, (i >> 2) & 1
    ch = fin_chord * (0.55 if yb else 1.0)
    lead = z_tail - yb * fin_h * np.tan(fin_sweep)
    fin.append(((xb - 0.5) * 0.1 * fin_chord, y_top - 0.02 * length + yb * fin_h, lead if zb else lead - ch))
  parts.append(hexahedron(fin))
  t_tail = rng.random() < 0.3
  h_span = span * rng.uniform(0.28, 0.42)
  h_chord = fin_chord * rng.uniform(0.6, 0.9)
  if t_tail:
    h_y, h_z = y_top + fin_h * 0.97, z_tail - fin_h * np.tan(fin_sweep)
  else:
    h_y, h_z = y_top, z_tail + 0.01
  parts += mirrored(surface(h_span / 2, h_chord, h_chord * rng.uniform(0.4, 0.7), sweep + np.radians(5),
                            np.radians(rng.uniform(0, 6)), h_z, h_y, 0.1))

  engines = rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2])
  eng_r = radius * rng.uniform(0.35, 0.6)
  eng_len = root * rng.uniform(0.55, 0.8)
  for k in range(engines // 2):
    x = span / 2 * (0.3 + 0.3 * k)
    lead = z_le - x * np.tan(sweep)
    y = y_w + x * np.tan(dihedral) - eng_r * 1.1
    z0 = lead + 0.4 * eng_len
    parts += mirrored(cylinder((x, y, z0 - eng_len), (x, y, z0), eng_r * 0.8, eng_r, segments=10))
  return parts


def _chair(rng: np.random.Generator) -> list[Mesh]:
  w, d = rng.uniform(0.4, 0.6), rng.uniform(0.38, 0.55)
  t, h = rng.uniform(0.03, 0.08), rng.uniform(0.38, 0.5)
  parts = [box((0, h - t / 2, 0), (w, t, d))]
  if rng.random() < 0.75:
    leg = rng.uniform(0.025, 0.055)
    inset, splay = rng.uniform(0.0, 0.04), rng.uniform(0.0, 0.05)
    round_legs = rng.random() < 0.4
    for sx in (-1, 1):
      for sz in (-1, 1):
        top = np.array([sx * (w / 2 - inset - leg / 2), h - t, sz * (d / 2 - inset - leg / 2)])
        bottom = top + np.array([sx * splay, 0, sz * splay])
        bottom[1] = 0.0
        if round_legs:
          parts.append(cylinder(bottom, top + [0, t / 2, 0], leg / 2, segments=8))
        else:
          c = [(bottom if not (i >> 1) & 1 else top + [0, t / 2, 0])
               + [((i & 1) - 0.5) * leg, 0, (((i >> 2) & 1) - 0.5) * leg] for i in range(8)]
          parts.append(hexahedron(c))
  else:
    post = rng.uniform(0.025, 0.045)
    parts.append(cylinder((0, 0.06, 0), (0, h - t / 2, 0), post, segments=10))
    arms = int(rng.choice([4, 5]))
    reach = rng.uniform(0.22, 0.3)
    for k in range(arms):
      a = 2 * np.pi * k / arms + rng.uniform(0, 0.1)
      rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
      parts.append(place(box((reach / 2, 0.04, 0), (reach, 0.04, 0.05)), rot))
  back_h = rng.uniform(0.3, 0.6)
  back_t = rng.uniform(0.03, 0.07)
  back_w = w * rng.uniform(0.75, 1.0)
  tilt = np.radians(rng.uniform(0, 20))
  rot = np.array([[1, 0, 0], [0, np.cos(tilt), np.sin(tilt)], [0, -np.sin(tilt), np.cos(tilt)]])
  base = np.array([0, h - t / 2, -d / 2 + back_t / 2])
  if rng.random() < 0.7:
    panel = [box((0, back_h / 2, 0), (back_w, back_h + t / 2, back_t))]
  else:
    slats = int(rng.integers(2, 5))
    rail = back_h * rng.uniform(0.15, 0.3)
    panel = [box((0, back_h - rail / 2, 0), (back_w, rail, back_t))]
    for x in np.linspace(-back_w / 2 + back_t / 2, back_w / 2 - back_t / 2, slats):
      panel.append(box((x, back_h / 2, 0), (back_t, back_h, back_t * 0.8)))
  parts += [place(p, rot, base) for p in panel]
  if rng.random() < 0.35:
    arm_h = rng.uniform(0.16, 0.26)
    for sx in (-1, 1):
      x = sx * (w / 2 - 0.02)
      parts.append(box((x, h + arm_h, -0.02), (0.04, 0.03, d * 0.85)))
      parts.append(box((x, h + arm_h / 2, d * 0.3), (0.03, arm_h, 0.03)))
  return parts


def _table(rng: np.random.Generator) -> list[Mesh]:
  h, t = rng.uniform(0.5, 0.8), rng.uniform(0.03, 0.08)
  round_top = rng.random() < 0.4
  if round_top:
    r = rng.uniform(0.35, 0.65)
    parts = [cylinder((0, h - t, 0), (0, h, 0), r, segments=24)]
    w = d = 2 * r / np.sqrt(2)
  else:
    w = rng.uniform(0.8, 1.6)
    d = w * rng.uniform(0.45, 0.9)
    parts = [box((0, h - t / 2, 0), (w, t, d))]
  if not round_top and rng.random() < 0.8 or round_top and rng.random() < 0.3:
    leg = rng.uniform(0.04, 0.09)
    inset = rng.uniform(0.02, 0.1)
    round_legs = rng.random() < 0.4
    for sx in (-1, 1):
      for sz in (-1, 1):
        x, z = sx * (w / 2 - inset - leg / 2), sz * (d / 2 - inset - leg / 2)
        if round_legs:
          parts.append(cylinder((x, 0, z), (x, h - t / 2, z), leg / 2, leg / 2 * rng.uniform(0.6, 1.0),
                                segments=8))
        else:
          parts.append(box((x, (h - t / 2) / 2, z), (leg, h - t / 2, leg)))
    if rng.random() < 0.35:
      y = h * rng.uniform(0.15, 0.35)
      parts.append(box((0, y, 0), (w - 2 * inset, 0.025, d - 2 * inset)))
  else:
    post = rng.uniform(0.04, 0.08)
    parts.append(cylinder((0, 0.02, 0), (0, h - t / 2, 0), post, post * rng.uniform(0.6, 1.2), segments=12))
    foot = min(w, d) * rng.uniform(0.3, 0.45)
    if rng.random() < 0.5:
      parts.append(cylinder((0, 0, 0), (0, 0.04, 0), foot, foot * 0.8, segments=20))
    else:
      parts.append(box((0, 0.025, 0), (2 * foot, 0.05, 0.08)))
      parts.append(box((0, 0.025, 0), (0.08, 0.05, 2 * foot)))
  return parts


def _lamp(rng: np.random.Generator) -> list[Mesh]:
  base_r, base_h = rng.uniform(0.1, 0.2), rng.uniform(0.02, 0.06)
  if rng.random() < 0.7:
    parts = [cylinder((0, 0, 0), (0, base_h, 0), base_r, base_r * rng.uniform(0.6, 1.0), segments=20)]
  else:
    parts = [box((0, base_h / 2, 0), (2 * base_r, base_h, 2 * base_r * rng.uniform(0.6, 1.0)))]
  stem_r = rng.uniform(0.012, 0.025)
  stem_h = rng.uniform(0.4, 0.9)
  top = np.array([0.0, base_h + stem_h, 0.0])
  parts.append(cylinder((0, base_h * 0.5, 0), top, stem_r, segments=8))
  axis = np.array([0.0, -1.0, 0.0])
  if rng.random() < 0.4:  # angled arm
    a = np.radians(rng.uniform(25, 70))
    arm = stem_h * rng.uniform(0.4, 0.8)
    end = top + arm * np.array([np.sin(a), np.cos(a), 0])
    parts.append(ellipsoid(top, (stem_r * 1.8,) * 3, segments=8, rings=4))
    parts.append(cylinder(top, end, stem_r, segments=8))
    top = end
    tilt = np.radians(rng.uniform(20, 60))
    axis = np.array([np.sin(tilt), -np.cos(tilt), 0.0])
  shade_h = rng.uniform(0.12, 0.3)
  kind = rng.choice(['cone', 'drum', 'dome'])
  if kind == 'dome':
    r = rng.uniform(0.1, 0.22)
    phi = np.linspace(0, np.pi / 2, 5)
    mesh = revolve(np.concatenate([[r], r * np.cos(phi[1:])]), np.concatenate([[0.0], shade_h * np.sin(phi[1:])]), 18)
  else:
    r_low = rng.uniform(0.12, 0.28)
    r_top = r_low * (rng.uniform(0.35, 0.7) if kind == 'cone' else rng.uniform(0.85, 1.0))
    mesh = revolve([r_low, r_top], [0.0, shade_h], 18)
  # The shade hangs from `top` along `axis` (its narrow end up).
  parts.append(place(mesh, _align_y(-axis), top + axis * shade_h * 0.9))
  return parts


_BUILDERS = (_plane, _chair, _table, _lamp)


def make_shape(class_index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """One shape of class CLASSES[class_index]: (vertices float32 [V, 3], faces int32 [F, 3]).

  Deterministic in (class_index, seed); a closed union of outward-oriented parts, bounding-box
  centred and scaled so that max |coordinate| = 0.45.
  """
  if not 0 <= int(class_index) < len(CLASSES):
    raise ValueError(f"class_index {class_index} is not in 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")
  rng = np.random.default_rng(np.random.SeedSequence([0x5A4E, int(class_index), int(seed) & (2 ** 63 - 1)]))
  v, f = combine(_BUILDERS[int(class_index)](rng))
  return normalize(v, 'bbox', EXTENT), f.astype(np.int32)
