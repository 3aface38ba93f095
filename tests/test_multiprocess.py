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

  if kind == 'fit':     # the fit stage itself (the launcher refuses it in multi-process runs)
    from nfjax import main as launcher
    from nfjax.stages import fit
    launcher.initialize_distributed('127.0.0.1:' + argv[0], NUM_PROCESSES, int(argv[1]))
    summary = fit.run(_fit_config(**MESH), argv[2])
    _report(out_path, {'summary': summary})
    jax.distributed.shutdown()
    return

  from absl import app
  from nfjax import main as launcher
  from nfjax.errors import NfjaxError
  summaries = {}
  run = launcher.run

  def run_and_keep(*args, **kwargs):   # main() prints summaries; keep them for the report
    summaries.update(run(*args, **kwargs))
    return summaries
  launcher.run = run_and_keep

  def main_and_report(args):
    launcher.main(args)
    refused = None
    try:  # stages that cannot run across processes must stop at once, with a message
      run(launcher._CONFIG.value, launcher._WORKDIR.value, 'fit,sample')
    except NfjaxError as e:
      refused = str(e)
    _report(out_path, {'summary': summaries.get('train'), 'refused': refused})
    jax.distributed.shutdown()

  app.run(main_and_report, argv=['nfjax.main', *argv])


def _report(out_path, extra):
  import jax
  info = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count()}
  with open(out_path, 'w') as f:
    json.dump({**info, **extra}, f)


def _fit_config(**kw):
  from conftest import load_config
  return load_config('smoke', **{'data.num_fields': 8, 'fit.steps': 5, 'fit.shared_init_steps': 5,
                                 'fit.shared_init_candidates': 1, 'fit.chunk_size': 8, **kw})


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


def run_processes(kind, tmp_path, argv_of):
  """Start NUM_PROCESSES children (argv_of(port, i) -> their arguments), wait (bounded), kill them
  on failure or timeout; returns their reports."""
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
    deadline = time.monotonic() + CHILD_TIMEOUT
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
  failed = [i for i, p in enumerate(procs) if p.returncode != 0 or not os.path.exists(outs[i])]
  if failed:
    tails = '\n'.join(f"--- process {i} (exit {procs[i].returncode}) ---\n"
                      + (tmp_path / f'{kind}_{i}.log').read_text()[-3000:] for i in failed)
    raise AssertionError(f"{len(failed)} of {NUM_PROCESSES} processes failed"
                         + (f" or were killed after {CHILD_TIMEOUT}s" if timed_out else '') + f":\n{tails}")
  reports = []
  for path in outs:
    with open(path) as f:
      reports.append(json.load(f))
  return reports


def _logged(workdir, key):
  with open(os.path.join(workdir, 'transformer', 'metrics.jsonl')) as f:
    rows = [json.loads(ln) for ln in f]
  return {r['step']: r[key] for r in rows if key in r}


def _launcher_flags(workdir, overrides):
  return [f'--config=configs/mnist.py:smoke', f'--workdir={workdir}', '--stages=train',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


def test_two_processes_train_like_one(tmp_path):
  """8 steps of the smoke GPT through `nfjax.main --distributed`: 2 processes x 2 CPU devices ==
  1 process x 4 devices (losses, eval losses, the checkpoint); stages that cannot run across
  processes are refused."""
  from test_train import BASE, config, make_tokens
  from nfjax import checkpoint
  from nfjax.stages import train

  mp_wd, ref_wd = str(tmp_path / 'two_processes'), str(tmp_path / 'one_process')
  make_tokens(mp_wd)
  make_tokens(ref_wd)
  flags = _launcher_flags(mp_wd, {**BASE, **MESH})
  reports = run_processes('train', tmp_path, lambda port, i: [
      *flags, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={NUM_PROCESSES}', f'--process_id={i}'])
  for i, r in enumerate(reports):
    assert (r['process_index'], r['process_count']) == (i, NUM_PROCESSES)
    assert (r['device_count'], r['local_device_count']) == (NUM_PROCESSES * DEVICES_PER_PROCESS,
                                                           DEVICES_PER_PROCESS)
    assert r['summary']['num_devices'] == 4 and r['summary']['steps'] == 8
    assert 'fit, sample cannot run across 2 processes' in r['refused']
  assert reports[0]['summary']['train_loss'] == reports[1]['summary']['train_loss']
  with open(os.path.join(mp_wd, 'config.json')) as f:       # the launcher wrote it (process 0)
    assert json.load(f)['train']['steps'] == 8

  ref = train.run(config(**MESH), ref_wd)         # the same mesh on 4 of this process's devices
  assert ref['num_devices'] == 4
  a, b = _logged(ref_wd, 'loss'), _logged(mp_wd, 'loss')   # metrics.jsonl: written by process 0 only
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5)
  ea, eb = _logged(ref_wd, 'eval_loss'), _logged(mp_wd, 'eval_loss')
  assert sorted(ea) == sorted(eb) == [4, 8]
  np.testing.assert_allclose([eb[4], eb[8]], [ea[4], ea[8]], rtol=2e-5)
  # The checkpoint both processes wrote together (Orbax, one directory) restores on one device.
  pa, meta = checkpoint.load_params(os.path.join(ref_wd, 'transformer', 'checkpoints'))
  pb, meta_b = checkpoint.load_params(os.path.join(mp_wd, 'transformer', 'checkpoints'))
  assert meta_b['step'] == meta['step'] == 8
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=2e-5),
               pa, pb)


@pytest.mark.xfail(strict=True, reason="nfjax/fields/stack.py fetches the fitted stack with np.asarray, which "
                   "cannot read a jax.Array spread over other processes' devices; fit is single-process "
                   "until it gathers (e.g. multihost_utils.process_allgather). When this passes, remove "
                   "this mark and add 'fit' to nfjax.main.MULTI_PROCESS_STAGES.")
def test_two_processes_fit_like_one(tmp_path):
  from nfjax.stages import fit
  mp_wd, ref_wd = str(tmp_path / 'two_processes'), str(tmp_path / 'one_process')
  reports = run_processes('fit', tmp_path, lambda port, i: [str(port), str(i), mp_wd])
  ref = fit.run(_fit_config(**MESH), ref_wd)
  assert reports[0]['summary']['num_fields'] == ref['num_fields']
  np.testing.assert_allclose(np.load(os.path.join(mp_wd, 'fields', 'weights.npy')),
                             np.load(os.path.join(ref_wd, 'fields', 'weights.npy')), rtol=1e-4, atol=1e-5)


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
