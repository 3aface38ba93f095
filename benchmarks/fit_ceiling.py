r"""How far a point field's fit is from its own matrix products: the ceiling of any reformulation.

  python benchmarks/fit_ceiling.py [--field=hyperdiffusion|nefgpt3d] [--steps=200 --reps=5]

One field per CPU device (every device the launcher makes of the CPU, one per core: how the
`blocked` fit runs a shape field there), timed alternately in the same run, `--reps` rounds, best
round kept:

* reference: nfjax's per-field point fit, `nfjax.fields.fitting.fit_points` (what the `vmap`
  formulation runs for each field; `blocked` now runs `stacked.fit_point_field`, the same fit with
  its backward written out): every step draws its points, encodes them, runs the MLP forward and
  backward and the Adam update.
* products_only: the same step's matrix products and nothing else (each layer's forward product,
  its weight gradient and, above the first layer, its input gradient, at the same shapes), chained
  so that none can be skipped. No formulation that keeps these products (any regrouping of the same
  FLOPs) can run faster than this on the same devices.

`reference_fraction_of_ceiling` = products_only seconds / reference seconds: the share of the
reference's time that is matrix products. 1 / that is the most any faster formulation of the same
products could gain over the reference. FLOPs: 3 x the forward products, as fit_throughput.py.
Prints progress, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import fit_throughput  # noqa: E402
from nfjax import sharding  # noqa: E402
from nfjax.fields import fitting, mlp  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--field', choices=('nefgpt3d', 'hyperdiffusion'), default='hyperdiffusion')
  ap.add_argument('--steps', type=int, default=200)
  ap.add_argument('--points', type=int, default=20000, help='points per shape the steps draw from')
  ap.add_argument('--reps', type=int, default=5, help='alternating rounds; the best of each is kept')
  ap.add_argument('--cpu_devices', type=int, default=0, help="as the launcher's --cpu_devices (0 = one per core)")
  args = ap.parse_args()
  sharding.split_cpu(args.cpu_devices)  # before JAX starts its backends
  ns = argparse.Namespace(field=args.field, num_fields=1, points=args.points, heldout=0, points_per_step=-1,
                          steps=args.steps, lr=-1.0, shared_init_steps=0, chunk_size=1, block_fields=1,
                          matmul_precision='highest')
  config = fit_throughput._shape_config(ns)
  spec = mlp.FieldSpec.from_config(config.field)
  per_step = int(config.fit.points_per_step)
  devices = jax.devices()
  nd = len(devices)
  mesh = Mesh(np.array(devices), ('fields',))
  rng = np.random.default_rng(0)
  coords = jnp.asarray(rng.uniform(-0.5, 0.5, (nd, args.points, spec.in_dims)), jnp.float32)
  values = (jnp.linalg.norm(coords, axis=-1) < 0.3).astype(jnp.float32)  # a sphere per device
  if config.fit.loss != 'bce':
    values = 1.0 - 2.0 * values  # NeF-GPT's +-1 labels
  one = mlp.init(spec, jax.random.key(0))
  params = mlp.stack(one, nd)
  keys = jax.random.split(jax.random.key(1), nd)

  def reference(p, c, v, k):
    return fitting.fit_points(spec, config.fit, args.steps, p, c, v, k, per_step)[0]

  def products_only(p, c, v, k):
    del v, k
    x0 = mlp.encode(spec, c[:per_step])

    def body(ws, step):
      acts = [x0 + step.astype(jnp.float32) * 1e-9]
      for w in ws:
        acts.append(acts[-1] @ w.T)
      g = acts[-1]
      grads = [None] * len(ws)
      for i in range(len(ws) - 1, -1, -1):
        grads[i] = g.T @ acts[i]
        if i:
          g = g @ ws[i]
      return [w - 1e-9 * gw for w, gw in zip(ws, grads)], None

    ws, _ = jax.lax.scan(body, [layer['weight'] for layer in p], jnp.arange(args.steps))
    return [dict(layer, weight=w) for layer, w in zip(p, ws)]

  def compiled(fn):
    per_device = jax.shard_map(lambda p, c, v, k: jax.vmap(fn)(p, c, v, k), mesh=mesh,
                               in_specs=(P('fields'),) * 4, out_specs=P('fields'))
    return jax.jit(per_device)

  fns = {'reference': compiled(reference), 'products_only': compiled(products_only)}
  for f in fns.values():
    jax.block_until_ready(f(params, coords, values, keys))
  best = dict.fromkeys(fns, float('inf'))
  for r in range(args.reps):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, coords, values, keys))
      best[name] = min(best[name], time.perf_counter() - t0)
    print(f"  round {r + 1}/{args.reps}: " + ', '.join(f'{k} {v:.3f} s' for k, v in best.items()), flush=True)
  flops = 3 * 2 * per_step * sum(o * i for o, i, _ in spec.layer_dims) * args.steps * nd
  result = {
      'field': args.field, 'params_per_field': spec.num_params, 'steps': args.steps, 'points_per_step': per_step,
      'num_devices': nd, 'fields_per_call': nd,
      'reference_fields_per_sec': nd / best['reference'],
      'products_only_fields_per_sec': nd / best['products_only'],
      'reference_gflops': flops / best['reference'] / 1e9,
      'products_only_gflops': flops / best['products_only'] / 1e9,
      'reference_fraction_of_ceiling': best['products_only'] / best['reference'],
      'ceiling_speedup_over_reference': best['reference'] / best['products_only'],
      'device_kind': devices[0].device_kind, 'jax': jax.__version__,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
