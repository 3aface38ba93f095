r"""The whole pipeline on 2 processes vs 1 process with the same devices: identical artifacts? wall times.

  python benchmarks/multiprocess_pipeline.py [--preset=smoke] [--devices=4] [--pairs=1] [-- --config.KEY=V ...]

Both runs are fresh launcher processes into fresh workdirs with the same config and the same mesh
(data = devices / 2, fsdp = 2): `launch/local.sh --num_processes=2 --devices_per_process=D/2`
(coordinator and gloo CPU collectives on 127.0.0.1) against `python -m nfjax.main` on D CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D, as local.sh sets D/2 in each process).
It compares fields/weights.npy, tokens/tokens.npy and every setting's sampled tokens byte for byte,
the train losses (max relative difference) and the evaluation's headline, and prints one JSON
object on the last line. On one machine the 2-process run shares its cores between two processes
and pays for the cross-process collectives (gloo over TCP): this measures the overhead of the
multi-process code path, not the speed-up of a pod, whose hosts each bring their own chips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(cmd: list[str], log: str, devices: int | None = None) -> float:
  t0 = time.perf_counter()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS' and not k.startswith('JAX_COORDINATOR')}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  if devices:   # every stage on these CPU devices (local.sh sets the same flag in each process)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  with open(log, 'w') as f:
    p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  if p.returncode != 0:
    with open(log) as f:
      sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {p.returncode}):\n{f.read()[-3000:]}")
  return time.perf_counter() - t0


def _losses(workdir: str) -> dict:
  with open(os.path.join(workdir, 'transformer', 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def _same(a: str, b: str, *rel) -> bool:
  return bool(np.array_equal(np.load(os.path.join(a, *rel)), np.load(os.path.join(b, *rel))))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='smoke')
  ap.add_argument('--devices', type=int, default=4, help='devices in all (an even number)')
  ap.add_argument('--pairs', type=int, default=1, help='runs of each, alternately')
  ap.add_argument('overrides', nargs='*', help='launcher flags after --, e.g. --config.train.steps=20')
  args = ap.parse_args()
  d = args.devices
  flags = [f'--config=mnist:{args.preset}', '--config.mesh.data=' + str(d // 2), '--config.mesh.fsdp=2',
           '--config.mesh.model=1', *args.overrides]
  tmp = tempfile.mkdtemp(prefix='nfjax-mp-bench-')
  one, two = [], []
  for i in range(args.pairs):
    wd1, wd2 = os.path.join(tmp, f'one_{i}'), os.path.join(tmp, f'two_{i}')
    one.append(_launch([sys.executable, '-m', 'nfjax.main', f'--workdir={wd1}', *flags],
                       os.path.join(tmp, f'one_{i}.log'), devices=d))
    two.append(_launch(['bash', os.path.join(ROOT, 'launch', 'local.sh'), '--num_processes=2',
                        f'--devices_per_process={d // 2}', f'--python={sys.executable}',
                        f'--log_dir={os.path.join(tmp, f"logs_{i}")}', '--', f'--workdir={wd2}', *flags],
                       os.path.join(tmp, f'two_{i}.log')))
  wd1, wd2 = os.path.join(tmp, 'one_0'), os.path.join(tmp, 'two_0')
  with open(os.path.join(wd1, 'samples', 'settings.json')) as f:
    settings = [s['name'] for s in json.load(f)['settings']]
  la, lb = _losses(wd1), _losses(wd2)
  with open(os.path.join(wd1, 'eval', 'summary.json')) as f:
    ea = json.load(f)
  with open(os.path.join(wd2, 'eval', 'summary.json')) as f:
    eb = json.load(f)
  import jax
  out = {
      'benchmark': 'multiprocess_pipeline', 'preset': args.preset, 'overrides': args.overrides, 'devices': d,
      'one_process_seconds': one, 'two_processes_seconds': two,
      'ratio_two_over_one': float(np.median(two) / np.median(one)),
      'identical_weights': _same(wd1, wd2, 'fields', 'weights.npy'),
      'identical_tokens': _same(wd1, wd2, 'tokens', 'tokens.npy'),
      'identical_samples': all(_same(wd1, wd2, 'samples', s, 'tokens.npy') for s in settings),
      'logged_losses': len(la), 'train_loss_max_rel_diff': float(max(abs(lb[k] - la[k]) / abs(la[k]) for k in la))
      if sorted(la) == sorted(lb) else None,
      'headline_one': {k: ea.get(k) for k in ('headline_setting', 'class_accuracy')},
      'headline_two': {k: eb.get(k) for k in ('headline_setting', 'class_accuracy')},
      'machine': f"{platform.machine()} {os.cpu_count()} cpus", 'jax': jax.__version__, 'workdirs': tmp,
  }
  print(json.dumps(out))


if __name__ == '__main__':
  main()
