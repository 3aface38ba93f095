r"""Meshing speed: grid evaluation (`meshing.eval_grid`) and marching cubes at 256^3, one field and
a batch of fields, for NeF-GPT's and HyperDiffusion's 3D fields.

  python benchmarks/meshing.py [--resolution=256] [--batch=16] [--fields=nefgpt,hyperdiffusion]

Fields: NeF-GPT's (PE 1,2 + input, 4 x 32 GELU, tanh, no output bias: 3,712 params) and
HyperDiffusion's (PE 1,2,4,8 + input, 3 x 128 ReLU, logits: 36,737 params), weights from the
PyTorch default init (speed does not depend on the weights). Random fields do not have a shape's
surface, so each field is meshed at the median of its own volume: a surface always exists and is
usually larger than a real shape's (faces are reported), so marching-cubes times are conservative.
Grid times exclude compilation (reported separately) and include the copy to host memory.
Marching cubes runs on the host CPU (scikit-image). Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from nfjax.fields import meshing, mlp  # noqa: E402

FIELDS = {
    'nefgpt': mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0), include_input=True, hidden=(32, 32, 32, 32),
                            activation='gelu', output_bias=False, output_activation='tanh', use_pi=False,
                            init='torch_default'),
    'hyperdiffusion': mlp.FieldSpec(in_dims=3, freqs=(1.0, 2.0, 4.0, 8.0), include_input=True,
                                    hidden=(128, 128, 128), activation='relu', init='torch_default'),
}


def _mc(volumes):
  levels = [float(np.median(v)) for v in volumes]       # not timed
  t = time.perf_counter()
  faces = []
  for v, level in zip(volumes, levels):
    _, f = meshing.marching_cubes(v, level, 'above')
    faces.append(len(f))
  return time.perf_counter() - t, faces


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--resolution', type=int, default=256)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--fields', default='nefgpt,hyperdiffusion')
  ap.add_argument('--chunk', type=int, default=0, help='points per inner step (0: automatic)')
  args = ap.parse_args()
  r, b = args.resolution, args.batch
  chunk = args.chunk or None
  dev = jax.devices()[0]
  result = {'resolution': r, 'points_per_field': r ** 3, 'batch': b, 'device_kind': dev.device_kind,
            'platform': dev.platform, 'num_devices': jax.device_count(), 'host_cpus': os.cpu_count(),
            'jax': jax.__version__}
  for name in args.fields.split(','):
    spec = FIELDS[name]
    keys = jax.random.split(jax.random.PRNGKey(0), b)
    w = np.stack([np.asarray(mlp.flatten(spec, mlp.init(spec, k))) for k in keys])
    res = {'params': spec.num_params}
    for label, n in (('one', 1), ('batch', b)):
      t = time.perf_counter()
      meshing.eval_grid(spec, w[:n], r, batch=n, chunk=chunk)
      res[f'{label}_compile_and_first_seconds'] = time.perf_counter() - t
      t = time.perf_counter()
      vols = meshing.eval_grid(spec, w[:n], r, batch=n, chunk=chunk)
      grid_s = time.perf_counter() - t
      mc_s, faces = _mc(vols)
      del vols
      res[f'{label}_grid_seconds'] = grid_s
      res[f'{label}_marching_cubes_seconds'] = mc_s
      res[f'{label}_total_seconds'] = grid_s + mc_s
      res[f'{label}_seconds_per_field'] = (grid_s + mc_s) / n
      res[f'{label}_grid_points_per_sec'] = n * r ** 3 / grid_s
      res[f'{label}_faces_mean'] = float(np.mean(faces))
      print(f"{name} x{n}: grid {grid_s:.2f}s, marching cubes {mc_s:.2f}s, "
            f"{np.mean(faces):.0f} faces/mesh", flush=True)
    result[name] = res
  print(json.dumps(result))


if __name__ == '__main__':
  main()
