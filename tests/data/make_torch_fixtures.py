"""Dev-only: writes the PyTorch checkpoint fixtures of tests/test_torch_checkpoint.py.

Needs torch (not a dependency of nfjax, not installed in CI). The outputs are committed, so run
this only to change them:

    python tests/data/make_torch_fixtures.py

It writes, next to itself:
  torch_ckpt_zip.pth            torch.save default (zip) format
  torch_ckpt_legacy.pth         the same object, _use_new_zipfile_serialization=False
  torch_ckpt_dataparallel.pth   {'model_state_dict': ...} with DataParallel 'module.' names
  torch_ckpt_expected.npz       every state-dict tensor as torch sees it (bfloat16 as float32)
Written with torch 2.13.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch


def main() -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  torch.manual_seed(0)
  base = torch.randn(4, 5)
  sd = collections.OrderedDict()
  sd['conv.weight'] = torch.randn(4, 3, 1, 1)
  sd['conv.bias'] = torch.randn(4)
  sd['bn.running_mean'] = torch.randn(4)
  sd['bn.running_var'] = torch.rand(4) + 0.5
  sd['bn.num_batches_tracked'] = torch.tensor(7, dtype=torch.int64)
  sd['param'] = torch.nn.Parameter(torch.randn(3))
  sd['double'] = torch.randn(2, 3, dtype=torch.float64)
  sd['base'] = base
  sd['base_t'] = base.t()  # shares base's storage, strides (1, 5)
  sd['base_slice'] = base[1:3, 2:]  # shares base's storage, offset 7, strides (5, 1)
  sd['half'] = torch.randn(5).half()
  sd['mask'] = torch.tensor([True, False, True, True, False, False])
  sd['bf16'] = torch.randn(3).bfloat16()
  sd['uint16'] = torch.tensor([0, 1000, 65535], dtype=torch.uint16)  # a torch >= 2.3 dtype: _rebuild_tensor_v3
  sd['cplx_conj'] = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()  # conj bit set

  opt_param = torch.nn.Parameter(torch.randn(2))
  opt = torch.optim.Adam([opt_param], lr=1e-3)
  opt_param.sum().backward()
  opt.step()

  obj = {
      'epoch': 3,
      'instance_acc': np.float64(0.9),
      'model_state_dict': sd,
      'optimizer_state_dict': opt.state_dict(),
      'extras': {'size': torch.Size([2, 3]), 'dtype': torch.float16, 'device': torch.device('cpu'),
                 'set': {1, 2}, 'bytes': b'ab', 'tuple': (1, 'a', None),
                 'np_array': np.arange(3, dtype=np.int32)},
  }
  torch.save(obj, os.path.join(here, 'torch_ckpt_zip.pth'))
  torch.save(obj, os.path.join(here, 'torch_ckpt_legacy.pth'), _use_new_zipfile_serialization=False)
  dp = collections.OrderedDict(
      ('module.' + k, v) for k, v in sd.items() if k in ('conv.weight', 'conv.bias', 'bn.num_batches_tracked'))
  torch.save({'epoch': 1, 'model_state_dict': dp}, os.path.join(here, 'torch_ckpt_dataparallel.pth'))

  def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().resolve_conj()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

  expected = {k: as_numpy(v) for k, v in sd.items()}
  expected.update({'optimizer.exp_avg': as_numpy(opt.state_dict()['state'][0]['exp_avg']),
                   'optimizer.step': as_numpy(opt.state_dict()['state'][0]['step'])})
  np.savez(os.path.join(here, 'torch_ckpt_expected.npz'), **expected)
  for name in ('torch_ckpt_zip.pth', 'torch_ckpt_legacy.pth', 'torch_ckpt_dataparallel.pth',
               'torch_ckpt_expected.npz'):
    print(name, os.path.getsize(os.path.join(here, name)), 'bytes')


if __name__ == '__main__':
  main()
