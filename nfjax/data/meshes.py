"""Real meshes: file loading (trimesh parses OBJ/PLY/OFF), directory discovery, normalisation.

Layouts `find_meshes` understands (extensions .obj, .ply, .off, any case):
  flat:      ROOT/<model_id>.obj                                   one class, label 0
  classes:   ROOT/<class>/<model_id>.obj                           one class per subdirectory
  ShapeNet:  ROOT/<synset>/<model_id>/models/model_normalized.obj  (ShapeNetCore v2)
             ROOT/<synset>/<model_id>/model.obj                    (ShapeNetCore v1)
Class subdirectories may mix the last three forms. Labels are the index of the class directory in
sorted order, or in `synsets` when given. A split file (HyperDiffusion's `train_split.lst`: one
model id per line; or a CSV with a column of model ids, e.g. ShapeNet's `all.csv`) keeps only the
models it lists.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from nfjax import extras
from nfjax.errors import DataError
from nfjax.utils.logging import log

MESH_EXTENSIONS = ('.obj', '.ply', '.off')
# Inside ROOT/<synset>/<model_id>/, in order of preference.
MODEL_FILES = ('models/model_normalized.obj', 'model.obj')

# ShapeNetCore synset ids of the 13 categories most papers use, so that configs and logs can say
# 'airplane' instead of '02691156'.
SHAPENET_NAMES = {
    '02691156': 'airplane', '02828884': 'bench', '02933112': 'cabinet', '02958343': 'car',
    '03001627': 'chair', '03211117': 'display', '03636649': 'lamp', '03691459': 'loudspeaker',
    '04090263': 'rifle', '04256520': 'sofa', '04379243': 'table', '04401088': 'telephone',
    '04530566': 'watercraft',
}
_SYNSET_OF = {v: k for k, v in SHAPENET_NAMES.items()}
_SYNSET_OF['plane'] = '02691156'


class MeshError(DataError):
  """A mesh file that cannot be used: unreadable, corrupt, or without usable triangles."""


@dataclasses.dataclass(frozen=True)
class MeshEntry:
  path: str      # the mesh file
  label: int     # class index
  synset: str    # class directory name ('' for a flat directory)
  model_id: str  # model directory name, or the file name without extension

  @property
  def name(self) -> str:
    return f"{self.synset}/{self.model_id}" if self.synset else self.model_id


def load_mesh(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(vertices float32 [V, 3], faces int32 [F, 3]) of an OBJ/PLY/OFF file.

  Scenes (several objects in one file) are concatenated; polygons are triangulated; nothing else
  changes the geometry (no vertex merging, no repair). Materials and textures are not read.
  Raises MeshError naming the file when it cannot be read or has no usable triangles.
  """
  trimesh = extras.load('trimesh', 'shapes')  # loading only: robust parsers for the formats ShapeNet & co. ship in

  if not os.path.isfile(path):
    raise MeshError(f"mesh file {path} does not exist")
  if os.path.getsize(path) == 0:
    raise MeshError(f"mesh file {path} is empty (0 bytes)")
  ext = os.path.splitext(path)[1].lower()
  kwargs = {'skip_materials': True} if ext == '.obj' else {}
  try:
    mesh = trimesh.load(path, force='mesh', process=False, **kwargs)
  except Exception as e:  # noqa: BLE001 - parsers raise anything on corrupt input
    raise MeshError(f"mesh file {path} could not be read: {type(e).__name__}: {e}") from e
  vertices = np.asarray(getattr(mesh, 'vertices', np.zeros((0, 3))), np.float64).reshape(-1, 3)
  faces = np.asarray(getattr(mesh, 'faces', np.zeros((0, 3))), np.int64).reshape(-1, 3)
  if len(faces) == 0:
    raise MeshError(f"mesh file {path} has no faces ({len(vertices)} vertices)")
  if not np.all(np.isfinite(vertices)):
    raise MeshError(f"mesh file {path} has non-finite vertex coordinates")
  if faces.min() < 0 or faces.max() >= len(vertices):
    raise MeshError(f"mesh file {path} has faces that index missing vertices")
  t = vertices[faces]
  area = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=-1).sum()
  if not area > 0:
    raise MeshError(f"mesh file {path} has no surface area (all {len(faces)} faces degenerate)")
  return vertices.astype(np.float32), faces.astype(np.int32)


def normalize(vertices: np.ndarray, mode: str = 'mean', extent: float = 0.475) -> np.ndarray:
  """float32 [V, 3]: centred, then scaled so that max |coordinate| = extent.

  mode 'mean' centres on the vertex mean (HyperDiffusion, NeF-GPT); 'bbox' on the bounding-box
  centre, which uses the cube best. extent 0.475 = 0.5 * 0.95 leaves a margin inside [-0.5, 0.5]^3.
  """
  v = np.asarray(vertices, np.float64)
  if mode == 'mean':
    center = v.mean(0)
  elif mode == 'bbox':
    center = 0.5 * (v.min(0) + v.max(0))
  else:
    raise ValueError(f"normalize mode {mode!r} is not 'mean' or 'bbox'")
  v = v - center
  scale = np.abs(v).max()
  if not scale > 0:
    raise ValueError("cannot normalise a mesh whose vertices all coincide")
  return (v * (extent / scale)).astype(np.float32)


def _is_mesh(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in MESH_EXTENSIONS and not name.startswith('.')


def _strip_ext(name: str) -> str:
  base, ext = os.path.splitext(name)
  return base if ext.lower() in MESH_EXTENSIONS + ('.npy', '.npz') else name


def _models_in(directory: str) -> list[tuple[str, str]]:
  """(model_id, path) of the meshes in one class directory: files, or ShapeNet model folders."""
  out = []
  for name in sorted(os.listdir(directory)):
    full = os.path.join(directory, name)
    if os.path.isfile(full) and _is_mesh(name):
      out.append((_strip_ext(name), full))
    elif os.path.isdir(full):
      for rel in MODEL_FILES:
        candidate = os.path.join(full, *rel.split('/'))
        if os.path.isfile(candidate):
          out.append((name, candidate))
          break
  return out


def resolve_synset(name: str) -> str:
  """A ShapeNet synset id for a category name ('airplane', 'plane', 'chair', ...), else `name`."""
  return _SYNSET_OF.get(name, name)


def class_name(synset: str) -> str:
  """'airplane' for '02691156', else the directory name itself ('' -> 'shape')."""
  return SHAPENET_NAMES.get(synset, synset or 'shape')


def read_split(path: str, known_ids: set[str] | None = None) -> set[str]:
  """Model ids listed in a split file.

  Text (.lst/.txt): one id per line ('#' comments and blank lines ignored; 'synset/id' and
  extensions are reduced to the id). CSV: the column named modelId/model_id/id/name/shape_id, or
  else the column whose values match most `known_ids`.
  """
  if not os.path.isfile(path):
    raise DataError(f"data.split_file={path!r} does not exist")
  with open(path, newline='') as f:
    text = f.read()
  lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith('#')]
  if not lines:
    raise DataError(f"split file {path} lists no model ids")

  def clean(s: str) -> str:
    s = s.strip().strip('"').replace('\\', '/').rstrip('/')
    return _strip_ext(s.split('/')[-1])

  is_csv = path.lower().endswith('.csv') or ',' in lines[0]
  if not is_csv:
    return {clean(ln) for ln in lines}
  rows = list(csv.reader(lines))
  header = [h.strip() for h in rows[0]]
  preferred = ('modelId', 'model_id', 'modelid', 'id', 'name', 'shape_id', 'model')
  for key in preferred:
    if key in header:
      col = header.index(key)
      return {clean(r[col]) for r in rows[1:] if len(r) > col and r[col].strip()}
  width = max(len(r) for r in rows)
  if known_ids:
    scores = [sum(clean(r[c]) in known_ids for r in rows if len(r) > c) for c in range(width)]
    col = int(np.argmax(scores))
    if scores[col] > 0:
      return {clean(r[col]) for r in rows if len(r) > col and r[col].strip()}
  raise DataError(f"split file {path}: no column of model ids found (header {header}); name the column "
                  f"one of {', '.join(preferred)}")


def find_meshes(root: str, synsets: tuple[str, ...] | list[str] = (), split_file: str = '') -> list[MeshEntry]:
  """Every mesh under `root` in one of the layouts of the module docstring, sorted by (label, model_id).

  `synsets`: class directories to use, in label order (ShapeNet category names such as 'airplane'
  resolve to their synset ids); empty = every class directory, sorted. `split_file`: keep only the
  model ids it lists. Raises DataError when root is missing, a requested class is absent, or no
  mesh is found.
  """
  looked_for = (f"{'/'.join(MESH_EXTENSIONS)} files in {root}, in {root}/<class>/, or ShapeNet models "
                f"{root}/<synset>/<model_id>/{{{','.join(MODEL_FILES)}}}")
  if not root or not os.path.isdir(root):
    raise DataError(f"data.mesh_dir={root!r} is not a directory")
  requested = tuple(synsets)
  synsets = tuple(resolve_synset(s) for s in requested)
  subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
  top = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)) and _is_mesh(n))

  classes: list[tuple[str, list[tuple[str, str]]]] = []
  if synsets:
    missing = [f"{r!r}" + (f" (synset {s})" if s != r else '') for r, s in zip(requested, synsets) if s not in subdirs]
    if missing:
      raise DataError(f"data.synsets: {', '.join(missing)} not found under {root} "
                      f"(class directories there: {', '.join(subdirs[:20]) or 'none'})")
    classes = [(s, _models_in(os.path.join(root, s))) for s in synsets]
  else:
    found = [(d, _models_in(os.path.join(root, d))) for d in subdirs]
    classes = [(d, m) for d, m in found if m]
    if classes and top:
      log('fit', f"{root}: using the class directories {', '.join(d for d, _ in classes[:8])}"
                 f"{'...' if len(classes) > 8 else ''}; ignoring {len(top)} mesh file(s) at its top level")
    if not classes and top:
      classes = [('', [(_strip_ext(n), os.path.join(root, n)) for n in top])]

  entries = [MeshEntry(path=p, label=label, synset=s, model_id=m)
             for label, (s, models) in enumerate(classes) for m, p in models]
  if not entries:
    raise DataError(f"no mesh found under {root}: looked for {looked_for}")
  if split_file:
    keep = read_split(split_file, {e.model_id for e in entries})
    kept = [e for e in entries if e.model_id in keep]
    log('fit', f"split file {split_file}: {len(keep)} ids, {len(kept)} of {len(entries)} meshes kept"
               + (f", {len(keep) - len(kept)} listed ids not found" if len(keep) > len(kept) else ''))
    if not kept:
      raise DataError(f"split file {split_file} keeps none of the {len(entries)} meshes under {root} "
                      f"(e.g. {entries[0].model_id!r}; the file lists e.g. {sorted(keep)[0]!r})")
    entries = kept
  return entries
