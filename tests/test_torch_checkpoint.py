"""nfjax.utils.torch_checkpoint: torch.save files read without torch.

The fixtures under tests/data/ were written by tests/data/make_torch_fixtures.py (dev-only, needs
torch); these tests never import torch.
"""

from __future__ import annotations

import os
import collections
import pickle
import struct
import zipfile

import numpy as np
import pytest

from nfjax.errors import DataError
from nfjax.utils import torch_checkpoint

DATA = os.path.join(os.path.dirname(__file__), 'data')
ZIP = os.path.join(DATA, 'torch_ckpt_zip.pth')
LEGACY = os.path.join(DATA, 'torch_ckpt_legacy.pth')
DATAPARALLEL = os.path.join(DATA, 'torch_ckpt_dataparallel.pth')
EXPECTED = os.path.join(DATA, 'torch_ckpt_expected.npz')

_LEGACY_HEADER = b''.join(pickle.dumps(x, protocol=2) for x in (
    0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001, 'little_endian': True}))


def _expected() -> dict[str, np.ndarray]:
  with np.load(EXPECTED, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _assert_same(got: np.ndarray, want: np.ndarray, name: str) -> None:
  assert isinstance(got, np.ndarray), name
  assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize('path', [ZIP, LEGACY], ids=['zip', 'legacy'])
def test_load_matches_torch(path):
  obj = torch_checkpoint.load(path)
  assert obj['epoch'] == 3
  assert isinstance(obj['instance_acc'], np.float64) and obj['instance_acc'] == np.float64(0.9)
  sd = obj['model_state_dict']
  expected = _expected()
  model_keys = [k for k in expected if not k.startswith('optimizer.')]
  assert list(sd) == model_keys  # OrderedDict order kept
  for k in model_keys:
    _assert_same(sd[k], expected[k], k)
    assert sd[k].flags.c_contiguous and sd[k].flags.writeable, k
  # Views share storage in the file, not memory in the result.
  _assert_same(sd['base_t'], sd['base'].T, 'base_t')
  _assert_same(sd['base_slice'], sd['base'][1:3, 2:], 'base_slice')
  sd['base'][0, 0] = 123.0
  assert sd['base_t'][0, 0] != 123.0
  assert sd['bf16'].dtype == np.float32  # NumPy has no bfloat16
  assert sd['bn.num_batches_tracked'].dtype == np.int64 and sd['bn.num_batches_tracked'] == 7

  opt = obj['optimizer_state_dict']
  _assert_same(opt['state'][0]['exp_avg'], expected['optimizer.exp_avg'], 'exp_avg')
  _assert_same(opt['state'][0]['step'], expected['optimizer.step'], 'step')
  group = opt['param_groups'][0]
  assert group['lr'] == 1e-3 and group['betas'] == (0.9, 0.999) and group['params'] == [0]

  extras = obj['extras']
  assert extras['size'] == (2, 3)
  assert extras['dtype'] == torch_checkpoint.TorchDtype('float16')
  assert extras['device'] == 'cpu'
  assert extras['set'] == {1, 2} and extras['bytes'] == b'ab' and extras['tuple'] == (1, 'a', None)
  _assert_same(extras['np_array'], np.arange(3, dtype=np.int32), 'np_array')


def test_state_dict_picks_model_state_dict():
  obj = torch_checkpoint.load(ZIP)
  sd = torch_checkpoint.state_dict(obj)
  assert type(sd) is dict
  expected = _expected()
  assert list(sd) == [k for k in expected if not k.startswith('optimizer.')]
  for k, v in sd.items():
    _assert_same(v, expected[k], k)
  # A bare state dict is taken as it is.
  assert list(torch_checkpoint.state_dict(obj['model_state_dict'])) == list(sd)


def test_state_dict_strips_dataparallel_prefix():
  obj = torch_checkpoint.load(DATAPARALLEL)
  assert all(k.startswith('module.') for k in obj['model_state_dict'])
  sd = torch_checkpoint.state_dict(obj)
  assert list(sd) == ['conv.weight', 'conv.bias', 'bn.num_batches_tracked']
  expected = _expected()
  for k, v in sd.items():
    _assert_same(v, expected[k], k)


def test_state_dict_drops_non_arrays_and_explains_missing():
  a = np.zeros(2, np.float32)
  assert list(torch_checkpoint.state_dict({'sd': {'w': a, 'note': 'x'}}, key='sd')) == ['w']
  with pytest.raises(DataError, match=r"'model_state_dict'.*\['epoch', 'net'\]"):
    torch_checkpoint.state_dict({'epoch': 1, 'net': {'w': a}})
  with pytest.raises(DataError, match='list'):
    torch_checkpoint.state_dict([a])
  with pytest.raises(DataError, match='twice'):
    torch_checkpoint.state_dict({'w': a, 'module.w': a})


def _evil_pickle(marker: str, module: bytes = b'os', name: bytes = b'system') -> bytes:
  # Protocol 2: GLOBAL module.name, a one-string tuple, REDUCE -- module.name(f'touch {marker}').
  cmd = f'touch {marker}'.encode()
  return (b'\x80\x02c' + module + b'\n' + name + b'\n' + b'X' + struct.pack('<I', len(cmd)) + cmd
          + b'\x85R.')


@pytest.mark.parametrize('kind', ['zip', 'legacy', 'plain_pickle'])
def test_forbidden_global_is_refused_not_run(tmp_path, kind):
  marker = tmp_path / 'pwned'
  evil = _evil_pickle(str(marker))
  path = tmp_path / 'evil.pth'
  if kind == 'zip':
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('evil/data.pkl', evil)
      z.writestr('evil/byteorder', 'little')
  elif kind == 'legacy':
    path.write_bytes(_LEGACY_HEADER + evil + pickle.dumps([], protocol=2))
  else:
    path.write_bytes(evil)
  with pytest.raises(DataError, match='os.system') as e:
    torch_checkpoint.load(path)
  assert str(path) in str(e.value)
  assert not marker.exists()


def test_shared_allow_list_objects_cannot_be_changed(tmp_path):
  """BUILD on an allow-listed object (shared by every load) is refused: a crafted file must not
  change how a later, legitimate file decodes. Here: torch.float32 renamed to int8."""
  # GLOBAL torch.float32, EMPTY_DICT, 'name' -> 'int8' SETITEM, BUILD, STOP.
  evil = b'\x80\x02ctorch\nfloat32\n}X\x04\x00\x00\x00nameX\x04\x00\x00\x00int8sb.'
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('evil/data.pkl', evil)
    z.writestr('evil/byteorder', 'little')
  with pytest.raises(DataError, match='shared object'):
    torch_checkpoint.load(path)
  assert torch_checkpoint._ALLOWED[('torch', 'float32')].name == 'float32'
  with pytest.raises(TypeError):
    torch_checkpoint._ALLOWED[('os', 'system')] = print   # the allow-list itself is read-only
  # A legitimate BUILD on a fresh object (an OrderedDict's _metadata, as torch writes) still works.
  ok = b'\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01s}X\x09\x00\x00\x00_metadataK\x02s\x86b.'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('ok/data.pkl', ok)
    z.writestr('ok/byteorder', 'little')
  out = torch_checkpoint.load(path)
  assert isinstance(out, collections.OrderedDict) and out.a == 1 and out._metadata == 2


def test_pickled_module_is_refused(tmp_path):
  path = tmp_path / 'model.pth'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('model/data.pkl', _evil_pickle('x', b'torch.nn.modules.conv', b'Conv2d'))
  with pytest.raises(DataError, match=r'torch\.nn\.modules\.conv\.Conv2d.*state dict'):
    torch_checkpoint.load(path)


@pytest.mark.parametrize('src', [ZIP, LEGACY], ids=['zip', 'legacy'])
def test_truncated_file(tmp_path, src):
  raw = open(src, 'rb').read()
  path = tmp_path / 'cut.pth'
  for cut in [len(raw) // 2, len(raw) - 1, *range(1, len(raw), 97)]:
    path.write_bytes(raw[:cut])
    with pytest.raises(DataError) as e:
      torch_checkpoint.load(path)
    assert str(path) in str(e.value), cut


def test_truncated_file_messages(tmp_path):
  path = tmp_path / 'cut.pth'
  path.write_bytes(open(ZIP, 'rb').read()[:-100])
  with pytest.raises(DataError, match='truncated or corrupt'):
    torch_checkpoint.load(path)
  path.write_bytes(open(LEGACY, 'rb').read()[:-3])
  with pytest.raises(DataError, match='truncated'):
    torch_checkpoint.load(path)


def test_random_bytes_and_foreign_files(tmp_path):
  path = tmp_path / 'random.pth'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(DataError, match='not a PyTorch checkpoint') as e:
    torch_checkpoint.load(path)
  assert str(path) in str(e.value)
  npz = tmp_path / 'weights.npz'
  np.savez(npz, a=np.zeros(3))
  with pytest.raises(DataError, match='data.pkl') as e:
    torch_checkpoint.load(npz)
  assert str(npz) in str(e.value)
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  with pytest.raises(DataError, match='not a PyTorch checkpoint'):
    torch_checkpoint.load(empty)


def test_missing_path(tmp_path):
  path = tmp_path / 'nope' / 'best_model.pth'
  with pytest.raises(DataError, match='not found') as e:
    torch_checkpoint.load(str(path))
  assert str(path) in str(e.value)
  with pytest.raises(DataError, match='directory'):
    torch_checkpoint.load(tmp_path)


def _str(s: str) -> bytes:
  return b'X' + struct.pack('<I', len(s)) + s.encode()


def _tensor_checkpoint(path, size, stride, offset, storage: np.ndarray) -> None:
  """A zip checkpoint holding one float32 tensor with the given geometry, pickled by hand."""
  ints = lambda xs: b'(' + b''.join(b'K' + bytes([x]) for x in xs) + b't'
  pkl = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n('
         + b'(' + _str('storage') + b'ctorch\nFloatStorage\n' + _str('0') + _str('cpu')
         + b'K' + bytes([storage.size]) + b'tQ'
         + b'K' + bytes([offset]) + ints(size) + ints(stride)
         + b'\x89ccollections\nOrderedDict\n)RtR.')
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('t/data.pkl', pkl)
    z.writestr('t/data/0', storage.astype('<f4').tobytes())


def test_strides_and_storage_bounds(tmp_path):
  storage = np.arange(6, dtype=np.float32)
  path = tmp_path / 't.pth'
  _tensor_checkpoint(path, (2, 2), (1, 3), 1, storage)
  _assert_same(torch_checkpoint.load(path), np.array([[1, 4], [2, 5]], np.float32), 'strided')
  _tensor_checkpoint(path, (2, 2), (0, 1), 4, storage)  # stride 0 (an expanded tensor)
  _assert_same(torch_checkpoint.load(path), np.array([[4, 5], [4, 5]], np.float32), 'expanded')
  _tensor_checkpoint(path, (0, 3), (3, 1), 0, storage)
  _assert_same(torch_checkpoint.load(path), np.zeros((0, 3), np.float32), 'empty')
  # Geometry that runs past the storage must fail, never read other memory.
  _tensor_checkpoint(path, (2, 3), (3, 1), 1, storage)
  with pytest.raises(DataError, match='runs past the end') as e:
    torch_checkpoint.load(path)
  assert str(path) in str(e.value)


def test_does_not_import_torch(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` would now raise ImportError
  assert torch_checkpoint.load(ZIP)['epoch'] == 3
  assert torch_checkpoint.load(LEGACY)['epoch'] == 3
