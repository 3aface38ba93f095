"""Fault injection: nothing corrupt is ever used, one writer per workdir, every user-caused failure
is one line that says what to do (and the advice works). docs/reliability.md lists the scenarios.

One finished smoke pipeline (`ref`) is copied for each scenario; the fault is injected into the copy.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT, load_config

STAGE_DIRS = {'fit': ('fields',), 'tokenize': ('tokenizer', 'tokens'), 'train': ('transformer',),
              'sample': ('samples',), 'evaluate': ('eval',)}
ORDER = list(STAGE_DIRS)


def _env():
  return {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
  from nfjax import main
  workdir = str(tmp_path_factory.mktemp('reliability_ref'))
  main.run(load_config('smoke'), workdir, 'all')
  return workdir


def _copy(ref: str, dst, drop_from: str | None = None) -> str:
  """A copy of the finished workdir; with drop_from, without that stage's and later stages' dirs."""
  dst = str(dst)
  shutil.copytree(ref, dst, ignore=shutil.ignore_patterns('.nfjax.lock'))
  if drop_from:
    for stage in ORDER[ORDER.index(drop_from):]:
      for d in STAGE_DIRS[stage]:
        shutil.rmtree(os.path.join(dst, d))
  return dst


def _arrays(path: str) -> dict:
  if path.endswith('.npy'):
    return {'': np.load(path)}
  with np.load(path) as z:
    return {k: z[k] for k in z.files if k != 'meta'}   # tokenizer meta holds fit timings


def _assert_same_arrays(a_dir: str, b_dir: str) -> int:
  """Every .npy / .npz under a_dir equals the one under b_dir (checkpoints aside); returns how many."""
  n = 0
  for root, dirs, names in os.walk(a_dir):
    dirs[:] = [d for d in dirs if d not in ('checkpoints', 'tensorboard')]
    for name in names:
      if name.endswith(('.npy', '.npz')):
        p = os.path.join(root, name)
        q = os.path.join(b_dir, os.path.relpath(p, a_dir))
        a, b = _arrays(p), _arrays(q)
        assert a.keys() == b.keys(), p
        for k in a:
          np.testing.assert_array_equal(a[k], b[k], err_msg=f"{p} {k}")
        n += 1
  return n


# --------------------------------------------------------------------------------------------------
# One writer per workdir

def test_a_second_launch_on_a_held_workdir_stops_and_a_killed_holder_frees_it(tmp_path):
  from nfjax import main
  from nfjax.errors import NfjaxError
  workdir = str(tmp_path / 'wd')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom nfjax.io import lock\nheld = lock.hold(sys.argv[1])\nheld.__enter__()\n'
       'print("held", flush=True)\ntime.sleep(120)', workdir], stdout=subprocess.PIPE, text=True, env=_env())
  try:
    assert holder.stdout.readline().strip() == 'held'
    config = load_config('smoke', **{'data.num_fields': 8, 'fit.steps': 5, 'fit.shared_init_steps': 5,
                                     'fit.chunk_size': 8, 'fit.shared_init_candidates': 1})
    with pytest.raises(NfjaxError, match=rf"{workdir} is in use by another launch \(pid {holder.pid} on host"):
      main.run(config, workdir, 'fit')
    assert not os.path.exists(os.path.join(workdir, 'fields'))   # nothing was touched
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 released the lock with its process: the next launch runs.
  assert main.run(config, workdir, 'fit')['fit']['num_fields'] == 8


# --------------------------------------------------------------------------------------------------
# kill -9 in every stage: the same command resumes to the same artifacts

KILL_AFTER = {'fit': 3, 'tokenize': 2, 'train': 5, 'sample': 4, 'evaluate': 4}
# The child runs a stage as the launcher does (main.run_or_exit) and, at the n-th write to a path (relative
# to the workdir) that matches a pattern, either kills itself with -9 ('kill') or asks the test for a
# SIGTERM and waits for it to arrive ('term').
CHILD = textwrap.dedent('''
    import os, re, signal, sys, time
    sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
    from conftest import load_config
    from nfjax import main
    from nfjax.io import files
    from nfjax.utils import preemption
    workdir, stage, pattern, n, action = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
    if action == 'int':   # Ctrl-C as a terminal delivers it, even where this test runs with SIGINT ignored
      signal.signal(signal.SIGINT, signal.default_int_handler)
    count = [0]
    def counted(fn):
      def wrapper(path, *a, **k):
        out = fn(path, *a, **k)
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir)).replace(os.sep, '/')
        if re.search(pattern, rel):
          count[0] += 1
          if count[0] == n and action == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)   # kill -9 right after the n-th write
          if count[0] == n and action == 'int':
            os.kill(os.getpid(), signal.SIGINT)    # Ctrl-C right after the n-th write
          if count[0] == n and action == 'term':
            print('ready for SIGTERM', flush=True)
            t0 = time.monotonic()
            while not preemption.requested() and time.monotonic() - t0 < 60:
              time.sleep(0.01)
        return out
      return wrapper
    files._atomic_write_bytes = counted(files._atomic_write_bytes)
    files.append_text = counted(files.append_text)
    main.run_or_exit(load_config('smoke'), workdir, stage)
    print('finished without being killed', flush=True)
''')


def _resumes_to_the_reference(ref: str, workdir: str, stage: str) -> dict:
  """The same command again on an interrupted workdir: the stage's arrays equal the uninterrupted run's
  (train: the same steps, train_loss and eval_loss, training being bit-identical). Returns its summary."""
  from nfjax import main
  out = main.run(load_config('smoke'), workdir, stage)[stage]
  for d in STAGE_DIRS[stage]:
    assert _assert_same_arrays(os.path.join(ref, d), os.path.join(workdir, d)) or d == 'transformer'
  if stage == 'train':
    with open(os.path.join(ref, 'transformer', 'summary.json')) as f:
      want = json.load(f)
    # train_loss averages the same window after a resume
    assert (out['steps'], out['train_loss'], out['eval_loss']) == (want['steps'], want['train_loss'],
                                                                    want['eval_loss'])
  return out


def _child(workdir, stage, pattern, n, action):
  return [sys.executable, '-c', CHILD, ROOT, workdir, stage, pattern, str(n), action]


@pytest.mark.slow
@pytest.mark.parametrize('stage', ORDER)
def test_kill_9_in_every_stage_resumes_to_the_same_artifacts(ref, tmp_path, stage):
  workdir = _copy(ref, tmp_path / 'wd', drop_from=stage)
  p = subprocess.run(_child(workdir, stage, f"^({'|'.join(STAGE_DIRS[stage])})/", KILL_AFTER[stage], 'kill'),
                     env=_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
  for d in STAGE_DIRS[stage]:
    assert not os.path.exists(os.path.join(workdir, d, 'summary.json'))   # killed mid-stage
  _resumes_to_the_reference(ref, workdir, stage)                         # the same command again


def test_train_loss_after_a_resume_is_the_uninterrupted_figure(ref, tmp_path):
  """Resuming from the step-3 checkpoint reports the train_loss of the uninterrupted run."""
  from nfjax import main
  workdir = _copy(ref, tmp_path / 'wd')
  t = os.path.join(workdir, 'transformer')
  os.remove(os.path.join(t, 'summary.json'))
  shutil.rmtree(os.path.join(t, 'checkpoints', '6'))
  out = main.run(load_config('smoke'), workdir, 'train')['train']
  with open(os.path.join(ref, 'transformer', 'summary.json')) as f:
    want = json.load(f)
  assert out['resumed_from'] == 3 and out['steps_this_run'] == 3
  assert out['train_loss'] == want['train_loss'] and out['eval_loss'] == want['eval_loss']


# --------------------------------------------------------------------------------------------------
# SIGTERM (preemption): stop at a safe point, keep what is finished, exit 143; the same command resumes

# stage -> (a file whose n-th write is the moment the test sends SIGTERM, n). fit: right after the
# first of its 2 chunks is written; train: while step 5 of 6 runs (checkpoints are due at 3 and 6);
# sample: after the first of its 2 settings is written.
TERM_AT = {'fit': (r'chunks/chunk_00000\.npz$', 1), 'train': (r'metrics\.jsonl$', 5),
           'sample': (r'/weights\.npy$', 1)}


@pytest.mark.slow
@pytest.mark.parametrize('stage', list(TERM_AT))
def test_sigterm_saves_at_a_safe_point_exits_143_and_the_same_command_resumes_identically(ref, tmp_path, stage):
  workdir = _copy(ref, tmp_path / 'wd', drop_from=stage)
  pattern, n = TERM_AT[stage]
  p = subprocess.Popen(_child(workdir, stage, pattern, n, 'term'), env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  try:
    for line in p.stdout:   # the stage's log lines, then the child's request
      if line.strip() == 'ready for SIGTERM':
        break
    else:
      pytest.fail('the child finished without reaching the point for the SIGTERM')
    p.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    out, err = p.communicate(timeout=120)
    seconds = time.perf_counter() - t0
  finally:
    p.kill()
  assert p.returncode == 143, out + err[-3000:]
  assert 'Traceback' not in err
  lines = [ln for ln in err.splitlines() if ln.startswith('nfjax: ')]
  assert len(lines) == 1 and lines[0].startswith(f'nfjax: stopped: preempted (SIGTERM) during the {stage} stage'), err
  assert 'Run the same command again' in lines[0] and 'SIGTERM received' in out
  print(f'{stage}: SIGTERM -> exit in {seconds:.2f}s: {lines[0]}', file=sys.stderr)
  for d in STAGE_DIRS[stage]:
    assert not os.path.exists(os.path.join(workdir, d, 'summary.json'))
  if stage == 'fit':      # the chunk in flight was finished and kept, the next one not started
    assert sorted(os.listdir(os.path.join(workdir, 'fields', 'chunks'))) == ['chunk_00000.npz']
  if stage == 'train':    # a checkpoint of the step it stopped at, which no period asked for
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'transformer', 'checkpoints')) if s.isdigit())
    assert steps == [3, 5], steps
  if stage == 'sample':   # the finished setting kept, the other not started
    assert os.path.exists(os.path.join(workdir, 'samples', 'topk3_t0.8', 'weights.npy'))
    assert not os.path.exists(os.path.join(workdir, 'samples', 'topk0_t1.0', 'weights.npy'))
  result = _resumes_to_the_reference(ref, workdir, stage)                  # the same command again
  if stage == 'train':
    assert result['resumed_from'] == 5 and result['steps_this_run'] == 1   # not one step lost


# Ctrl-C (SIGINT) in the launcher: one line naming the stage, exit 130, no traceback; the same command
# resumes to the same artifacts. fit: right after its first chunk is written; train: while step 5 of 6
# runs, as for SIGTERM (the checkpoint of step 3 is the newest: the run resumes from there).
INT_AT = {'fit': (r'chunks/chunk_00000\.npz$', 1), 'train': (r'metrics\.jsonl$', 5)}


@pytest.mark.slow
@pytest.mark.parametrize('stage', list(INT_AT))
def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes_identically(ref, tmp_path, stage):
  workdir = _copy(ref, tmp_path / 'wd', drop_from=stage)
  pattern, n = INT_AT[stage]
  p = subprocess.run(_child(workdir, stage, pattern, n, 'int'), env=_env(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 130, p.stdout[-2000:] + p.stderr[-3000:]
  assert 'Traceback' not in p.stderr and 'finished without being killed' not in p.stdout
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith(f'nfjax: stopped: interrupted (Ctrl-C) during the {stage} stage'), \
      p.stderr
  assert 'Run the same command again' in lines[0]
  for d in STAGE_DIRS[stage]:
    assert not os.path.exists(os.path.join(workdir, d, 'summary.json'))
  if stage == 'fit':
    assert sorted(os.listdir(os.path.join(workdir, 'fields', 'chunks'))) == ['chunk_00000.npz']
  result = _resumes_to_the_reference(ref, workdir, stage)                  # the same command again
  if stage == 'train':
    assert result['resumed_from'] == 3


def test_a_launch_missing_a_stage_is_one_error_before_any_stage_runs(ref, tmp_path):
  """A selected stage whose input is neither finished nor written by an earlier stage of the launch:
  one DataError before the first stage runs (the fit used to run, then the train stage refused), naming
  the directory and the --stages that make the launch whole, which then works."""
  from nfjax import main
  from nfjax.errors import DataError
  fresh = tmp_path / 'fresh'
  with pytest.raises(DataError, match=r"fresh/tokens does not exist; the train stage reads it and this launch "
                                      r"does not run the tokenize stage: run --stages=fit,tokenize,train$"):
    main.run(load_config('smoke'), str(fresh), 'fit,train')
  with pytest.raises(DataError, match=r"fresh/fields does not exist; the sample stage reads it and this launch "
                                      r"does not run the fit stage: run --stages=fit,tokenize,train,sample$"):
    main.run(load_config('smoke'), str(fresh), 'sample')
  assert not os.path.exists(fresh / 'fields') and not os.path.exists(fresh / 'config.json')
  workdir = _copy(ref, tmp_path / 'wd', drop_from='tokenize')   # fields finished, nothing after them
  os.makedirs(os.path.join(workdir, 'tokens'))                     # a tokenize stage that was interrupted
  with pytest.raises(DataError, match=r"wd/tokens is incomplete \(no summary.json\): its stage was interrupted; the "
                                      r"train stage reads it and this launch does not run the tokenize stage: run "
                                      r"--stages=tokenize,train$"):
    main.run(load_config('smoke'), workdir, 'train')
  with pytest.raises(DataError, match=r"run --stages=tokenize,train,sample,evaluate$"):   # samples/ too
    main.run(load_config('smoke'), workdir, 'train,evaluate')
  out = main.run(load_config('smoke'), workdir, 'tokenize,train')   # the advice
  assert set(out) == {'tokenize', 'train'}
  main.run(load_config('smoke'), workdir, 'train')                  # now whole: the finished stage is skipped


# --------------------------------------------------------------------------------------------------
# Damaged artifacts: named, with the stage that made them and a command that redoes it

def _damage(path: str, how: str) -> None:
  if how == 'delete':
    os.remove(path)
  elif how == 'truncate':
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
  elif how == 'flip':      # same size, other bytes
    with open(path, 'r+b') as f:
      f.seek(-8, os.SEEK_END)
      b = f.read(8)
      f.seek(-8, os.SEEK_END)
      f.write(bytes(x ^ 0xFF for x in b))
  elif how == 'badjson':
    with open(path, 'w') as f:
      f.write('{"num_fields": 64, ')


DAMAGE = [  # (file, how, the stage that reads it)
    ('fields/weights.npy', 'truncate', 'tokenize'),
    ('fields/meta.json', 'badjson', 'tokenize'),
    ('fields/quality.npy', 'flip', 'evaluate'),
    ('tokenizer/tokenizer.npz', 'delete', 'sample'),
    ('tokens/tokens.npy', 'flip', 'train'),
    ('tokens/vocab.json', 'truncate', 'sample'),
    ('transformer/model.json', 'delete', 'sample'),
    ('samples/topk3_t0.8/weights.npy', 'truncate', 'evaluate'),
    ('samples/settings.json', 'flip', 'evaluate'),
]


@pytest.mark.parametrize('rel,how,reader', DAMAGE)
def test_a_damaged_artifact_is_named_with_its_stage_and_the_fix(ref, tmp_path, rel, how, reader):
  from nfjax import main
  from nfjax.errors import DataError
  workdir = _copy(ref, tmp_path / 'wd', drop_from=reader)   # the reader has not run yet
  path = os.path.join(workdir, rel)
  _damage(path, how)
  producer = next(s for s, ds in STAGE_DIRS.items() if rel.split('/')[0] in ds)
  with pytest.raises(DataError) as e:
    main.run(load_config('smoke'), workdir, reader)
  message = str(e.value)
  assert path in message and f'written by the {producer} stage' in message, message
  assert f'--stages={producer},{reader}' in message and '\n' not in message


@pytest.mark.slow
@pytest.mark.parametrize('rel,how,reader', [DAMAGE[0], DAMAGE[3], DAMAGE[7],
                                            ('samples/topk0_t1/tokens.npy', 'delete', 'evaluate')])
def test_the_advice_for_a_damaged_artifact_works(ref, tmp_path, rel, how, reader):
  """Running the producer again (as the error says) redoes it, identically, and the reader runs."""
  from nfjax import main
  workdir = _copy(ref, tmp_path / 'wd', drop_from=reader)
  _damage(os.path.join(workdir, rel), how)
  producer = next(s for s, ds in STAGE_DIRS.items() if rel.split('/')[0] in ds)
  out = main.run(load_config('smoke'), workdir, f'{producer},{reader}')
  assert set(out) == {producer, reader}
  for d in STAGE_DIRS[producer]:
    _assert_same_arrays(os.path.join(ref, d), os.path.join(workdir, d))


def test_every_artifact_damaged_in_any_way_fails_verification(ref, tmp_path):
  """Every file of every stage's manifest, truncated, changed in place or deleted, is caught by
  verification (what `require` and a stage's own skip check run) and named."""
  from nfjax.io import workdir as wd
  workdir = _copy(ref, tmp_path / 'wd')
  checked = 0
  for dirs in STAGE_DIRS.values():
    for d in dirs:
      directory = os.path.join(workdir, d)
      assert wd.verify(directory) == []
      with open(os.path.join(directory, 'manifest.json')) as f:
        entries = json.load(f)['files']
      assert entries and not any(r.startswith(('checkpoints', 'tensorboard')) for r in entries)
      for rel in entries:
        path = os.path.join(directory, rel)
        original = open(path, 'rb').read()
        for how in ('truncate', 'flip', 'delete'):
          if how != 'delete' and len(original) < 16:
            continue
          _damage(path, how)
          problems = wd.verify(directory)
          assert [p for p, _ in problems] == [rel], (d, rel, how, problems)
          with open(path, 'wb') as f:
            f.write(original)
          checked += 1
      assert wd.verify(directory) == []
  assert checked > 100


@pytest.mark.parametrize('rel', ['fields/summary.json', 'fields/fingerprint.json', 'tokens/summary.json'])
def test_bad_json_names_the_file_and_redo_fixes_it(ref, tmp_path, rel):
  from nfjax import main
  from nfjax.errors import DataError
  workdir = _copy(ref, tmp_path / 'wd')
  _damage(os.path.join(workdir, rel), 'badjson')
  stage = next(s for s, ds in STAGE_DIRS.items() if rel.split('/')[0] in ds)
  with pytest.raises(DataError, match=rf"{os.path.join(workdir, rel)} is not valid JSON .*--redo={stage}"):
    main.run(load_config('smoke'), workdir, stage)
  if stage == 'tokenize':   # --redo=STAGE clears the stage and runs it again (seconds for tokenize)
    out = main.run(load_config('smoke'), workdir, stage, redo=stage)
    assert set(out) == {stage}
    _assert_same_arrays(os.path.join(ref, 'tokens'), os.path.join(workdir, 'tokens'))


def test_tokens_outside_the_vocabulary_are_refused_before_a_model_is_built(tmp_path):
  from nfjax import main
  from nfjax.errors import DataError
  from nfjax.io import tokens as token_data
  from nfjax.io import workdir as wd
  vocab = token_data.Vocab(num_codes=8, num_classes=2, specials=('sos',))
  directory = os.path.join(str(tmp_path), 'tokens')
  for bad in (100_000, -3):
    tokens = np.tile(np.array([[8, 9, 1, 2, 3]], np.int32), (16, 1))
    tokens[5, 3] = bad
    with pytest.raises(ValueError, match='token ids must lie in'):   # the writer refuses it too
      token_data.write(directory, tokens, np.arange(16), np.zeros(16), np.arange(14), np.arange(14, 16), vocab, 2)
    good = np.tile(np.array([[8, 9, 1, 2, 3]], np.int32), (16, 1))
    token_data.write(directory, good, np.arange(16), np.zeros(16), np.arange(14), np.arange(14, 16), vocab, 2)
    np.save(os.path.join(directory, 'tokens.npy'), tokens)   # damaged after the stage wrote it
    wd.write_summary(directory, {'vocab_size': vocab.vocab_size})
    with pytest.raises(DataError, match=rf"tokens.npy holds token id {bad}, outside the vocabulary \[0, 11\)"):
      main.run(load_config('smoke'), str(tmp_path), 'train')
  assert not os.path.exists(os.path.join(str(tmp_path), 'transformer', 'checkpoints'))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(ref, tmp_path, capsys):
  from nfjax import checkpoint
  workdir = _copy(ref, tmp_path / 'wd')
  ckpts = os.path.join(workdir, 'transformer', 'checkpoints')
  assert sorted(os.listdir(ckpts)) == ['3', '6']
  for root, _, names in os.walk(os.path.join(ckpts, '6', 'params')):
    for n in names:
      _damage(os.path.join(root, n), 'truncate')
  params, meta = checkpoint.load_params(ckpts)
  assert meta['step'] == 3
  assert 'WARNING: the checkpoint at step 6' in capsys.readouterr().out
  _, want = checkpoint.load_params(os.path.join(ref, 'transformer', 'checkpoints'), step=3)
  assert want['step'] == 3 and meta['rng'] == want['rng']


FULL_DISK = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
    from conftest import load_config
    from nfjax import main
    from nfjax.io import files
    files.free_bytes = lambda path: 3 << 20   # a disk with 3 MiB left: less than one smoke checkpoint
    main.run_or_exit(load_config('smoke'), sys.argv[2], 'train')
''')


def test_a_disk_without_room_for_a_checkpoint_is_one_line_and_the_same_command_resumes(ref, tmp_path):
  workdir = _copy(ref, tmp_path / 'wd', drop_from='train')
  p = subprocess.run([sys.executable, '-c', FULL_DISK, ROOT, workdir], env=_env(), capture_output=True, text=True,
                     timeout=600)
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  ckpts = os.path.join(workdir, 'transformer', 'checkpoints')
  assert lines[0].startswith(f"nfjax: error: cannot write the checkpoint of step 3 in {ckpts}: 3.0 MiB free on its "
                             "disk, the step needs ~"), lines[0]
  assert 'Free space there' in lines[0] and 'the same command then resumes' in lines[0]
  assert os.listdir(ckpts) == []                           # refused before Orbax wrote anything
  _resumes_to_the_reference(ref, workdir, 'train')          # with room again: the uninterrupted run's figures


# --------------------------------------------------------------------------------------------------
# User-caused failures in the launcher: one line, exit code 2, no traceback

def _launch(args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'nfjax.main', *args], cwd=cwd, env=_env(), capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('args,expect', [
    (['--config=configs/nope.py:smoke'], r"--config=configs/nope.py:smoke: \[Errno 2\] No such file"),
    (['--config=configs/nope.py:smoke', '--config.train.steps=3'], r"--config=configs/nope.py:smoke: \[Errno 2\]"),
    (['--config=configs/mnist.py:smoke', '--config.fit.stepz=3'],
     r"--config.fit.stepz: 'stepz' is not a key of the config; did you mean 'steps'\?"),
    (['--config=configs/mnist.py:smok'], r"unknown preset 'smok'"),
    (['--config=configs/mnist.py:smoke', '--config.evaluate.num_neighbours=-1'], r"evaluate.num_neighbours=-1"),
    (['--config=configs/mnist.py:smoke', '--config.train.init_from=/nonexistent_nfjax/ckpt'],
     r"train.init_from='/nonexistent_nfjax/ckpt' is no directory: give the checkpoints directory"),
    (['--config=configs/mnist.py:smoke', '--config.data.num_fields=3'],
     r"data.num_fields=3: the evaluate stage needs at least 4 good fields; fit 4 or more, or leave it out"),
])
def test_launcher_user_errors_are_one_line(tmp_path, args, expect):
  p = _launch([*args, f'--workdir={tmp_path / "wd"}'])
  assert p.returncode == 2, p.stderr
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith('  (')]
  assert len(lines) == 1 and lines[0].startswith('nfjax: error: '), p.stderr
  import re
  assert re.search(expect, lines[0]), lines[0]
  assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'wd' / 'config.json')
  assert not os.path.exists('/nonexistent_nfjax')


def test_an_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  p = _launch(['--config=configs/mnist.py:smoke', f'--workdir={blocker}/wd', '--stages=fit'])
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
  assert p.stderr.strip().startswith(f'nfjax: error: cannot write {blocker}/wd')


@pytest.mark.parametrize('platforms,expect,distributed', [
    ('cuda', r"\(JAX_PLATFORMS=cuda\): no cuda device is visible, or JAX's plugin for it is not installed\. ", False),
    ('nope', r"\(JAX_PLATFORMS=nope\): Unable to initialize backend 'nope': .* not in the list of known backends",
     False),
    ('nope', r"\(JAX_PLATFORMS=nope\): Unable to initialize backend 'nope'", True),   # after jax.distributed
])
def test_a_backend_jax_cannot_start_is_one_line_that_says_what_to_do(tmp_path, platforms, expect, distributed):
  import re
  import socket as socket_lib
  extra = []
  if distributed:
    with socket_lib.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    extra = ['--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=1', '--process_id=0']
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=configs/mnist.py:smoke',
                      f'--workdir={tmp_path / "wd"}', *extra], cwd=ROOT, env={**_env(), 'JAX_PLATFORMS': platforms},
                     capture_output=True, text=True, timeout=300)
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert lines[0].startswith('nfjax: error: JAX could not start its backend') and re.search(expect, lines[0]), lines[0]
  assert "pip install -e '.[cuda12]'" in lines[0] and 'set JAX_PLATFORMS=cpu' in lines[0], lines[0]
  assert not os.path.exists(tmp_path / 'wd')   # refused before anything was written


def test_a_workdir_under_tilde_is_the_home_directory_not_a_directory_named_tilde(tmp_path):
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir(), cwd.mkdir()
  # --stages=sample on a new workdir is refused before any stage: quick, and the launch's log is written first
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', f'--config={ROOT}/configs/mnist.py:smoke',
                      '--workdir=~/runs/wd', '--stages=sample'], cwd=cwd, env={**_env(), 'HOME': str(home)},
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and 'run --stages=' in p.stderr, p.stderr[-3000:]
  assert os.listdir(cwd) == []                                   # no directory named '~'
  assert len(os.listdir(home / 'runs' / 'wd' / 'logs')) == 1     # the launch's log, in the home directory
  assert str(home / 'runs' / 'wd') in p.stderr


def test_a_refused_launch_leaves_config_json_alone(ref, tmp_path):
  from nfjax import main
  from nfjax.errors import ConfigError
  workdir = _copy(ref, tmp_path / 'wd')
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ConfigError):
    main.run(load_config('smoke', **{'train.lr': -1.0}), workdir, 'all')
  assert open(os.path.join(workdir, 'config.json')).read() == before


def test_a_stage_of_another_config_names_the_redo_flag_and_that_advice_works(ref, tmp_path):
  import re
  from nfjax import main
  from nfjax.errors import NfjaxError
  workdir = _copy(ref, tmp_path / 'wd')
  config = load_config('smoke', **{'sample.settings': ((3, 0.8, 1.0), (5, 1.0, 1.0))})
  with pytest.raises(NfjaxError) as e:
    main.run(config, workdir, 'all')
  advice = re.search(r"run the same command with --redo=(\w+) to redo this stage", str(e.value))
  assert 'holds the sample stage of a run with a different config' in str(e.value) and advice, str(e.value)
  out = main.run(config, workdir, 'all', redo=advice.group(1))        # the advice, followed
  assert [st['name'] for st in out['sample']['settings']] == ['topk3_t0.8', 'topk5_t1']
  assert set(out['evaluate']['settings']) == {'topk3_t0.8', 'topk5_t1'}   # the evaluation redid itself
  assert not os.path.exists(os.path.join(workdir, 'samples', 'topk0_t1'))


# --------------------------------------------------------------------------------------------------
# The smaller items

def test_mesh_dir_without_the_meshes_source_is_refused():
  from nfjax.configs import checks
  from nfjax.errors import ConfigError
  config = load_config('smoke', path='configs/shapes.py', **{'data.mesh_dir': '/data/ShapeNetCore.v2'})
  with pytest.raises(ConfigError, match=r"data.mesh_dir='/data/ShapeNetCore.v2' is set but data.source='procedural'"):
    checks.validate(config, ('fit',))


def test_files_respect_the_umask(tmp_path):
  from nfjax.io import files
  mask = os.umask(0o022)
  os.umask(mask)
  path = str(tmp_path / 'x.json')
  files.write_json(path, {'a': 1})
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_idle_devices_and_a_batch_larger_than_the_data_are_warned(capsys):
  import jax
  from nfjax import models, sharding
  from nfjax.training import tasks, trainer
  config = load_config('smoke', **{'mesh.data': 2, 'train.batch_size': 8})
  sharding._WARNED.clear()   # warned once per process and shape; other tests may have made this mesh
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.size == 2 and jax.device_count() == 8
  assert 'uses 2 of the 8 devices; 6 stay idle' in capsys.readouterr().out
  mdef = models.build(models.GPTConfig(num_layers=1, num_heads=1, embed_dim=8, block_size=4, vocab_size=5))
  task = tasks.Task('gpt', mdef, tasks.gpt_loss(1, False), {'tokens': np.zeros((4, 5), np.int32)}, {},
                    tokens_per_example=4)
  trainer.Trainer(task, config.train, mesh, seed=0)
  assert 'train.batch_size=8 is larger than the 4 training examples' in capsys.readouterr().out
