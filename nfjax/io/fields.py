"""The weight dataset: what the fit stage writes and every later stage reads.

A directory (``WORKDIR/fields``) of plain files that numpy alone can read:

  meta.json          format version, the modality (`modality`: images, shapes, ...), the field architecture (``field``), the layout of the flat
                     vector (``layout``: name, shape, offset, size of every tensor, PyTorch
                     state_dict order), num_fields, params_per_field, data source, number of
                     classes, init mode, the config fingerprint of the run, and what the
                     modality adds (image_shape; class_names, surface, ...).
  weights.npy        float32 [N, P]   one fitted field per row
  labels.npy         int32   [N]      class of the source image
  source_index.npy   int64   [N]      index of the image in its source split
  quality.npy        float32 [N]      per-field PSNR in dB (images) or IoU (shapes)
  flags.npy          uint8   [N]      0 = good; bit 1 = non-finite weights/loss; bit 2 = quality
                                      under the floor. Flagged fields are kept for inspection
                                      but excluded by ``good()`` (and so by later stages).
  shared_init.npy    float32 [P]      the shared initialisation (init mode 'shared' only)
  prototypes.npz     fit.prototypes > 0: the prototype fields (weights [K, P], quality, labels [K]: their
                     class, means: the k-means mean each was fitted to, of_field [N]: the prototype
                     every field started from); `prototypes` reads it
  summary.json       headline figures; written last: its presence marks the dataset complete.

While fitting, finished chunks live in ``chunks/chunk_XXXXX.npz`` (each written atomically);
they are merged into the files above when the last chunk is done.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nfjax.errors import DataError
from nfjax.io import files

FORMAT = 'nfjax.fields/v2'   # v2: meta.json names its `modality` (v1: `kind`)
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


  @property
  def modality(self) -> str:
    return str(self.meta['modality'])


def chunk_path(directory: str, chunk: int) -> str:
  return files.join(directory, 'chunks', f'chunk_{chunk:05d}.npz')


def finished_chunks(directory: str) -> set[int]:
  return {int(files.basename(p)[len('chunk_'):-len('.npz')])
          for p in files.glob(files.join(directory, 'chunks', 'chunk_*.npz'))}


def write_chunk(directory: str, chunk: int, **arrays: np.ndarray) -> None:
  files.write_npz(chunk_path(directory, chunk), **arrays)


def read_chunk(directory: str, chunk: int) -> dict[str, np.ndarray]:
  return files.read_npz(chunk_path(directory, chunk))


def remove_chunks(directory: str) -> None:
  files.remove(files.join(directory, 'chunks'))


def write(directory: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """The dataset's .npy files and meta.json (the stage writes summary.json last)."""
  for k in ARRAYS:
    files.write_npy(files.join(directory, f'{k}.npy'), arrays[k])
  files.write_json(files.join(directory, 'meta.json'), {'format': FORMAT, **meta})


PROTOTYPES = 'prototypes.npz'


def prototypes(directory: str) -> dict[str, np.ndarray] | None:
  """fields/prototypes.npz (fit.prototypes > 0), or None when the fields were started without prototypes."""
  path = files.join(directory, PROTOTYPES)
  return files.read_npz(path) if files.exists(path) else None


def is_complete(directory: str) -> bool:
  return files.exists(files.join(directory, 'summary.json'))


def load(directory: str, mmap: bool = False) -> FieldDataset:
  """Read a finished weight dataset (numpy only). DataError when it is missing or incomplete."""
  if not files.isdir(directory):
    raise DataError(f"no weight dataset at {directory}: run the fit stage first")
  if not is_complete(directory):
    raise DataError(
        f"the weight dataset at {directory} is incomplete (no summary.json): the fit stage was "
        f"interrupted; re-run it with the same command to finish it")
  meta = files.read_json(files.join(directory, 'meta.json'))
  if meta.get('format') != FORMAT or 'modality' not in meta:
    raise DataError(f"{directory}/meta.json has format {meta.get('format')!r} (expected {FORMAT!r} with a "
                    f"'modality'): it was written by an older nfjax; fit again into a new --workdir")
  arrays = {k: files.read_npy(files.join(directory, f'{k}.npy'), mmap=mmap) for k in ARRAYS}
  init_path = files.join(directory, 'shared_init.npy')
  shared = files.read_npy(init_path) if files.exists(init_path) else None
  n, p = arrays['weights'].shape
  if p != meta['params_per_field'] or n != meta['num_fields']:
    raise DataError(f"{directory}: weights.npy is [{n}, {p}] but meta.json says "
                    f"[{meta['num_fields']}, {meta['params_per_field']}]")
  return FieldDataset(meta=meta, shared_init=shared, **arrays)
