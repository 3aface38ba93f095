"""The weight dataset: what the fit stage writes and every later stage reads.

A directory (``WORKDIR/fields``) of plain files that numpy alone can read:

  meta.json          format version, the field architecture (``field``), the layout of the flat
                     vector (``layout``: name, shape, offset, size of every tensor, PyTorch
                     state_dict order), num_fields, params_per_field, data source, image shape,
                     number of classes, init mode, the config fingerprint of the run.
  weights.npy        float32 [N, P]   one fitted field per row
  labels.npy         int32   [N]      class of the source image
  source_index.npy   int64   [N]      index of the image in its source split
  quality.npy        float32 [N]      per-field PSNR in dB (images) or IoU (shapes)
  flags.npy          uint8   [N]      0 = good; bit 1 = non-finite weights/loss; bit 2 = quality
                                      under the floor. Flagged fields are kept for inspection
                                      but excluded by ``good()`` (and so by later stages).
  shared_init.npy    float32 [P]      the shared initialisation (init mode 'shared' only)
  summary.json       headline figures; written last: its presence marks the dataset complete.

While fitting, finished chunks live in ``chunks/chunk_XXXXX.npz`` (each written atomically);
they are merged into the files above when the last chunk is done.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

FORMAT = 'nfjax.fields/v1'
FLAG_NONFINITE = 1
FLAG_LOW_QUALITY = 2
ARRAYS = ('weights', 'labels', 'source_index', 'quality', 'flags')


@dataclasses.dataclass
class FieldDataset:
  weights: np.ndarray
  labels: np.ndarray
  source_index: np.ndarray
  quality: np.ndarray
  flags: np.ndarray
  meta: dict
  shared_init: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.weights)

  @property
  def params_per_field(self) -> int:
    return int(self.meta['params_per_field'])

  @property
  def layout(self) -> list[dict]:
    return self.meta['layout']

  def good(self) -> np.ndarray:
    """Indices of fields without flags."""
    return np.nonzero(self.flags == 0)[0]


def chunk_path(directory: str, chunk: int) -> str:
  return os.path.join(directory, 'chunks', f'chunk_{chunk:05d}.npz')


def finished_chunks(directory: str) -> set[int]:
  out = set()
  for p in glob.glob(os.path.join(directory, 'chunks', 'chunk_*.npz')):
    out.add(int(os.path.basename(p)[len('chunk_'):-len('.npz')]))
  return out


def read_chunk(directory: str, chunk: int) -> dict[str, np.ndarray]:
  with np.load(chunk_path(directory, chunk)) as z:
    return {k: z[k] for k in z.files}


def is_complete(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'summary.json'))


def load(directory: str, mmap: bool = False) -> FieldDataset:
  """Read a finished weight dataset (numpy only)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no weight dataset at {directory}: run the fit stage first")
  if not is_complete(directory):
    raise FileNotFoundError(
        f"the weight dataset at {directory} is incomplete (no summary.json): the fit stage was "
        f"interrupted; re-run it with the same command to finish it")
  with open(os.path.join(directory, 'meta.json')) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f"{directory}/meta.json has format {meta.get('format')!r}, expected {FORMAT!r}")
  mode = 'r' if mmap else None
  arrays = {k: np.load(os.path.join(directory, f'{k}.npy'), mmap_mode=mode) for k in ARRAYS}
  init_path = os.path.join(directory, 'shared_init.npy')
  shared = np.load(init_path) if os.path.exists(init_path) else None
  n, p = arrays['weights'].shape
  if p != meta['params_per_field'] or n != meta['num_fields']:
    raise ValueError(f"{directory}: weights.npy is [{n}, {p}] but meta.json says "
                     f"[{meta['num_fields']}, {meta['params_per_field']}]")
  return FieldDataset(meta=meta, shared_init=shared, **arrays)
