"""Multi-process runs without a pod: two JAX processes on localhost, started the way launch/tpu.sh
starts one per TPU worker: `python -m nfjax.main ... --distributed`.

Each child runs the launcher's own `main()` with `--distributed --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=I` on CPU with 2 devices each, so the mesh (data 2 x fsdp 2) spans
both processes and every step's gradient reduction is a cross-process collective. jax 0.10.2 does
these on CPU with gloo over TCP (`jax_cpu_collectives_implementation`, default 'gloo'); the tests
skip, saying so, where the installed JAX has no CPU collectives.

Tolerances (2 processes x 2 devices vs 1 process x 4 devices, same mesh shape): per-step training
loss and eval loss rtol 2e-5; final parameters rtol 1e-4, atol 2e-5 (float32 reductions in a
different order; Adam turns that noise in near-zero gradients into ~1e-6 differences).

Robustness: loopback only (coordinator bound to 127.0.0.1; gloo bound to 127.0.0.1 too when the
host name resolves elsewhere), a free port, a bounded wait, children killed on failure or timeout,
their logs shown when they fail. ~60 s on 2 shared CPU cores.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
CHILD_TIMEOUT = 150         # seconds for both children together (they take ~30 s on 2 idle cores)
MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.model': 1}   # 4 devices: spans both processes


# ------------------------------------------------------------------------------------------------
# The children: `python tests/test_multiprocess.py KIND PORT ID N OUT -- LAUNCHER FLAGS`

def _child(kind, out_path, argv):
  sys.path[:0] = [ROOT, HERE]
  import jax
  from nfjax import sharding
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  sharding.cpu_collectives_on_loopback()   # before the CPU backend exists (created after initialize)

  from absl import app
  from nfjax import main as launcher
  summaries = {}
  run = launcher.run

  def run_and_keep(*args, **kwargs):   # main() prints summaries; keep them for the report
    summaries.update(run(*args, **kwargs))
    return summaries
  launcher.run = run_and_keep

  def main_and_report(args):
    t0 = time.perf_counter()
    launcher.main(args)
    _report(out_path, {'summaries': summaries, 'seconds': time.perf_counter() - t0})
    jax.distributed.shutdown()

  app.run(main_and_report, argv=['nfjax.main', *argv])


def _report(out_path, extra):
  import jax
  info = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count()}
  with open(out_path, 'w') as f:
    json.dump({**info, **extra}, f)


# ------------------------------------------------------------------------------------------------
# The parent

def _cpu_collectives_reason():
  """None if this JAX can run collectives across CPU processes, else why not."""
  import jax
  try:
    impl = jax.config.jax_cpu_collectives_implementation
  except AttributeError:
    return f"jax {jax.__version__} has no jax_cpu_collectives_implementation option"
  try:
    from jax._src.lib import _jax
  except ImportError:
    return f"jax {jax.__version__}: jaxlib extension not found"
  if impl != 'gloo' or not hasattr(_jax, 'make_gloo_tcp_collectives'):
    return f"jax {jax.__version__}: no gloo CPU collectives (implementation {impl!r})"
  return None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(kind, tmp_path, argv_of, timeout=CHILD_TIMEOUT, expect_failure=False):
  """Start NUM_PROCESSES children (argv_of(port, i) -> their arguments), wait (bounded), kill them
  on failure or timeout; returns their reports (expect_failure: [(exit code, log)] of each instead)."""
  reason = _cpu_collectives_reason()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COORDINATOR')}
  env.update({'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1',
              'JAX_COORDINATOR_BIND_ADDRESS': f'127.0.0.1:{port}',     # not [::]: loopback only
              'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}'})
  procs, logs, outs = [], [], []
  timed_out = False
  try:
    for i in range(NUM_PROCESSES):
      outs.append(str(tmp_path / f'{kind}_{i}.json'))
      logs.append(open(tmp_path / f'{kind}_{i}.log', 'w'))
      procs.append(subprocess.Popen([sys.executable, __file__, kind, outs[-1], '--', *argv_of(port, i)],
                                    stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    deadline = time.monotonic() + timeout
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  if expect_failure and not timed_out:
    return [(p.returncode, (tmp_path / f'{kind}_{i}.log').read_text()) for i, p in enumerate(procs)]
  failed = [i for i, p in enumerate(procs) if p.returncode != 0 or not os.path.exists(outs[i])]
  if failed:
    tails = '\n'.join(f"--- process {i} (exit {procs[i].returncode}) ---\n"
                      + (tmp_path / f'{kind}_{i}.log').read_text()[-3000:] for i in failed)
    raise AssertionError(f"{len(failed)} of {NUM_PROCESSES} processes failed"
                         + (f" or were killed after {timeout}s" if timed_out else '') + f":\n{tails}")
  reports = []
  for path in outs:
    with open(path) as f:
      reports.append(json.load(f))
  return reports


def _logged(workdir, key):
  with open(os.path.join(workdir, 'transformer', 'metrics.jsonl')) as f:
    rows = [json.loads(ln) for ln in f]
  return {r['step']: r[key] for r in rows if key in r}


def _launcher_flags(workdir, overrides, stages='all'):
  return [f'--config=configs/mnist.py:smoke', f'--workdir={workdir}', f'--stages={stages}',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


# The smoke pipeline, a little smaller: 2 chunks of fields (each stack spans both processes), the
# 2 settings of 6 samples in batches of 4 (each process draws one of every setting's 2 batches).
PIPELINE = {'data.num_fields': 48, 'fit.chunk_size': 24, 'fit.steps': 40, 'train.steps': 8, 'train.log_every': 1,
            'train.eval_every': 4, 'train.checkpoint_every': 3, 'sample.num_samples': 6, 'sample.batch_size': 4}


def test_two_processes_pipeline_like_one(tmp_path):
  """The whole smoke pipeline through `nfjax.main --distributed` on 2 processes x 2 CPU devices ==
  1 process on 4 devices (the same mesh): identical fields/weights.npy, tokens/tokens.npy and sampled
  tokens; the same training losses (rtol 2e-5) and checkpoint (rtol 1e-4, atol 2e-5); the same
  evaluation within float noise. Only process 0 wrote the workdir."""
  from conftest import load_config
  from nfjax import checkpoint, main

  mp_wd, ref_wd = str(tmp_path / 'two_processes'), str(tmp_path / 'one_process')
  flags = _launcher_flags(mp_wd, {**PIPELINE, **MESH})
  reports = run_processes('pipeline', tmp_path, lambda port, i: [
      *flags, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={NUM_PROCESSES}', f'--process_id={i}'], timeout=420)
  for i, r in enumerate(reports):
    assert (r['process_index'], r['process_count']) == (i, NUM_PROCESSES)
    assert (r['device_count'], r['local_device_count']) == (NUM_PROCESSES * DEVICES_PER_PROCESS,
                                                           DEVICES_PER_PROCESS)
    assert sorted(r['summaries']) == ['evaluate', 'fit', 'sample', 'tokenize', 'train']
  mp = reports[0]['summaries']
  assert mp == reports[1]['summaries']             # every process returns process 0's results
  assert mp['fit']['num_devices'] == 4 and mp['train']['num_devices'] == 4 and mp['sample']['num_processes'] == 2
  with open(os.path.join(mp_wd, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 8
  assert not [n for n in os.listdir(mp_wd) if n.startswith('.processes')]   # the shared-workdir token is gone
  assert len(os.listdir(os.path.join(mp_wd, 'logs'))) == 1                  # one log file: process 0's

  ref = main.run(load_config('smoke', **PIPELINE, **MESH), ref_wd)   # 4 of this process's devices
  assert ref['fit']['num_devices'] == 4
  load = lambda wd, *p: np.load(os.path.join(wd, *p))
  for rel in (('fields', 'weights.npy'), ('fields', 'quality.npy'), ('tokens', 'tokens.npy')):
    np.testing.assert_array_equal(load(mp_wd, *rel), load(ref_wd, *rel), err_msg='/'.join(rel))
  a, b = _logged(ref_wd, 'loss'), _logged(mp_wd, 'loss')   # metrics.jsonl: written by process 0 only
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5)
  ea, eb = _logged(ref_wd, 'eval_loss'), _logged(mp_wd, 'eval_loss')
  assert sorted(ea) == sorted(eb) == [4, 8]
  np.testing.assert_allclose([eb[4], eb[8]], [ea[4], ea[8]], rtol=2e-5)
  pa, meta = checkpoint.load_params(os.path.join(ref_wd, 'transformer', 'checkpoints'))
  pb, meta_b = checkpoint.load_params(os.path.join(mp_wd, 'transformer', 'checkpoints'))
  assert meta_b['step'] == meta['step'] == 8
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=2e-5),
               pa, pb)
  for st in ref['sample']['settings']:   # each process drew some batches; per-sample keys: the same samples
    np.testing.assert_array_equal(load(mp_wd, 'samples', st['name'], 'tokens.npy'),
                                  load(ref_wd, 'samples', st['name'], 'tokens.npy'), err_msg=st['name'])
  # evaluate ran on process 0's 2 devices, the reference on 4: the same numbers up to float noise
  got, want = _numbers(mp['evaluate']['settings']), _numbers(ref['evaluate']['settings'])
  assert sorted(got) == sorted(want) and len(want) > 10
  for k in want:
    if not k.endswith('seconds'):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-6, err_msg=k)


def test_processes_that_do_not_share_the_workdir_stop_with_one_line(tmp_path):
  """Each process given its own directory (as separate hosts' local disks would be): every process
  stops before any work with the one line that says the workdir must be shared (exit 2)."""
  results = run_processes('pipeline', tmp_path, lambda port, i: [
      *_launcher_flags(str(tmp_path / f'disk_{i}' / 'wd'), MESH), '--distributed',
      f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={NUM_PROCESSES}', f'--process_id={i}'],
      expect_failure=True)
  for code, log in results:
    assert code == 2, log[-2000:]
    assert 'is not shared by the 2 processes: process(es) 1 cannot see what process 0 writes there' in log, log
    assert 'Traceback' not in log and '[fit]' not in log
  assert not (tmp_path / 'disk_1' / 'wd' / 'fields').exists()


def _numbers(tree, path='') -> dict:
  """{'a/b/0': number} of every number in a JSON tree."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f'{path}/{key}').items()}
  if isinstance(tree, list):
    return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f'{path}/{i}').items()}
  return {path: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


if __name__ == '__main__':
  _kind, _out, _sep, *_argv = sys.argv[1:]
  assert _sep == '--', sys.argv
  _child(_kind, _out, _argv)


def test_local_sh_runs_two_processes_and_a_sigterm_stops_them_at_one_agreed_step(smoke_fields, tmp_path):
  """launch/local.sh starts 2 launcher processes (train across them). SIGTERM to the
  script reaches both: JAX's preemption service makes them agree on a step, each saves the
  checkpoint of that step (no checkpoint period is due) and exits 143, and so does the script; the
  same command then resumes there and finishes."""
  import shutil
  import signal
  reason = _cpu_collectives_reason()
  if reason:
    pytest.skip(f"no multi-process CPU collectives: {reason}")
  workdir = tmp_path / 'wd'
  shutil.copytree(os.path.join(smoke_fields, 'fields'), workdir / 'fields')
  from conftest import load_config
  from nfjax import main
  main.run(load_config('smoke'), str(workdir), 'tokenize')   # in this process: the test is about train
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COORDINATOR') and k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT
  cmd = ['bash', os.path.join(ROOT, 'launch', 'local.sh'), f'--python={sys.executable}', '--grace=20',
         f'--log_dir={tmp_path / "logs"}', '--', '--config=mnist:smoke', f'--workdir={workdir}',
         '--stages=train', '--config.train.steps=12', '--config.train.checkpoint_every=1000',
         '--config.train.log_every=1']
  p = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       start_new_session=True)
  try:
    for line in p.stdout:   # process 0's log: wait until training runs
      if '[train] 3/12 steps' in line:
        break
    else:
      pytest.fail('local.sh ended before training started:\n' + ''.join(
          (tmp_path / 'logs' / f'process-{i}.log').read_text()[-2000:] for i in range(2)))
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=CHILD_TIMEOUT)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  logs = [(tmp_path / 'logs' / f'process-{i}.log').read_text() for i in range(2)]
  assert p.returncode == 143, out[-3000:] + logs[1][-2000:]
  stops = [re.search(r'nfjax: stopped: preempted \(SIGTERM\) during the train stage: step (\d+)/12 saved', log)
           for log in logs]
  assert all(stops), logs
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and 3 <= step < 12     # one step, agreed by both
  ckpts = os.listdir(workdir / 'transformer' / 'checkpoints')
  assert str(step) in ckpts
  p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=CHILD_TIMEOUT)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
  with open(workdir / 'transformer' / 'summary.json') as f:
    summary = json.load(f)
  assert summary['resumed_from'] == step and summary['steps'] == 12
