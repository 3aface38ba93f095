r"""FPD's PointNet++ feature extraction (`nfjax.evaluate.pointnet2`): clouds per second at
HyperDiffusion's batch of 10 (the baseline, in the same run) and at larger batches, and the cost
of FPD in an evaluation of HyperDiffusion's size (606 references + 667 generated clouds).

  python benchmarks/pointnet_fpd.py [--points=2048] [--clouds=128] [--batches=10,32,64]

Random weights of the checkpoint's shapes (speed does not depend on the weights) on random
shape_unit-like clouds. Times exclude compilation (reported separately) and include the copy of
the features to the host. Prints one JSON object on the last line.
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

from nfjax.evaluate import pointnet2  # noqa: E402

HD_BATCH = 10
HD_CLOUDS = 606 + 667


def _clouds(n: int, points: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(n, points, 3))
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  return (d * rng.uniform(0.6, 1.6, size=(n, 1, 3))).astype(np.float32)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--points', type=int, default=2048)
  ap.add_argument('--clouds', type=int, default=128)
  ap.add_argument('--batches', default='10,32,64')
  args = ap.parse_args()
  params = pointnet2.params_from_state_dict(pointnet2.random_state_dict(0))
  clouds = _clouds(args.clouds, args.points)
  rows = {}
  for b in sorted({HD_BATCH, *(int(x) for x in args.batches.split(','))}):
    t0 = time.perf_counter()
    pointnet2.features(params, clouds[:b], batch=b)          # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = pointnet2.features(params, clouds, batch=b)
    secs = time.perf_counter() - t0
    assert f.shape == (len(clouds), pointnet2.FEATURE_DIM) and np.isfinite(f).all()
    rows[str(b)] = {'clouds_per_s': len(clouds) / secs, 'seconds': secs, 'compile_s': compile_s}
    print(f"batch {b}: {len(clouds) / secs:.1f} clouds/s ({secs:.2f}s for {len(clouds)}), compile {compile_s:.1f}s",
          file=sys.stderr)
  base = rows[str(HD_BATCH)]['clouds_per_s']
  best = max(rows, key=lambda k: rows[k]['clouds_per_s'])
  out = {'benchmark': 'pointnet_fpd', 'points': args.points, 'clouds': args.clouds,
         'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
         'rows': rows, 'baseline_batch': HD_BATCH, 'best_batch': int(best),
         'speedup_vs_batch10': rows[best]['clouds_per_s'] / base,
         'hd_evaluation_seconds': HD_CLOUDS / rows[best]['clouds_per_s']}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
