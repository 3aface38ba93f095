"""The samples/ directory: what the sample stage writes and the evaluate stage reads.


  WORKDIR/samples/settings.json   {"settings": [{"name": "topk3_t0.8", "top_k": 3,
                                                 "temperature": 0.8, "top_p": 1.0}, ...]}
  WORKDIR/samples/<name>/weights.npy   float32 [S, P]  decoded weight vectors, fields/ layout;
                                                       rows may be non-finite (failed decodes)
  WORKDIR/samples/<name>/labels.npy    int32   [S]     the conditioning class
  WORKDIR/samples/<name>/tokens.npy    (not read here)
  WORKDIR/samples/<name>/meshes.npz    shape fields only, optional: every sample's marching-cubes
                                       mesh (`pack_meshes` layout); reused by the evaluate stage
                                       when it meshes at the same resolution and level
  WORKDIR/samples/summary.json         written last: marks samples/ complete

A setting is finished when its weights.npy exists (`write_setting` writes it last).
"""

from __future__ import annotations

import numpy as np

from nfjax.errors import DataError
from nfjax.io import files
from nfjax.io.workdir import SAMPLES


def directory(workdir: str) -> str:
  return files.join(workdir, SAMPLES)


def write_settings(workdir: str, settings: list[dict]) -> None:
  files.write_json(files.join(directory(workdir), 'settings.json'), {'settings': settings})


def setting_done(workdir: str, name: str) -> bool:
  return files.exists(files.join(directory(workdir), name, 'weights.npy'))


def write_setting(workdir: str, name: str, tokens: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> None:
  """One setting's arrays; weights.npy is written last and marks the setting done."""
  d = files.join(directory(workdir), name)
  files.write_npy(files.join(d, 'tokens.npy'), np.asarray(tokens, np.int32))
  files.write_npy(files.join(d, 'labels.npy'), np.asarray(labels, np.int32))
  files.write_npy(files.join(d, 'weights.npy'), np.asarray(weights, np.float32))


def load_settings(workdir: str) -> list[dict]:
  """The sampling settings of a finished sample stage; DataError when samples/ is missing/incomplete."""
  d = directory(workdir)
  if not files.isdir(d):
    raise DataError(f"no samples at {d}: the evaluate stage needs the sample stage's output; run "
                    f"the sample stage first (--stages=sample) or include it in --stages")
  if not files.exists(files.join(d, 'summary.json')):
    raise DataError(f"the samples at {d} are incomplete (no summary.json): the sample stage was "
                    f"interrupted; re-run it with the same command to finish it")
  path = files.join(d, 'settings.json')
  if not files.exists(path):
    raise DataError(f"{path} is missing: samples/ must list its sampling settings there")
  settings = files.read_json(path).get('settings')
  if not settings:
    raise DataError(f"{path} lists no sampling settings")
  names = [s.get('name') for s in settings]
  if any(not n for n in names) or len(set(names)) != len(names):
    raise DataError(f"{path}: every setting needs a unique 'name', got {names}")
  return settings


def load_setting(workdir: str, name: str, params_per_field: int) -> tuple[np.ndarray, np.ndarray]:
  """(weights float32 [S, P], labels int32 [S]) of one setting, checked against the field layout."""
  d = files.join(directory(workdir), name)
  weights = files.read_npy(files.join(d, 'weights.npy'))
  labels = files.read_npy(files.join(d, 'labels.npy'))
  if weights.ndim != 2 or weights.shape[1] != params_per_field:
    raise DataError(f"samples/{name}/weights.npy has shape {weights.shape}; the fields have "
                    f"{params_per_field} parameters, so it must be [S, {params_per_field}]")
  if labels.shape != (len(weights),):
    raise DataError(f"samples/{name}/labels.npy has shape {labels.shape}, expected ({len(weights)},)")
  return weights.astype(np.float32, copy=False), labels.astype(np.int32, copy=False)


def pack_meshes(meshes, **info) -> dict:
  """Meshes [(vertices [V, 3], faces [F, 3]), ...] -> the arrays of one meshes.npz:

    vertices        float32 [sum V, 3]  all meshes' vertices, mesh after mesh
    faces           int32   [sum F, 3]  faces, indexing the vertices of their own mesh (from 0)
    vertex_offsets  int64   [M + 1]     mesh i's vertices are vertices[vertex_offsets[i]:vertex_offsets[i + 1]]
    face_offsets    int64   [M + 1]     likewise for faces; an empty mesh has no vertices and no faces
  plus every keyword of `info` as a 0-d array (e.g. resolution, level, inside).
  """
  vs = [np.asarray(v, np.float32).reshape(-1, 3) for v, _ in meshes]
  fs = [np.asarray(f, np.int32).reshape(-1, 3) for _, f in meshes]
  out = {
      'vertices': np.concatenate(vs) if vs else np.zeros((0, 3), np.float32),
      'faces': np.concatenate(fs) if fs else np.zeros((0, 3), np.int32),
      'vertex_offsets': np.concatenate([[0], np.cumsum([len(v) for v in vs], dtype=np.int64)]).astype(np.int64),
      'face_offsets': np.concatenate([[0], np.cumsum([len(f) for f in fs], dtype=np.int64)]).astype(np.int64),
  }
  out.update({k: np.asarray(v) for k, v in info.items()})
  return out


def unpack_meshes(arrays) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
  """The arrays of a meshes.npz (an open NpzFile or a dict) -> (meshes, info: the 0-d extras)."""
  vo, fo = np.asarray(arrays['vertex_offsets']), np.asarray(arrays['face_offsets'])
  v, f = np.asarray(arrays['vertices']), np.asarray(arrays['faces'])
  if len(vo) != len(fo) or vo[-1] != len(v) or fo[-1] != len(f):
    raise DataError("meshes.npz is inconsistent: its offsets do not match its vertex and face arrays")
  meshes = [(v[vo[i]:vo[i + 1]], f[fo[i]:fo[i + 1]]) for i in range(len(vo) - 1)]
  info = {k: np.asarray(arrays[k]).item() for k in arrays.keys()
          if k not in ('vertices', 'faces', 'vertex_offsets', 'face_offsets') and np.asarray(arrays[k]).ndim == 0}
  return meshes, info


def load_meshes(workdir: str, name: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict] | None:
  """(meshes, info) from samples/<name>/meshes.npz, or None when the setting has none."""
  path = files.join(directory(workdir), name, 'meshes.npz')
  if not files.exists(path):
    return None
  return unpack_meshes(files.read_npz(path))


def write_meshes(workdir: str, name: str, meshes, **info) -> None:
  files.write_npz(files.join(directory(workdir), name, 'meshes.npz'), **pack_meshes(meshes, **info))
