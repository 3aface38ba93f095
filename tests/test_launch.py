"""launch/: the TPU VM and GPU scripts, without a cloud, a TPU or a GPU.

Every test puts a recording stub `gcloud` first on PATH, so no test can reach the real one: the
--dry-run tests check that the stub was never called and read the commands the scripts print;
the failure tests run `tpu.sh all` for real against the stub to check the VM is deleted however
the run ends, and `create` against a stub VM that was preempted. tpu_worker_setup.sh runs twice
against a stub Python to check that the second run installs nothing. tpu_job.sh (what `tpu.sh run /
status / logs / stop` call on each worker) runs here for real with small shell jobs, also under
`tpu.sh run / status / logs` through a gcloud stand-in whose ssh runs the command in a fake worker
home. No network; ~30 s on 2 cores.
"""

import gzip
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ('tpu.sh', 'gpu.sh', 'lib.sh', 'tpu_worker_setup.sh', 'tpu_job.sh')

# Logs its arguments. The TPU VM (or queued resource) has its state in the file $GCLOUD_STATE (no
# file: it does not exist): `create` makes it READY (ACTIVE for a queued resource), `delete` removes
# it, `describe` fails when there is none and prints the state for a --format. The call whose
# arguments contain $GCLOUD_FAIL exits $GCLOUD_FAIL_CODE (7), the first $GCLOUD_FAIL_TIMES times
# (default: every time).
GCLOUD_STUB = r'''#!/usr/bin/env bash
printf '%s\n' "$*" >> "$GCLOUD_LOG"
if [[ -n ${GCLOUD_FAIL:-} && "$*" == *"$GCLOUD_FAIL"* ]]; then
  n=$(( $(cat "$GCLOUD_STATE.fails" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$GCLOUD_STATE.fails"
  if [[ -z ${GCLOUD_FAIL_TIMES:-} || $n -le $GCLOUD_FAIL_TIMES ]]; then exit "${GCLOUD_FAIL_CODE:-7}"; fi
fi
case "$*" in
  *' ssh '*|*' scp '*|storage*) ;;
  *'queued-resources create'*) echo ACTIVE > "$GCLOUD_STATE";;
  *'tpu-vm create'*) echo READY > "$GCLOUD_STATE";;
  *' delete '*) rm -f "$GCLOUD_STATE";;
  *describe*) [[ -f $GCLOUD_STATE ]] || exit 1; [[ "$*" != *--format* ]] || cat "$GCLOUD_STATE";;
esac
exit 0
'''


@pytest.fixture
def env(tmp_path):
  """An environment whose `gcloud` is the recording stub."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  stub = bin_dir / 'gcloud'
  stub.write_text(GCLOUD_STUB)
  stub.chmod(0o755)
  log = tmp_path / 'gcloud.log'
  log.write_text('')
  e = {k: v for k, v in os.environ.items() if not k.startswith('NFJAX_')}
  e.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log), USER='alice',
           TMPDIR=str(tmp_path), GCLOUD_STATE=str(tmp_path / 'gcloud.state'))
  e.pop('XLA_FLAGS', None)
  e.pop('XLA_PYTHON_CLIENT_MEM_FRACTION', None)
  e.pop('XLA_CLIENT_MEM_FRACTION', None)
  return e


def gcloud_calls(env):
  with open(env['GCLOUD_LOG']) as f:
    return [ln.rstrip('\n') for ln in f if ln.strip()]


def sh(script, *args, env, cwd=None, check=True):
  p = subprocess.run(['bash', os.path.join(LAUNCH, script), *args], env=env, cwd=cwd or ROOT,
                     capture_output=True, text=True, timeout=60)
  if check and p.returncode != 0:
    raise AssertionError(f"{script} {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
  return p


def dry_run(script, *args, env):
  """The commands `script --dry-run args` prints, one list of words per line; gcloud never runs."""
  p = sh(script, '--dry-run', *args, env=env)
  assert gcloud_calls(env) == [], "--dry-run ran gcloud"
  return [shlex.split(ln) for ln in p.stdout.splitlines() if ln.strip()]


def job_command(remote):
  """`cd ~/nfjax && bash ~/nfjax_job.sh start ... -- COMMAND`: the job script's words, COMMAND's words."""
  words = shlex.split(remote)
  assert words[:3] == ['cd', '~/nfjax', '&&'], words
  sep = words.index('--')
  return words[3:sep], words[sep + 1:]


def find(commands, *words):
  """Indices of the printed commands that contain all `words` (as whole words)."""
  return [i for i, c in enumerate(commands) if all(w in c for w in words)]


def flag(command, name):
  values = [w.split('=', 1)[1] for w in command if w.startswith(name + '=')]
  assert len(values) == 1, (name, command)
  return values[0]


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_valid_strict_bash(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(['bash', '-n', path], check=True)
  with open(path) as f:
    text = f.read()
  if script != 'lib.sh':   # sourced by the others
    assert 'set -euo pipefail' in text


def test_tpu_all_dry_run(env):
  """create -> bootstrap (every worker) -> run (every worker, --distributed) -> fetch -> delete."""
  cmds = dry_run('tpu.sh', '--project=p1', '--zone=us-central2-b', '--config=configs/mnist.py:quick',
                 '--bucket=gs://bkt/runs', 'all', '--', '--config.train.steps=100', env=env)
  create, = find(cmds, 'gcloud', 'create', 'nfjax-alice')
  describe, c = cmds[create][:cmds[create].index('||')], cmds[create][cmds[create].index('||') + 1:]
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'nfjax-alice']  # exists: reuse
  assert c[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'nfjax-alice']
  assert flag(c, '--accelerator-type') == 'v4-8' and flag(c, '--project') == 'p1'
  assert flag(c, '--scopes') == 'https://www.googleapis.com/auth/cloud-platform'   # --bucket needs it
  assert '--spot' not in c

  scp_setup, = find(cmds, 'scp', 'nfjax-alice:nfjax_worker_setup.sh')
  assert '--worker=all' in cmds[scp_setup]
  tar, = find(cmds, 'tar')
  scp_src, = find(cmds, 'scp', 'nfjax-alice:nfjax-src.tgz')
  assert '--worker=all' in cmds[scp_src]
  scp_job, = find(cmds, 'scp', 'nfjax-alice:nfjax_job.sh')
  assert cmds[scp_job][5].endswith('launch/tpu_job.sh') and '--worker=all' in cmds[scp_job]
  setup, = find(cmds, 'ssh', '--worker=all')[:1]
  remote = shlex.split(flag(cmds[setup], '--command'))
  # The worker runs one `pip install -e ~/nfjax[tpu,gcs]`; no separate jax spec.
  assert remote == ['bash', 'nfjax_worker_setup.sh', '--tarball', 'nfjax-src.tgz', '--extras', 'tpu,gcs']

  run, = [i for i in find(cmds, 'ssh', '--worker=all') if 'nfjax.main' in flag(cmds[i], '--command')]
  job, words = job_command(flag(cmds[run], '--command'))
  assert job[:3] == ['bash', '~/nfjax_job.sh', 'start'] and '--run=quick' in job     # detached: see tpu_job.sh
  assert flag(job, '--copy-log-to') == '$HOME/nfjax_runs/quick/logs'
  assert words[:3] == ['~/nfjax-venv/bin/python', '-m', 'nfjax.main']
  assert '--distributed' in words and '--config=configs/mnist.py:quick' in words
  assert '--config.train.steps=100' in words and '--stages=all' in words
  assert [w for w in words if w.startswith('--workdir=')] == ['--workdir=$HOME/nfjax_runs/quick']
  assert words.index('--compile_cache=$HOME/nfjax_runs/quick/jax_cache') < words.index('--config.train.steps=100')

  follow, sync_up = find(cmds, 'ssh', '--worker=0')      # `run` follows worker 0's log to the end
  assert shlex.split(flag(cmds[follow], '--command')) == ['bash', '~/nfjax_job.sh', 'logs', '--run=quick',
                                                          '--follow', '--lines=all']
  assert 'gs://bkt/runs/quick' in flag(cmds[sync_up], '--command')
  sync_down, = find(cmds, 'gcloud', 'storage', 'rsync', 'gs://bkt/runs/quick')
  recreate, delete = find(cmds, 'gcloud', 'delete')     # a preempted VM before create; the VM at the end
  assert recreate == create - 1 and 'PREEMPTED' in cmds[recreate]
  assert cmds[delete][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete'] and '--quiet' in cmds[delete]
  assert (create < scp_setup < scp_job < tar < scp_src < setup < run < follow < sync_up < sync_down < delete
          == len(cmds) - 1)


def test_tpu_modes_dry_run(env):
  spot = dry_run('tpu.sh', '--mode=spot', '--allow-local-workdir', 'create', env=env)
  assert len(spot) == 2 and '--spot' in spot[1] and 'tpu-vm' in spot[1]
  assert '--scopes' not in ' '.join(spot[1])             # no bucket, no gs:// workdir: no extra scopes
  # A preempted spot VM is deleted first, so that it is created again.
  dead = ' '.join(spot[0])
  assert dead.startswith('gcloud compute tpus tpu-vm describe nfjax-alice') and 'value(state)' in dead
  assert '-e PREEMPTED -e TERMINATED && gcloud compute tpus tpu-vm delete nfjax-alice' in dead

  q = ['--mode=queued', '--spot', '--valid-until=6h', '--accelerator-type=v5litepod-8',
       '--version=v2-alpha-tpuv5-lite', '--zone=us-west4-a', '--workdir=gs://bkt/nfjax/parity']
  create = dry_run('tpu.sh', *q, 'create', env=env)
  assert '-e FAILED -e SUSPENDING -e SUSPENDED && gcloud compute tpus queued-resources delete' in ' '.join(create[0])
  c = create[1][create[1].index('||') + 1:]
  assert c[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create'] and c[5] == 'nfjax-alice-qr'
  assert flag(c, '--node-id') == 'nfjax-alice' and flag(c, '--runtime-version') == 'v2-alpha-tpuv5-lite'
  assert flag(c, '--valid-until-duration') == '6h' and '--spot' in c
  assert flag(c, '--scopes') == 'https://www.googleapis.com/auth/cloud-platform'   # writes the bucket
  assert 'value(state.state)' in ' '.join(create[2])      # then waits for ACTIVE
  delete, = dry_run('tpu.sh', *q, 'delete', env=env)
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'nfjax-alice-qr']
  assert '--force' in delete and '--quiet' in delete

  keep = dry_run('tpu.sh', '--keep', 'all', env=env)
  assert not [c for c in keep if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete']]   # only create's
  assert find(keep, 'gcloud', 'delete') == [0]                          # delete-if-preempted


def test_tpu_bootstrap_from_git_is_the_same_setup(env):
  """Bootstrap is one idempotent setup script per worker, whatever the source."""
  cmds = dry_run('tpu.sh', '--repo=https://example.com/nfjax.git', '--ref=v1', 'bootstrap', env=env)
  assert not find(cmds, 'tar')
  remote = shlex.split(flag(cmds[-1], '--command'))
  assert remote[:2] == ['bash', 'nfjax_worker_setup.sh'] and '--worker=all' in cmds[-1]
  assert remote[remote.index('--repo') + 1] == 'https://example.com/nfjax.git'
  assert remote[remote.index('--ref') + 1] == 'v1'
  assert remote[remote.index('--extras') + 1] == 'tpu,gcs'


def test_tpu_bad_arguments(env):
  for args, message in [(['--workdir=s3://b/w', 'run'], 'give a local path or a gs://BUCKET/PATH URL'),
                        (['--mode=preemptible', 'create'], 'use on-demand, spot or queued'),
                        (['--spot', 'create'], '--spot goes with --mode=queued'),
                        (['--bucket=/tmp/x', 'fetch'], 'must start with gs://'),
                        (['--bucket=gs://b', '--workdir=gs://b/w', 'fetch'], 'is in Cloud Storage already'),
                        (['--detach', 'all'], '--detach goes with run'),
                        (['--worker=x', 'logs'], 'a worker index'),
                        (['frobnicate'], 'unknown command'),
                        ([], 'no command')]:
    p = sh('tpu.sh', '--dry-run', *args, env=env, check=False)
    assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
  assert gcloud_calls(env) == []


@pytest.mark.parametrize('mode', [['--mode=spot'], ['--mode=queued'], ['--mode=queued', '--spot']])
@pytest.mark.parametrize('command', ['create', 'run', 'all'])
def test_tpu_spot_and_queued_need_a_gs_workdir(env, mode, command):
  """A preempted VM loses its disk: spot/queued refuse a workdir on it, in one line, before any gcloud."""
  for workdir in ([], ['--workdir=/data/run']):
    p = sh('tpu.sh', '--dry-run', *mode, *workdir, command, env=env, check=False)
    assert p.returncode == 2 and p.stdout == '', p.stdout
    assert p.stderr.count('\n') == 1 and 'needs a gs:// workdir' in p.stderr
    assert '--workdir=gs://BUCKET/nfjax/parity' in p.stderr and '--allow-local-workdir' in p.stderr
  assert dry_run('tpu.sh', *mode, '--workdir=gs://b/nfjax/parity', command, env=env)
  assert dry_run('tpu.sh', *mode, '--allow-local-workdir', command, env=env)
  assert dry_run('tpu.sh', *mode, 'delete', env=env)         # delete, status, logs... need no workdir


def test_tpu_gs_workdir_dry_run(env):
  """A gs:// workdir: every worker writes the bucket, logs are copied there, fetch reads it directly."""
  cmds = dry_run('tpu.sh', '--mode=spot', '--workdir=gs://bkt/nfjax/parity/', 'all', env=env)
  create, = find(cmds, 'gcloud', 'create', 'nfjax-alice')
  c = cmds[create][cmds[create].index('||') + 1:]
  assert '--spot' in c and flag(c, '--scopes') == 'https://www.googleapis.com/auth/cloud-platform'
  setup, = [i for i in find(cmds, 'ssh', '--worker=all') if 'nfjax_worker_setup.sh' in flag(cmds[i], '--command')]
  assert shlex.split(flag(cmds[setup], '--command'))[-2:] == ['--extras', 'tpu,gcs']     # gcsfs on the workers
  run, = [i for i in find(cmds, 'ssh', '--worker=all') if 'nfjax.main' in flag(cmds[i], '--command')]
  job, words = job_command(flag(cmds[run], '--command'))
  assert flag(job, '--copy-log-to') == 'gs://bkt/nfjax/parity/logs'
  assert flag(words, '--workdir') == 'gs://bkt/nfjax/parity'
  assert flag(words, '--compile_cache') == 'gs://bkt/nfjax/parity/jax_cache'
  # fetch: straight from the bucket (nothing to copy off worker 0 first), then delete.
  assert [c for c in cmds if '--worker=0' in c and 'rsync' in ' '.join(c)] == []
  sync, = find(cmds, 'gcloud', 'storage', 'rsync')
  assert cmds[sync][-3:] == ['--recursive', 'gs://bkt/nfjax/parity', 'workdirs/tpu/parity']
  assert cmds[-1][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete']


def test_tpu_run_detach_status_logs_stop_dry_run(env):
  """`run` starts the job detached on every worker and follows worker 0 (--detach: not); status, logs
  and stop are the job script's commands over ssh."""
  cmds = dry_run('tpu.sh', '--run-name=r7', 'run', env=env)
  assert len(cmds) == 2
  start = shlex.split(flag(cmds[0], '--command'))
  assert '--worker=all' in cmds[0] and start[:7] == ['cd', '~/nfjax', '&&', 'bash', '~/nfjax_job.sh', 'start', '--run=r7']
  assert '--worker=0' in cmds[1] and shlex.split(flag(cmds[1], '--command'))[2:] == ['logs', '--run=r7', '--follow',
                                                                                     '--lines=all']
  detached = dry_run('tpu.sh', '--run-name=r7', '--detach', 'run', env=env)
  assert detached == cmds[:1]

  def remote(*args):
    c = dry_run('tpu.sh', '--run-name=r7', *args, env=env)[-1]
    worker, = [w for w in c if w.startswith('--worker=')]
    return worker, shlex.split(flag(c, '--command'))
  assert remote('logs') == ('--worker=0', ['bash', '~/nfjax_job.sh', 'logs', '--run=r7', '--lines=50'])
  assert remote('logs', '--worker=3', '--follow', '--lines=all') == (
    '--worker=3', ['bash', '~/nfjax_job.sh', 'logs', '--run=r7', '--lines=all', '--follow'])
  assert remote('stop') == ('--worker=all', ['bash', '~/nfjax_job.sh', 'stop', '--run=r7'])
  assert remote('status') == ('--worker=all', ['bash', '~/nfjax_job.sh', 'status', '--run=r7'])
  status = dry_run('tpu.sh', '--run-name=r7', '--mode=queued', 'status', env=env)
  assert [c[:5] for c in status] == [['gcloud', 'compute', 'tpus', 'queued-resources', 'describe'],
                                     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe'],
                                     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert flag(status[0], '--format') == 'value(state.state)' and flag(status[1], '--format') == 'value(state)'


@pytest.mark.parametrize('mode,state,recreated', [
    (['--mode=queued', '--spot'], 'SUSPENDED', True),     # a preempted spot queued resource
    (['--mode=queued'], 'FAILED', True),
    (['--mode=queued'], 'ACTIVE', False),
    (['--mode=spot'], 'PREEMPTED', True),
    (['--mode=spot'], 'READY', False),                    # the VM is there: reused as it is
])
def test_tpu_create_replaces_a_preempted_vm(env, mode, state, recreated):
  """`create` (and so `all`) run again after a preemption deletes the dead resource and creates it again."""
  with open(env['GCLOUD_STATE'], 'w') as f:
    f.write(state + '\n')
  p = sh('tpu.sh', *mode, '--workdir=gs://b/nfjax/parity', 'create', env=env)
  calls = gcloud_calls(env)
  deletes = [c for c in calls if ' delete ' in f' {c} ']
  creates = [c for c in calls if ' create ' in f' {c} ']
  if recreated:
    assert len(deletes) == 1 and len(creates) == 1 and calls.index(deletes[0]) < calls.index(creates[0])
    assert f'is {state} (preempted or failed): deleting it' in p.stderr
  else:
    assert deletes == [] and creates == [] and 'reusing it' in p.stderr


def test_tpu_run_refuses_a_second_copy_and_all_follows_it(env, tmp_path):
  """The job script exits 3 where the run is already running: `run` stops there (no follow), `all`
  follows the running job instead of starting another."""
  env.update(GCLOUD_FAIL='nfjax_job.sh start', GCLOUD_FAIL_CODE='3')
  p = sh('tpu.sh', 'run', env=env, check=False)
  assert p.returncode == 3 and 'not started: run parity is already running' in p.stderr
  assert not [c for c in gcloud_calls(env) if 'logs --run' in c]
  open(env['GCLOUD_LOG'], 'w').close()
  p = sh('tpu.sh', f'--local-dir={tmp_path / "results"}', 'all', env=env, check=False)
  assert p.returncode == 0 and 'following it instead' in p.stderr
  calls = gcloud_calls(env)
  follow, = [i for i, c in enumerate(calls) if 'nfjax_job.sh logs --run=parity --follow' in c]
  assert calls[-1].startswith('compute tpus tpu-vm delete') and follow < len(calls) - 1


@pytest.mark.parametrize('vm_state,fails,rc', [('READY', 2, 0), ('PREEMPTED', 1, 255)])
def test_tpu_run_follows_again_after_a_dropped_connection(env, vm_state, fails, rc):
  """ssh exit 255 while following: follow again (the last 20 lines) while the VM is READY; stop with
  255 and say how to resume when it was preempted."""
  env.update(GCLOUD_FAIL='logs --run=parity --follow', GCLOUD_FAIL_CODE='255', GCLOUD_FAIL_TIMES=str(fails),
             NFJAX_FOLLOW_RETRY_SECS='0')
  with open(env['GCLOUD_STATE'], 'w') as f:
    f.write(vm_state + '\n')
  p = sh('tpu.sh', 'run', env=env, check=False)
  assert p.returncode == rc, p.stderr
  follows = [c for c in gcloud_calls(env) if 'logs --run=parity --follow' in c]
  if rc == 0:
    assert len(follows) == 3 and '--lines=all' in follows[0] and '--lines=20' in follows[2]
    assert 'lost the ssh connection to worker 0 (the job goes on there)' in p.stderr
  else:
    assert len(follows) == 1 and 'is PREEMPTED (preempted?)' in p.stderr and 'same command again resumes' in p.stderr


@pytest.mark.parametrize('fail_at,expected_rc', [('nfjax.main', 7), ('tpu-vm create', 7), (None, 0)])
def test_tpu_all_deletes_the_vm_however_it_ends(env, tmp_path, fail_at, expected_rc):
  """`all` against the stub gcloud, failing at the run or at create: the VM is deleted last."""
  if fail_at:
    env['GCLOUD_FAIL'] = fail_at
  p = sh('tpu.sh', f'--local-dir={tmp_path / "results"}', 'all', env=env, check=False)
  assert p.returncode == expected_rc, p.stderr
  calls = gcloud_calls(env)
  assert calls[-1].startswith('compute tpus tpu-vm delete nfjax-alice'), calls
  assert len([c for c in calls if ' delete ' in f' {c} ']) == 1
  if fail_at == 'nfjax.main':      # the results that exist are still fetched before the delete
    assert any(c.startswith('compute tpus tpu-vm scp --recurse') for c in calls)


def test_tpu_all_keep_leaves_the_vm(env, tmp_path):
  env['GCLOUD_FAIL'] = 'nfjax.main'
  p = sh('tpu.sh', '--keep', f'--local-dir={tmp_path / "results"}', 'all', env=env, check=False)
  assert p.returncode == 7
  assert not [c for c in gcloud_calls(env) if 'delete' in c]


def test_gpu_dry_run(env):
  env['XLA_FLAGS'] = '--xla_gpu_enable_latency_hiding_scheduler=false'   # the user's choice wins
  cmds = dry_run('gpu.sh', '--venv=none', '--gpus=0,1', '--config=configs/mnist.py:quick', '--',
                 '--config.train.steps=5', env=env)
  exports = {c[1].split('=', 1)[0]: c[1].split('=', 1)[1] for c in cmds if c[0] == 'export'}
  assert exports['XLA_FLAGS'].split() == ['--xla_gpu_enable_latency_hiding_scheduler=false',
                                          '--xla_gpu_triton_gemm_any=true']
  assert exports['XLA_CLIENT_MEM_FRACTION'] == '0.90' and exports['CUDA_VISIBLE_DEVICES'] == '0,1'
  launch = cmds[-1]
  assert launch[:3] == ['python3', '-m', 'nfjax.main'] and '--distributed' not in launch
  assert '--config=configs/mnist.py:quick' in launch and '--workdir=workdirs/quick' in launch
  assert launch[-1] == '--config.train.steps=5'
  assert launch[-2] == '--compile_cache=workdirs/quick/jax_cache'    # on by default; a user's flag after it wins
  # nfjax and its CUDA JAX in one pip call, run unless JAX sees a GPU and nfjax is installed.
  check, = [c for c in cmds if '||' in c]
  assert check[check.index('||') + 1:] == ['python3', '-m', 'pip', 'install', '-e', '.[cuda12]']
  gpu, nfjax = ' '.join(check[:check.index('||')]).split(' && ')
  assert gpu.startswith('python3 -c') and 'd.platform == "gpu"' in gpu
  assert nfjax.startswith('python3 -c') and 'm.version("nfjax")' in nfjax
  assert len([c for c in cmds if 'pip' in c]) == 1
  # A gs:// workdir: nfjax with its gcs extra too (installed unless gcsfs is there), no --bucket.
  cmds = dry_run('gpu.sh', '--venv=none', '--workdir=gs://b/w', env=env)
  check, = [c for c in cmds if '||' in c]
  assert check[check.index('||') + 1:] == ['python3', '-m', 'pip', 'install', '-e', '.[cuda12,gcs]']
  assert 'm.version("gcsfs")' in ' '.join(check)
  assert flag(cmds[-1], '--workdir') == 'gs://b/w' and flag(cmds[-1], '--compile_cache') == 'gs://b/w/jax_cache'
  for args, message in ([['--workdir=s3://b/w'], 'give a local path or a gs://BUCKET/PATH URL'],
                        [['--workdir=gs://b/w', '--bucket=gs://c'], 'is in Cloud Storage already']):
    p = sh('gpu.sh', '--dry-run', *args, env=env, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr


# A stand-in for the virtualenv's python, for gpu.sh without --dry-run: logs its arguments; JAX
# sees a GPU when $FAKEPY_STATE/gpu exists, nfjax is installed when $FAKEPY_STATE/nfjax does;
# `-m pip` installs nfjax and (unless FAKEPY_PIP_GIVES_GPU=0) makes the GPU visible.
FAKE_GPU_PYTHON = r'''#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKEPY_LOG"
case $1 in
  -m) if [[ $2 == pip ]]; then
        touch "$FAKEPY_STATE/nfjax"
        [[ ${FAKEPY_PIP_GIVES_GPU:-1} == 0 ]] || touch "$FAKEPY_STATE/gpu"
      fi;;
  -c) case $2 in
        *'d.platform == "gpu"'*) [[ -f $FAKEPY_STATE/gpu ]] || exit 1;;
        *'m.version("nfjax")'*) [[ -f $FAKEPY_STATE/nfjax ]] || exit 1;;
        *print*) echo "[gpu] jax 0.10.2 devices: H100 (0)";;
      esac;;
esac
exit 0
'''


@pytest.mark.parametrize('present,no_install,pip_gives_gpu,outcome', [
    ((), False, True, 'install'),                  # a fresh virtualenv: one pip call, then the run
    (('gpu',), False, True, 'install'),            # JAX sees the GPU, nfjax missing: the same pip call
    (('nfjax',), False, True, 'install'),          # nfjax with a CPU-only jax: the same pip call
    (('gpu', 'nfjax'), False, True, 'nothing'),    # all there: no pip
    ((), True, True, 'sees no GPU'),
    (('gpu',), True, True, 'nfjax is not installed'),
    ((), False, False, 'still sees no GPU'),       # installed, but no driver: stop before the run
])
def test_gpu_installs_nfjax_cuda12(env, tmp_path, present, no_install, pip_gives_gpu, outcome):
  state, venv, log = tmp_path / 'state', tmp_path / 'venv', tmp_path / 'python.log'
  state.mkdir()
  for f in present:
    (state / f).touch()
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'python').write_text(FAKE_GPU_PYTHON)
  (venv / 'bin' / 'python').chmod(0o755)
  env.update(FAKEPY_LOG=str(log), FAKEPY_STATE=str(state), FAKEPY_PIP_GIVES_GPU=str(int(pip_gives_gpu)))
  args = [f'--venv={venv}', f'--workdir={tmp_path / "w"}'] + (['--no-install'] if no_install else [])
  p = sh('gpu.sh', *args, env=env, check=False)
  calls = log.read_text().splitlines() if log.exists() else []
  pip = [c for c in calls if c.startswith('-m pip')]
  ran = [c for c in calls if c.startswith('-m nfjax.main')]
  if outcome in ('install', 'nothing'):
    assert p.returncode == 0, p.stdout + p.stderr
    assert pip == (['-m pip install --quiet -e .[cuda12]'] if outcome == 'install' else [])
    assert len(ran) == 1 and calls[-1] == ran[0]
  else:
    assert p.returncode == 2 and outcome in p.stderr, p.stderr
    assert not ran
    if no_install:
      assert pip == [] and f"cd {ROOT} && {venv}/bin/python -m pip install -e '.[cuda12]'" in p.stderr
    else:
      assert pip == ['-m pip install --quiet -e .[cuda12]']
  assert gcloud_calls(env) == []


# ------------------------------------------------------------------------------------------------
# tpu_worker_setup.sh: idempotent

FAKE_PYTHON = r'''#!/usr/bin/env bash
# A stand-in for python: logs its arguments; `-m venv DIR` makes DIR/bin/python (this script).
printf '%s\n' "$*" >> "$FAKEPY_LOG"
case $1 in
  -V) echo "Python 3.12.9";;
  -m) if [[ $2 == venv ]]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi;;
  -c) if [[ $2 == *print* ]]; then echo "jax 0.10.2"; fi;;
esac
exit 0
'''


def test_worker_setup_is_idempotent(tmp_path):
  home, src = tmp_path / 'home', tmp_path / 'src'
  home.mkdir()
  src.mkdir()
  (src / 'pyproject.toml').write_text('[project]\nname = "nfjax"\n')
  (src / 'README.md').write_text('v1\n')
  fake = tmp_path / 'python3.12'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  log = tmp_path / 'python.log'
  env = {**os.environ, 'HOME': str(home), 'NFJAX_PYTHON_BIN': str(fake), 'FAKEPY_LOG': str(log)}

  stamps = iter(range(1_700_000_000, 1_700_000_100))

  def setup(*extras):  # every tarball's gzip header has a new timestamp, as a re-run of tpu.sh gives
    with gzip.GzipFile(home / 'nfjax-src.tgz', 'wb', mtime=next(stamps)) as z, tarfile.open(fileobj=z, mode='w') as t:
      t.add(src, arcname='.')
    log.write_text('')
    p = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_worker_setup.sh'), '--tarball', 'nfjax-src.tgz',
                        *extras], cwd=home, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, [ln for ln in log.read_text().splitlines() if 'pip install' in ln]

  upgrade_pip = '-m pip install --quiet --upgrade pip'
  install = f'-m pip install --quiet -e {home / "nfjax"}'
  out, pip = setup()                                    # default --extras tpu: one pip call for nfjax[tpu]
  assert 'source: extracted' in out and 'python: created' in out
  assert pip == [upgrade_pip, install + '[tpu]']
  assert (home / 'nfjax' / 'README.md').read_text() == 'v1\n'
  stamp = (home / 'nfjax-venv' / '.nfjax-setup').read_text().strip().split('|')
  assert stamp[0] == 'extras=tpu' and len(stamp[1]) == 64 and stamp[2] == 'Python 3.12.9'

  out, pip = setup('--extras', 'tpu')                   # the same again (as tpu.sh passes it): nothing to do
  assert pip == [] and 'already this tarball' in out and 'packages: already installed' in out

  (src / 'README.md').write_text('v2\n')                # new source, same dependencies
  out, pip = setup()
  assert pip == [] and 'source: extracted' in out
  assert (home / 'nfjax' / 'README.md').read_text() == 'v2\n'

  (src / 'pyproject.toml').write_text('[project]\nname = "nfjax"\nversion = "2"\n')   # new dependencies
  out, pip = setup()
  assert pip == [upgrade_pip, install + '[tpu]'] and 'packages: installed' in out

  out, pip = setup('--extras', 'tpu,test')              # other extras: part of the stamp
  assert pip == [upgrade_pip, install + '[tpu,test]']
  out, pip = setup('--extras', 'tpu,test')
  assert pip == []
  out, pip = setup('--extras', '')                      # none: plain pip install -e ~/nfjax
  assert pip == [upgrade_pip, install]

  # A job that tpu.sh run started is still running here: new source and dependencies wait.
  (src / 'README.md').write_text('v3\n')
  (src / 'pyproject.toml').write_text('[project]\nname = "nfjax"\nversion = "3"\n')
  job = subprocess.Popen(['sleep', '60'])
  try:
    (home / 'nfjax_jobs' / 'parity').mkdir(parents=True)
    (home / 'nfjax_jobs' / 'parity' / 'pid').write_text(f'{job.pid}\n')
    out, pip = setup()
    assert pip == [] and f'a job is running here: parity (pid {job.pid})' in out
    assert (home / 'nfjax' / 'README.md').read_text() == 'v2\n'
  finally:
    job.kill()
    job.wait()
  out, pip = setup()                                    # once it ended: both
  assert 'source: extracted' in out and pip == [upgrade_pip, install + '[tpu]']


# ------------------------------------------------------------------------------------------------
# tpu_job.sh: the detached job on each TPU worker, run here for real

def job_env(tmp_path, env, worker='1'):
  return {**env, 'NFJAX_JOBS_DIR': str(tmp_path / 'jobs'), 'NFJAX_WORKER': worker, 'NFJAX_LOG_COPY_SECS': '1'}


def job(action, *args, env, cwd, check=None, timeout=30):
  p = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_job.sh'), action, *args], env=env, cwd=cwd,
                     capture_output=True, text=True, timeout=timeout)
  if check is not None:
    assert p.returncode == check, (action, args, p.returncode, p.stdout, p.stderr)
  return p


# Prints nfjax-like progress lines until the file `go` exists, then exits with $JOB_RC; counts the
# SIGTERMs it gets in the file `terms` and exits 143 after one.
FAKE_JOB = r'''
trap 'echo TERM >> terms; echo "got SIGTERM"; exit 143' TERM
i=0
until [[ -f go ]]; do i=$((i + 1)); echo "2026-12-02 10:00:00 [train] step $i"; sleep 0.1; done
echo "not a log line"
exit "${JOB_RC:-0}"
'''


def start_fake(tmp_path, env, run='r1', *copy):
  (tmp_path / 'job.sh').write_text(FAKE_JOB)
  return job('start', f'--run={run}', *copy, '--', 'bash', 'job.sh', env=env, cwd=tmp_path)


def test_starts_within_one_second_keep_every_log(env, tmp_path):
  """A run started again in the same second (a command that failed at once, a retry loop) gets a log of
  its own; the first start's log is not overwritten. `date` is pinned to one second to make it so."""
  bindir = tmp_path / 'datebin'
  bindir.mkdir()
  (bindir / 'date').write_text('#!/bin/bash\n[[ $* == *%H%M%S* ]] && { echo 20261202-100000; exit 0; }\nexec /bin/date "$@"\n')
  (bindir / 'date').chmod(0o755)
  env = {**job_env(tmp_path, env), 'PATH': f"{bindir}:{env.get('PATH', os.environ['PATH'])}"}
  runs = tmp_path / 'jobs' / 'r1'
  for word in ('first', 'second', 'third'):
    job('start', '--run=r1', '--', 'echo', word, env=env, cwd=tmp_path, check=0)
    job('logs', '--run=r1', '--follow', env=env, cwd=tmp_path, check=0)
  logs = sorted(f.name for f in runs.iterdir() if f.name.startswith('worker-1-'))
  assert logs == ['worker-1-20261202-100000-2.log', 'worker-1-20261202-100000-3.log', 'worker-1-20261202-100000.log']
  assert 'first' in (runs / logs[2]).read_text() and 'second' in (runs / logs[0]).read_text()
  assert os.readlink(runs / 'worker-1.log') == logs[1] and 'third' in (runs / logs[1]).read_text()


def test_job_runs_detached_refuses_a_second_copy_and_records_its_exit_code(env, tmp_path):
  env = {**job_env(tmp_path, env), 'JOB_RC': '5'}
  runs = tmp_path / 'jobs' / 'r1'
  p = start_fake(tmp_path, env, 'r1', f'--copy-log-to={tmp_path / "work" / "logs"}')
  assert p.returncode == 0 and '[worker 1] run r1 started' in p.stdout, p.stderr
  # `start` has returned; the job runs on in a session of its own (no hangup reaches it).
  pid = int((runs / 'pid').read_text())
  os.kill(pid, 0)
  assert os.getsid(pid) == pid != os.getsid(0)
  log = runs / 'worker-1.log'
  assert log.is_symlink() and os.readlink(log).startswith('worker-1-') and os.readlink(log).endswith('.log')

  again = job('start', '--run=r1', '--', 'true', env=env, cwd=tmp_path, check=3)
  assert again.stderr.count('\n') == 1 and f'run r1 is already running on worker 1 (pid {pid}' in again.stderr
  assert 'launch/tpu.sh stop' in again.stderr and int((runs / 'pid').read_text()) == pid

  time.sleep(0.5)
  status = job('status', '--run=r1', env=env, cwd=tmp_path, check=0).stdout.splitlines()
  assert f'run r1 running for 0h00m (pid {pid})' in status[0]
  assert status[1].startswith('[worker 1]   last: 2026-12-02 10:00:00 [train] step ')
  (tmp_path / 'go').touch()
  follow = job('logs', '--run=r1', '--follow', '--lines=all', env=env, cwd=tmp_path, check=5)   # the job's code
  lines = follow.stdout.splitlines()
  assert lines[0].startswith('==== nfjax_job.sh: run r1 on ') and '(worker 1)' in lines[0]
  assert lines[1] == '==== command: bash job.sh' and lines[2] == '2026-12-02 10:00:00 [train] step 1'
  assert lines[-1].endswith('with exit code 5') and 'failed (exit code 5)' in follow.stderr
  assert (runs / 'exit_code').read_text() == '5\n'
  status = job('status', '--run=r1', env=env, cwd=tmp_path, check=0).stdout.splitlines()
  assert 'run r1 failed (exit code 5)' in status[0] and '[train] step' in status[1]   # the last nfjax line
  copied, = (tmp_path / 'work' / 'logs').iterdir()                    # the log, copied when it ended
  assert copied.name == os.readlink(log) and copied.read_text() == log.read_text()
  assert job('logs', '--run=r1', '--lines=2', env=env, cwd=tmp_path, check=0).stdout.splitlines() == lines[-2:]

  job('start', '--run=r1', '--', 'true', env=env, cwd=tmp_path, check=0)   # ended: may start again
  assert job('logs', '--run=r1', '--follow', env=env, cwd=tmp_path, check=0)
  assert len([f for f in runs.iterdir() if f.name.startswith('worker-1-')]) == 2   # one log per start
  assert 'never started here' in job('status', '--run=r2', env=env, cwd=tmp_path, check=0).stdout
  assert job('logs', '--run=r2', env=env, cwd=tmp_path, check=4).stderr.startswith('nfjax_job.sh: error: no log')


def test_job_interrupted_by_sigint_says_so_and_how_to_resume(env, tmp_path):
  """A job that ended with nfjax's Ctrl-C code (130) is reported as interrupted, with how to go on,
  not as failed."""
  env = {**job_env(tmp_path, env), 'JOB_RC': '130'}
  start_fake(tmp_path, env)
  (tmp_path / 'go').touch()
  follow = job('logs', '--run=r1', '--follow', env=env, cwd=tmp_path, check=130)
  assert 'interrupted by SIGINT (exit code 130' in follow.stderr and 'the same run command resumes it' in follow.stderr
  status = job('status', '--run=r1', env=env, cwd=tmp_path, check=0).stdout
  assert 'run r1 interrupted by SIGINT' in status and 'failed' not in status


@pytest.mark.parametrize('how', ['stop', 'shutdown'])
def test_job_gets_one_sigterm(env, tmp_path, how):
  """`stop` signals the command; a shutdown signals every process (the wrapper too), and the
  wrapper does not pass it on: nfjax's second SIGTERM would kill it at once."""
  env = job_env(tmp_path, env)
  start_fake(tmp_path, env)
  runs = tmp_path / 'jobs' / 'r1'
  time.sleep(0.3)
  if how == 'stop':
    assert 'sent SIGTERM' in job('stop', '--run=r1', env=env, cwd=tmp_path, check=0).stdout
  else:
    os.killpg(int((runs / 'pid').read_text()), signal.SIGTERM)
  follow = job('logs', '--run=r1', '--follow', env=env, cwd=tmp_path, check=143)
  assert 'got SIGTERM' in follow.stdout and 'the same run command resumes it' in follow.stderr
  assert (tmp_path / 'terms').read_text() == 'TERM\n'
  assert 'is not running here' in job('stop', '--run=r1', env=env, cwd=tmp_path, check=0).stdout


def test_job_copies_its_log_to_a_bucket_and_knows_a_killed_one(env, tmp_path):
  env = {**job_env(tmp_path, env), 'TPU_WORKER_ID': '4'}
  del env['NFJAX_WORKER']                              # the index from TPU_WORKER_ID
  start_fake(tmp_path, env, 'r1', '--copy-log-to=gs://bkt/nfjax/parity/logs/')
  runs = tmp_path / 'jobs' / 'r1'
  time.sleep(2.5)
  name = os.readlink(runs / 'worker-4.log')
  cps = [c for c in gcloud_calls(env) if c.startswith('storage cp')]
  assert len(cps) >= 1 and cps[0] == f'storage cp --quiet {runs / name} gs://bkt/nfjax/parity/logs/{name}'
  # Killed outright (no exit code written): the status says so, and so does follow (exit 1).
  os.killpg(int((runs / 'pid').read_text()), signal.SIGKILL)
  time.sleep(0.3)
  assert 'left no exit code' in job('status', '--run=r1', env=env, cwd=tmp_path, check=0).stdout
  assert 'left no exit code' in job('logs', '--run=r1', '--follow', env=env, cwd=tmp_path, check=1).stderr
  # A pid file naming a live process that is not this run's wrapper (a pid reused after a reboot).
  (runs / 'pid').write_text(f'{os.getpid()}\n')
  assert job('start', '--run=r1', '--', 'true', env=env, cwd=tmp_path, check=0)


# ------------------------------------------------------------------------------------------------
# tpu.sh run / status / logs with the job script for real: a gcloud stand-in whose `ssh` runs the
# command in a fake worker home on this machine (one worker), with a stand-in for the venv's python.

WORKER_GCLOUD = r'''#!/usr/bin/env bash
printf '%s\n' "$*" >> "$GCLOUD_LOG"
case "$*" in
  *describe*) [[ "$*" != *--format* ]] || echo READY;;
  *' ssh '*) for a in "$@"; do [[ $a == --command=* ]] && cmd=${a#--command=}; done
             cd "$WORKER_HOME" && HOME=$WORKER_HOME exec bash -c "$cmd";;
esac
exit 0
'''

# Records its arguments, prints nfjax-like lines until $WORKER_HOME/go exists, exits $FAKE_RC.
WORKER_PYTHON = r'''#!/usr/bin/env bash
printf '%s\n' "$PWD" "$@" > "$WORKER_HOME/argv"
echo "2026-12-02 10:00:00 [main] process 0 of 1"
until [[ -f $WORKER_HOME/go ]]; do echo "2026-12-02 10:00:01 [train] step 5/9 loss 3.1"; sleep 0.1; done
exit "${FAKE_RC:-0}"
'''


@pytest.fixture
def worker(env, tmp_path):
  home = tmp_path / 'worker'
  (home / 'nfjax').mkdir(parents=True)
  (home / 'nfjax-venv' / 'bin').mkdir(parents=True)
  py = home / 'nfjax-venv' / 'bin' / 'python'
  py.write_text(WORKER_PYTHON)
  py.chmod(0o755)
  (home / 'nfjax_job.sh').write_text(open(os.path.join(LAUNCH, 'tpu_job.sh')).read())   # what bootstrap copies
  stub = tmp_path / 'bin' / 'gcloud'
  stub.write_text(WORKER_GCLOUD)
  env.update(WORKER_HOME=str(home), NFJAX_WORKER='0', NFJAX_LOG_COPY_SECS='1')
  return home


def test_tpu_run_status_logs_through_the_job_script(env, worker):
  """`run` starts the job detached through ~/nfjax_job.sh, follows it and exits with its code; the
  remote command's quoting (~, $HOME, gs://) holds in a real shell."""
  env['FAKE_RC'] = '143'
  args = ['--config=configs/mnist.py:smoke', '--workdir=gs://bkt/nfjax/smoke']
  p = sh('tpu.sh', *args, '--detach', 'run', env=env)
  argv = (worker / 'argv').read_text().splitlines()
  assert argv[0] == str(worker / 'nfjax')                                   # cd ~/nfjax
  assert argv[1:] == ['-m', 'nfjax.main', '--config=configs/mnist.py:smoke', '--stages=all', '--distributed',
                      '--compile_cache=gs://bkt/nfjax/smoke/jax_cache', '--workdir=gs://bkt/nfjax/smoke']
  assert '[worker 0] run smoke started' in p.stdout

  again = sh('tpu.sh', *args, 'run', env=env, check=False)                 # running: refused, not followed
  assert again.returncode == 3 and 'run smoke is already running on worker 0' in again.stderr
  status = sh('tpu.sh', *args, 'status', env=env).stdout.splitlines()
  assert status[0] == 'TPU VM nfjax-alice: READY' and 'run smoke running for' in status[1]
  assert status[2] == '[worker 0]   last: 2026-12-02 10:00:01 [train] step 5/9 loss 3.1'

  (worker / 'go').touch()
  follow = sh('tpu.sh', *args, 'logs', '--follow', '--lines=all', env=env, check=False)
  assert follow.returncode == 143 and follow.stdout.splitlines()[-1].endswith('with exit code 143')
  assert 'stopped by SIGTERM' in sh('tpu.sh', *args, 'status', env=env).stdout
  log = os.readlink(worker / 'nfjax_jobs' / 'smoke' / 'worker-0.log')
  assert f'storage cp --quiet {worker}/nfjax_jobs/smoke/{log} gs://bkt/nfjax/smoke/logs/{log}' in gcloud_calls(env)

  env['FAKE_RC'] = '0'
  (worker / 'go').unlink()
  threading.Timer(1.0, (worker / 'go').touch).start()
  p = sh('tpu.sh', *args, 'run', env=env)                                   # ended: starts again, follows to the end
  assert p.returncode == 0 and '[train] step 5/9' in p.stdout and p.stdout.splitlines()[-1].endswith('exit code 0')

# ------------------------------------------------------------------------------------------------
# The launcher's multi-process flags (the 2-process runs themselves: tests/test_multiprocess.py)

def test_launcher_distributed_flags(tmp_path):
  def launch(*flags):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    for k in [k for k in env if k.startswith(('JAX_COORDINATOR', 'SLURM_', 'OMPI_', 'KUBERNETES_'))]:
      env.pop(k)
    return subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=configs/mnist.py:smoke',
                           f'--workdir={tmp_path}', *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
  p = launch('--num_processes=2', '--process_id=0')
  assert p.returncode != 0 and '--num_processes, --process_id need --distributed' in p.stderr
  p = launch('--distributed')                  # no cluster to detect here: a usage error, not a traceback
  assert p.returncode != 0 and 'elsewhere give --coordinator_address=HOST:PORT' in p.stderr
  assert 'Traceback' not in p.stderr
  assert not os.listdir(tmp_path)


def test_compile_cache_flag_fills_the_directory_and_is_reused(tmp_path):
  """--compile_cache is applied before any stage runs; a program run twice with the cache writes its
  executables there the first time and reads them the second (no new entries)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cache = tmp_path / 'cache'
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=configs/mnist.py:smoke', '--stages=train',
                      f'--workdir={tmp_path / "w"}', f'--compile_cache={cache}'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and 'run --stages=fit,tokenize,train' in p.stderr    # nothing to train: no compile
  assert cache.is_dir() and 'JAX compilation cache' in p.stdout + p.stderr
  program = ('from nfjax import main; main.enable_compile_cache(%r, 0.0); import jax, jax.numpy as jnp; '
             'print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))' % str(cache))
  entries = []
  for _ in range(2):
    p = subprocess.run([sys.executable, '-c', program], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    entries.append(sorted(os.listdir(cache)))
  assert any('jit__lambda' in e for e in entries[0])
  assert entries[1] == entries[0]


# ------------------------------------------------------------------------------------------------
# launch/local.sh: N processes of one multi-process run on this machine (a real run with a
# preemption: tests/test_multiprocess.py)

LOCAL_FAKE_PYTHON = '''#!/usr/bin/env bash
# A stand-in for python: the free-port probe, else one "process" that fails (--process_id=1, with
# the exit code $FAIL_CODE) or runs until SIGTERM, which it records in $MARKS.
if [[ $1 == -c ]]; then echo 45678; exit 0; fi
id=''
for a in "$@"; do [[ $a == --process_id=* ]] && id=${a#*=}; done
echo "process $id: $*"
if [[ $id == 1 && -n ${FAIL_CODE:-} ]]; then sleep 0.3; echo "failing"; exit "$FAIL_CODE"; fi
trap 'echo "TERM $id" >> "$MARKS"; exit 143' TERM
for i in $(seq 300); do sleep 0.1; done
echo "done $id"
'''


def _local(tmp_path, *args, fail_code=None, timeout=60):
  fake = tmp_path / 'fakepy'
  fake.write_text(LOCAL_FAKE_PYTHON)
  fake.chmod(0o755)
  env = {**os.environ, 'MARKS': str(tmp_path / 'marks'), 'FAIL_CODE': '' if fail_code is None else str(fail_code)}
  return subprocess.run(['bash', os.path.join(LAUNCH, 'local.sh'), f'--python={fake}', f'--log_dir={tmp_path / "logs"}',
                         '--grace=5', *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_local_sh_gives_every_process_its_flags_and_stops_the_others_when_one_fails(tmp_path):
  p = _local(tmp_path, '--num_processes=3', '--', '--config=mnist:smoke', '--workdir=/tmp/w', fail_code=7)
  assert p.returncode == 7, p.stderr          # the failed process's code
  assert 'process 1 exited with 7: stopping the other 2' in p.stderr and '[process 1] failing' in p.stderr
  marks = sorted((tmp_path / 'marks').read_text().split('\n')[:-1])
  assert marks == ['TERM 0', 'TERM 2']          # the others were stopped, not left running
  logs = {i: (tmp_path / 'logs' / f'process-{i}.log').read_text() for i in range(3)}
  for i, text in logs.items():
    assert (f'-m nfjax.main --distributed --coordinator_address=127.0.0.1:45678 --num_processes=3 '
            f'--process_id={i} --config=mnist:smoke --workdir=/tmp/w') in text
  assert 'process 0:' in p.stdout              # process 0 is shown live as well


def test_local_sh_dry_run_and_bad_flags(tmp_path):
  p = _local(tmp_path, '--dry-run', '--port=1234', '--', '--config=mnist:smoke', '--workdir=W')
  assert p.returncode == 0
  lines = p.stdout.splitlines()
  assert len(lines) == 2 and all('--coordinator_address=127.0.0.1:1234 --num_processes=2' in ln for ln in lines)
  assert '--process_id=1 --config=mnist:smoke --workdir=W > ' in lines[1]
  for args, msg in ((['--num_processes=0', '--', '--workdir=W'], 'must be a positive integer'),
                    (['--'], 'no launcher flags'),
                    (['--', '--workdir=W', '--process_id=3'], 'is set by local.sh'),
                    (['--bogus'], 'unknown option --bogus')):
    p = _local(tmp_path, *args)
    assert p.returncode == 2 and msg in p.stderr and p.stderr.count('\n') == 1, p.stderr
