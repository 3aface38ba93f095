"""The samples/ directory as the evaluate stage reads it, and perturbed training fields.

Contract (written by the sample stage):

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

`perturbed_fields` is the trivial baseline (training fields plus Gaussian noise scaled by each
parameter's spread over the dataset); `write_fake_samples` writes a samples/ directory from it, so
the evaluate stage can run, be tested and be calibrated without a trained model.
"""

from __future__ import annotations

import os

import numpy as np

from nfjax.data import weights as wds
from nfjax.errors import DataError
from nfjax.utils import io

DIRNAME = 'samples'


def directory(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME)


def load_settings(workdir: str) -> list[dict]:
  """The sampling settings of a finished sample stage; DataError when samples/ is missing/incomplete."""
  d = directory(workdir)
  if not os.path.isdir(d):
    raise DataError(f"no samples at {d}: the evaluate stage needs the sample stage's output; run "
                    f"the sample stage first (--stages=sample) or include it in --stages")
  if not os.path.exists(os.path.join(d, 'summary.json')):
    raise DataError(f"the samples at {d} are incomplete (no summary.json): the sample stage was "
                    f"interrupted; re-run it with the same command to finish it")
  path = os.path.join(d, 'settings.json')
  if not os.path.exists(path):
    raise DataError(f"{path} is missing: samples/ must list its sampling settings there")
  settings = io.read_json(path).get('settings')
  if not settings:
    raise DataError(f"{path} lists no sampling settings")
  names = [s.get('name') for s in settings]
  if any(not n for n in names) or len(set(names)) != len(names):
    raise DataError(f"{path}: every setting needs a unique 'name', got {names}")
  return settings


def load_setting(workdir: str, name: str, params_per_field: int) -> tuple[np.ndarray, np.ndarray]:
  """(weights float32 [S, P], labels int32 [S]) of one setting, checked against the field layout."""
  d = os.path.join(directory(workdir), name)
  try:
    weights = np.load(os.path.join(d, 'weights.npy'))
    labels = np.load(os.path.join(d, 'labels.npy'))
  except FileNotFoundError as e:
    raise DataError(f"samples/{name} is missing {os.path.basename(e.filename or '?')}: expected "
                    f"weights.npy [S, P] and labels.npy [S] in {d}") from e
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
  path = os.path.join(directory(workdir), name, 'meshes.npz')
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as z:
    return unpack_meshes(z)


def perturbed_fields(fields: wds.FieldDataset, n: int, noise: float, seed: int,
                     pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n training fields (drawn without replacement when possible) + N(0, (noise * std_j)^2) per
  parameter j, std_j the spread of parameter j over the good fields.

  Returns (weights [n, P] float32, labels [n], source field ids [n]).
  """
  pool = fields.good() if pool is None else np.asarray(pool)
  if len(pool) == 0:
    raise DataError("no good fields to draw the baseline from")
  rng = np.random.default_rng(seed)
  ids = rng.choice(pool, size=n, replace=n > len(pool))
  w = np.asarray(fields.weights[np.sort(pool)], np.float64)
  std = w.std(0)
  eps = rng.standard_normal((n, w.shape[1]))
  out = (np.asarray(fields.weights[ids], np.float64) + noise * std * eps).astype(np.float32)
  return out, np.asarray(fields.labels[ids], np.int32), ids.astype(np.int64)


def write_fake_samples(workdir: str, settings: list[dict] | None = None, num_samples: int = 64,
                       seed: int = 0, nonfinite: int = 0) -> str:
  """A samples/ directory from perturbed training fields (for tests and calibration).

  settings: [{'name', 'top_k', 'temperature', 'top_p', 'noise'}]; the 'noise' of each setting is
  the baseline noise scale used for it (default 0.1). `nonfinite` rows of every setting are set to
  NaN / inf, as a failed decode would leave them.
  """
  fields = wds.load(os.path.join(workdir, 'fields'))
  if settings is None:
    settings = [{'name': 'topk3_t0.8', 'top_k': 3, 'temperature': 0.8, 'top_p': 1.0, 'noise': 0.05},
                {'name': 'topk5_t1.0', 'top_k': 5, 'temperature': 1.0, 'top_p': 1.0, 'noise': 0.2}]
  d = directory(workdir)
  for i, s in enumerate(settings):
    w, labels, _ = perturbed_fields(fields, num_samples, float(s.get('noise', 0.1)), seed + 101 * (i + 1))
    for k in range(min(nonfinite, num_samples)):
      w[k, k % w.shape[1]] = np.nan if k % 2 == 0 else np.inf
    io.write_npy(os.path.join(d, s['name'], 'weights.npy'), w)
    io.write_npy(os.path.join(d, s['name'], 'labels.npy'), labels)
    io.write_npy(os.path.join(d, s['name'], 'tokens.npy'), np.zeros((num_samples, 1), np.int32))
  io.write_json(os.path.join(d, 'settings.json'),
                {'settings': [{k: s[k] for k in ('name', 'top_k', 'temperature', 'top_p') if k in s}
                              for s in settings]})
  io.write_json(os.path.join(d, 'summary.json'), {'num_samples': num_samples, 'fake': True,
                                                  'settings': [s['name'] for s in settings]})
  return d
