"""Read PyTorch checkpoints (`torch.save` output, `.pth` / `.pt`) into NumPy arrays, without torch.

    obj = torch_checkpoint.load('best_model.pth')      # {'epoch': 3, 'model_state_dict': {...}, ...}
    sd = torch_checkpoint.state_dict(obj)             # {'conv.weight': np.ndarray, ...}

`load` returns the saved object with every tensor replaced by an `np.ndarray` (a copy, C-contiguous,
the tensor's dtype and shape; strides and storage offsets are honoured and tensors that share a
storage share its bytes on disk, not memory). `nn.Parameter`s come back as plain arrays (their
requires_grad and Python attributes are dropped). NumPy has no bfloat16 and no float8, so those
tensors come back as float32 (exact: every value is representable); float8 needs `ml_dtypes`
(installed with JAX). Tensors with the conj / neg view bits set come back resolved.

Both file formats that `torch.save` writes are read:

  zip (the default since torch 1.6)   an archive holding `<name>/data.pkl` (the pickled object, with
      each storage replaced by a persistent id ('storage', storage type, key, location, numel)),
      `<name>/data/<key>` (each storage's raw bytes) and `<name>/byteorder` ('little' when absent).
  legacy (`_use_new_zipfile_serialization=False`)   consecutive pickles: the magic number, the
      protocol version (1001), a sys_info dict, the object (persistent ids as above plus a view
      field), the list of storage keys; then for each key an 8-byte little-endian element count
      and that many elements, little-endian.

Loading never runs code from the file: the pickles are read by an unpickler that resolves only an
allow-list of globals and builds every tensor itself:

  torch._utils._rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
    _rebuild_parameter_with_state; torch._tensor._rebuild_from_type_v2 (a Tensor or Parameter
    carrying Python attributes; the attributes are dropped)
  the storage types torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool,ComplexFloat,
    ComplexDouble}Storage (also under torch.cuda) and torch.UntypedStorage
  torch dtypes (torch.float32, ...), which load as `TorchDtype`; torch.Size (-> tuple);
    torch.device (-> its string, e.g. 'cuda:0')
  collections.OrderedDict; builtins set, frozenset, complex, bytearray, slice, range, and the plain
    types; _codecs.encode for latin-1 / utf-8 only (how protocol-2 pickles spell bytes)
  numpy scalars and arrays: numpy.dtype, numpy.ndarray, numpy[._]core.multiarray.scalar and
    ._reconstruct, numpy[._]core.numeric._frombuffer

Any other global (a pickled nn.Module, a custom class, os.system, ...) fails with a DataError naming
it; so do a missing, truncated or foreign file. Quantized, sparse and sub-byte tensors are not
supported (their rebuild functions are not on the list).
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import io
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from nfjax.errors import DataError

try:
  from numpy._core import multiarray as _np_multiarray
  from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 1.26
  from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
  from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = ['TorchDtype', 'load', 'state_dict']

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _Malformed(Exception):
  """The file parses but says something impossible; load() adds the path."""


@dataclasses.dataclass(frozen=True)
class TorchDtype:
  """A `torch.dtype` object found in a checkpoint (outside a tensor), e.g. TorchDtype('float32')."""
  name: str


# torch dtype name -> (NumPy dtype the stored bytes are read as, conversion applied after reading).
def _bf16_to_f32(x: np.ndarray) -> np.ndarray:
  return (x.astype(np.uint32) << 16).view(np.float32)


def _ml_dtypes_to_f32(name: str) -> Callable[[np.ndarray], np.ndarray]:
  def convert(x: np.ndarray) -> np.ndarray:
    try:
      import ml_dtypes
      dt = np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError):
      raise _Malformed(f'a {name} tensor needs the ml_dtypes package (with {name}) to be read') from None
    return x.view(dt).astype(np.float32)
  return convert


_DTYPES: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]] = {
    'float32': ('f4', None), 'float64': ('f8', None), 'float16': ('f2', None),
    'bfloat16': ('u2', _bf16_to_f32),
    'int64': ('i8', None), 'int32': ('i4', None), 'int16': ('i2', None), 'int8': ('i1', None),
    'uint64': ('u8', None), 'uint32': ('u4', None), 'uint16': ('u2', None), 'uint8': ('u1', None),
    'bool': ('?', None), 'complex64': ('c8', None), 'complex128': ('c16', None),
    **{n: ('u1', _ml_dtypes_to_f32(n)) for n in (
        'float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz', 'float8_e8m0fnu')},
}

# Pickled storage class name -> torch dtype name. UntypedStorage counts bytes.
_STORAGE_TYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
    'UntypedStorage': 'uint8',
}

# Canonical torch dtype names (what `pickle` writes for torch.float32 etc.).
_TORCH_DTYPE_NAMES = frozenset(
    'bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 '
    'float32 float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz '
    'float8_e8m0fnu int1 int16 int2 int3 int32 int4 int5 int6 int64 int7 int8 qint32 qint8 '
    'quint2x4 quint4x2 quint8 uint1 uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 '
    'uint8'.split())


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: str  # torch dtype name


@dataclasses.dataclass
class _Storage:
  key: str
  dtype: str  # the dtype named by the storage type (uint8 for UntypedStorage)
  data: Any  # bytes-like, or None while scanning a legacy file
  big_endian: bool = False


class _TensorType:
  """torch.Tensor / torch.nn.Parameter, only as the type argument of _rebuild_from_type_v2."""


# ----------------------------------------------------------------------------------------------
# Tensor reconstruction


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None,
            metadata: Any = None) -> np.ndarray | None:
  if not isinstance(storage, _Storage):
    raise _Malformed(f'a tensor was rebuilt from {type(storage).__name__}, not from a storage')
  if storage.data is None:  # legacy scan pass: storages are not read yet
    return None
  dtype = storage.dtype if dtype is None else dtype
  if dtype not in _DTYPES:
    raise _Malformed(f'tensors of dtype torch.{dtype} are not supported')
  raw, convert = _DTYPES[dtype]
  dt = np.dtype(raw).newbyteorder('>' if storage.big_endian else '<')
  try:
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
  except (TypeError, ValueError):
    raise _Malformed(f'bad tensor geometry: size {size!r}, stride {stride!r}, offset {offset!r}') from None
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise _Malformed(f'bad tensor geometry: size {size}, stride {stride}, offset {offset}')
  n = len(storage.data) // dt.itemsize
  if 0 in size:
    out = np.empty(size, dt)
  else:
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= n:
      raise _Malformed(f'a tensor of size {size}, stride {stride} at offset {offset} runs past the '
                       f'end of storage {storage.key!r} ({n} elements of {dtype}): truncated file?')
    flat = np.frombuffer(storage.data, dtype=dt, count=n)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * dt.itemsize for st in stride), writeable=False)
    out = np.array(view, order='C')  # a copy: contiguous, writeable, off the file buffer
  out = out.astype(dt.newbyteorder('='), copy=False)
  if convert is not None:
    out = convert(out)
  if isinstance(metadata, Mapping):
    if metadata.get('neg'):
      out = -out
    if metadata.get('conj'):
      out = np.conj(out)
  return out


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks
  return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks
  if not isinstance(dtype, TorchDtype):
    raise _Malformed(f'_rebuild_tensor_v3 got dtype {dtype!r}')
  return _tensor(storage, storage_offset, size, stride, dtype=dtype.name, metadata=metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del state
  if new_type is not _TensorType:
    raise _Malformed(f'_rebuild_from_type_v2 with type {new_type!r}')
  return func(*args)


def _torch_size(dims=()):
  return tuple(dims)


def _torch_device(kind, index=None):
  return str(kind) if index is None else f'{kind}:{index}'


def _codecs_encode(obj, encoding='utf-8', errors='strict'):
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
    raise _Malformed(f'_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed')
  return obj.encode(encoding, errors)


_ALLOWED: Mapping[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _TensorType,
    ('torch._tensor', 'Tensor'): _TensorType,
    ('torch.nn.parameter', 'Parameter'): _TensorType,
    ('torch', 'Size'): _torch_size,
    ('torch', 'device'): _torch_device,
    ('torch.storage', 'UntypedStorage'): _StorageType('uint8'),
    ('_codecs', 'encode'): _codecs_encode,
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
    **{(m + '.multiarray', 'scalar'): _np_multiarray.scalar for m in ('numpy.core', 'numpy._core')},
    **{(m + '.multiarray', '_reconstruct'): _np_multiarray._reconstruct
       for m in ('numpy.core', 'numpy._core')},
    **{(m + '.numeric', '_frombuffer'): _np_numeric._frombuffer for m in ('numpy.core', 'numpy._core')},
    **{(m, n): _StorageType(d) for m in ('torch', 'torch.cuda') for n, d in _STORAGE_TYPES.items()},
    **{('torch', n): TorchDtype(n) for n in _TORCH_DTYPE_NAMES},
    **{(b, n): getattr(builtins, n) for b in ('builtins', '__builtin__') for n in (
        'set', 'frozenset', 'complex', 'bytearray', 'slice', 'range', 'list', 'tuple', 'dict',
        'int', 'float', 'str', 'bytes', 'bool')},
}


_ALLOWED = types.MappingProxyType(_ALLOWED)   # immutable: the allow-list is the same for every load
_SHARED = frozenset(id(v) for v in _ALLOWED.values())


class _Unpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler: its BUILD can be guarded
  """Resolves only `_ALLOWED` globals; persistent ids (storages) go to `storage`. BUILD (setting an
  object's state) is refused on the allow-listed objects themselves: they are shared by every load,
  and a crafted file must not change how a later, legitimate file decodes (e.g. a dtype's name)."""

  dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

  def load_build(self):
    if id(self.stack[-2]) in _SHARED:
      raise _Malformed(f'the checkpoint tries to change the state of the shared object {self.stack[-2]!r:.80}')
    return pickle._Unpickler.load_build(self)  # noqa: SLF001

  dispatch[pickle.BUILD[0]] = load_build

  def __init__(self, file: io.BytesIO, path: str,
               storage: Callable[[tuple], _Storage] | None = None):
    super().__init__(file)
    self._path = path
    self._storage = storage

  def find_class(self, module: str, name: str) -> Any:
    obj = _ALLOWED.get((module, name))
    if obj is None:
      raise DataError(
          f'{self._path}: the checkpoint references the Python global {module}.{name}, which nfjax '
          'does not load (only tensors, numpy scalars/arrays and plain containers are allowed; a '
          'pickled nn.Module or custom class must be re-saved as a state dict); nothing was executed')
    return obj

  def persistent_load(self, pid: Any) -> Any:
    if self._storage is None or not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise _Malformed(f'unexpected persistent id {pid!r:.200}')
    return self._storage(pid)


# ----------------------------------------------------------------------------------------------
# The two file formats


def _storage_args(pid: tuple) -> tuple[str, str, int, Any]:
  """('storage', type, key, location, numel[, view]) -> (key, dtype, numel, view)."""
  if len(pid) not in (5, 6) or not isinstance(pid[1], _StorageType):
    raise _Malformed(f'bad storage id {pid!r:.200}')
  _, stype, key, _, numel = pid[:5]
  if not isinstance(numel, int) or numel < 0:
    raise _Malformed(f'bad storage id {pid!r:.200}')
  return str(key), stype.dtype, numel, pid[5] if len(pid) == 6 else None


def _itemsize(dtype: str) -> int:
  return np.dtype(_DTYPES[dtype][0]).itemsize


def _load_zip(path: str, z: zipfile.ZipFile) -> Any:
  names = set(z.namelist())
  pkl = sorted(n for n in names
               if n == 'data.pkl' or (n.endswith('/data.pkl') and n.count('/') == 1))
  if len(pkl) != 1:
    raise _Malformed('a zip archive without (exactly one) <name>/data.pkl: not a torch.save file')
  prefix = pkl[0][:-len('data.pkl')]
  if any(n.startswith(prefix + 'code/') for n in names):
    raise _Malformed('a TorchScript archive (torch.jit.save), not a torch.save checkpoint')
  big = False
  if prefix + 'byteorder' in names:
    order = z.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if order not in ('little', 'big'):
      raise _Malformed(f'byteorder record says {order!r}')
    big = order == 'big'
  storages: dict[str, _Storage] = {}

  def storage(pid: tuple) -> _Storage:
    key, dtype, numel, _ = _storage_args(pid)
    if key not in storages:
      record = f'{prefix}data/{key}'
      if record not in names:
        raise _Malformed(f'storage record {record} is missing')
      data = z.read(record)
      if len(data) < numel * _itemsize(dtype):
        raise _Malformed(f'storage record {record} holds {len(data)} bytes, expected '
                         f'{numel * _itemsize(dtype)}: truncated file?')
      storages[key] = _Storage(key, dtype, data, big)
    s = storages[key]
    return s if s.dtype == dtype else dataclasses.replace(s, dtype=dtype)

  return _Unpickler(io.BytesIO(z.read(pkl[0])), path, storage).load()


def _load_legacy(path: str, raw: bytes) -> Any:
  f = io.BytesIO(raw)
  try:
    magic = _Unpickler(f, path).load()
  except DataError:
    raise
  except Exception:
    magic = None
  if not isinstance(magic, int) or magic != _LEGACY_MAGIC:
    if raw[257:262] == b'ustar':
      raise _Malformed('a tar-format checkpoint (PyTorch < 0.1.10) is not supported')
    raise _Malformed('not a PyTorch checkpoint: neither a torch.save zip archive nor a legacy '
                     'torch.save stream (no magic number)')
  version = _Unpickler(f, path).load()
  if version != _LEGACY_PROTOCOL:
    raise _Malformed(f'legacy checkpoint protocol version {version!r}, expected {_LEGACY_PROTOCOL}')
  sys_info = _Unpickler(f, path).load()
  if not isinstance(sys_info, dict):
    raise _Malformed('legacy checkpoint without its sys_info header')
  start = f.tell()

  # Pass 1: learn each storage's dtype (hence element size) from the object pickle; the storage
  # bytes come after it, so the tensors are built in pass 2.
  seen: dict[str, str] = {}

  def scan(pid: tuple) -> _Storage:
    key, dtype, _, view = _storage_args(pid)
    seen.setdefault(key, dtype)
    return _Storage(key, dtype, None)

  _Unpickler(f, path, scan).load()
  keys = _Unpickler(f, path).load()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise _Malformed('legacy checkpoint without its list of storage keys')
  data: dict[str, memoryview] = {}
  buf = memoryview(raw)
  pos = f.tell()
  for key in keys:
    if key not in seen:
      raise _Malformed(f'storage {key!r} is listed but never used')
    if pos + 8 > len(raw):
      raise _Malformed(f'file ends before storage {key!r}: truncated file?')
    (count,) = struct.unpack('<q', raw[pos:pos + 8])
    nbytes = count * _itemsize(seen[key])
    if count < 0 or pos + 8 + nbytes > len(raw):
      raise _Malformed(f'file ends inside storage {key!r} ({count} elements): truncated file?')
    data[key] = buf[pos + 8:pos + 8 + nbytes]
    pos += 8 + nbytes

  # Pass 2: the real object.
  views: dict[str, _Storage] = {}

  def storage(pid: tuple) -> _Storage:
    key, dtype, _, view = _storage_args(pid)
    if key not in data:
      raise _Malformed(f'storage {key!r} has no data in the file')
    s = _Storage(key, dtype, data[key])
    if view is not None:  # (view key, offset, size) in elements: storage views of torch < 0.4
      vkey, off, n = view
      size = _itemsize(seen[key])
      if vkey not in views:
        views[vkey] = _Storage(vkey, dtype, data[key][off * size:(off + n) * size])
      s = dataclasses.replace(views[vkey], dtype=dtype)
    return s

  f.seek(start)
  return _Unpickler(f, path, storage).load()


def load(path: str | os.PathLike) -> Any:
  """Read a `torch.save` file; tensors come back as np.ndarray (see the module docstring).

  Raises DataError naming the path when the file is missing, is not a torch checkpoint, is
  truncated or corrupt, or references a Python global outside the allow-list.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as fh:
      head = fh.read(4)
      fh.seek(0)
      if zipfile.is_zipfile(fh):
        with zipfile.ZipFile(fh) as z:
          return _load_zip(path, z)
      if head.startswith(b'PK\x03\x04'):
        raise _Malformed('a zip archive without its central directory: truncated or corrupt file')
      fh.seek(0)
      return _load_legacy(path, fh.read())
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f'{path}: PyTorch checkpoint not found') from None
  except IsADirectoryError:
    raise DataError(f'{path}: is a directory, not a PyTorch checkpoint file') from None
  except OSError as e:
    raise DataError(f'{path}: cannot read PyTorch checkpoint: {e}') from None
  except _Malformed as e:
    raise DataError(f'{path}: {e}') from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError,
          IndexError, AttributeError, struct.error, UnicodeDecodeError) as e:
    raise DataError(f'{path}: truncated or corrupt PyTorch checkpoint '
                    f'({type(e).__name__}: {str(e)[:200]})') from None


def state_dict(obj: Any, key: str = 'model_state_dict') -> dict[str, np.ndarray]:
  """The parameter dict of a loaded checkpoint: name -> array, 'module.' (DataParallel) stripped.

  Takes `obj[key]` when obj is a dict holding `key`, else obj itself when it is a non-empty dict
  of arrays. Entries that are not arrays (e.g. a module's `_extra_state`) are dropped; integer
  buffers such as BatchNorm's num_batches_tracked stay (as int64 arrays).
  """
  if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
    sd = obj[key]
  elif isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    sd = obj
  else:
    if isinstance(obj, Mapping):
      found = f'its top-level keys are {sorted(map(str, obj))[:50]}'
    else:
      found = f'it holds a {type(obj).__name__}, not a dict'
    raise DataError(f'no state dict in the checkpoint: expected a dict with key {key!r} or a dict '
                    f'of arrays; {found} (pass key= to pick another entry)')
  out: dict[str, np.ndarray] = {}
  for name, value in sd.items():
    if not isinstance(value, np.ndarray):
      continue
    name = str(name)
    if name.startswith('module.'):
      name = name[len('module.'):]
    if name in out:
      raise DataError(f'state dict names {name!r} twice once the "module." prefix is stripped')
    out[name] = value
  if not out:
    raise DataError(f'the checkpoint entry {key!r} holds no arrays')
  return out
