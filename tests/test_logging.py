"""Log lines (timestamps, the launcher's log file per launch) and TensorBoard (namespaced tags, the
evaluate stage's numbers and every stage's pictures), read back from the event files."""

import glob
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

STAMP = r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d'


def read_events(directory):
  """{tag: [(step, value or (height, width))]} from every TensorBoard event file under `directory`,
  parsed from the TFRecord framing (length u64, crc u32, data, crc u32) with tensorboardX's protobufs."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, '**', 'events.out.tfevents.*'), recursive=True)):
    data = open(path, 'rb').read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        kind = v.WhichOneof('value')
        value = v.simple_value if kind == 'simple_value' else (v.image.height, v.image.width)
        out.setdefault(v.tag, []).append((event.step, value))
  return out


def test_log_lines_carry_a_timestamp(capsys):
  from nfjax.utils.logging import Progress, log
  log('fit', 'hello -> there')
  p = Progress('train', 10, 'steps')
  p.start()
  p.update(5)
  lines = capsys.readouterr().out.splitlines()
  assert re.fullmatch(STAMP + r' \[fit\] hello -> there', lines[0]), lines
  assert re.match(STAMP + r' \[train\] 5/10 steps \(50%\)', lines[1]), lines


def test_the_log_file_gets_the_captured_lines_and_tracebacks(tmp_path, capsys):
  from nfjax.utils import logging as lg
  lg.capture_log()
  lg.log('main', 'before the file')
  path = lg.open_log_file(str(tmp_path))
  try:
    assert os.path.dirname(path) == str(tmp_path / 'logs')
    assert re.fullmatch(r'\d{8}-\d{6}-%d\.log' % os.getpid(), os.path.basename(path))
    lg.log('fit', 'after')
    lg.record('nfjax: error: something')
    text = open(path).read()   # line-buffered: on disk at once, before the file is closed
    assert re.search(STAMP + r' \[main\] before the file\n' + STAMP + r' \[fit\] after\nnfjax: error: something\n',
                     text), text
  finally:
    lg.close_log_file()
  assert f"this launch's log: {path}" in open(path).read().splitlines()[-1]
  lg.log('fit', 'not in the file')
  assert 'not in the file' not in open(path).read()


def test_metrics_writer_tags_are_namespaced(tmp_path):
  from nfjax.utils.logging import MetricsWriter
  fit = MetricsWriter(str(tmp_path / 'fields'), namespace='fit')
  fit.write(16, psnr_mean=30.0, fields_per_sec=5.0)
  fit.close()
  train = MetricsWriter(str(tmp_path / 'transformer'), namespace='train')
  train.write(1, loss=2.0, lr=1e-3)
  train.write(2, eval_loss=1.5, eval_accuracy=0.25)
  train.close()
  assert set(read_events(str(tmp_path / 'fields'))) == {'fit/psnr_mean', 'fit/fields_per_sec'}
  events = read_events(str(tmp_path / 'transformer'))
  assert set(events) == {'train/loss', 'train/lr', 'eval/loss', 'eval/accuracy'}
  assert events['eval/loss'] == [(2, 1.5)]
  # metrics.jsonl keeps the keys as they are
  assert '"eval_loss": 1.5' in (tmp_path / 'transformer' / 'metrics.jsonl').read_text()


def test_a_stages_namespace_is_its_name_but_eval_for_evaluate():
  from nfjax.utils.logging import namespace
  assert namespace('evaluate') == 'eval' and namespace('fit') == 'fit'


def test_stage_outputs_pictures_and_summary_numbers(tmp_path):
  from PIL import Image
  from nfjax.utils.logging import log_stage_outputs
  d = tmp_path / 'eval'
  (d / 'topk3_t0.8').mkdir(parents=True)
  Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(d / 'topk3_t0.8' / 'grid.png')
  Image.fromarray(np.zeros((4, 5), np.uint8)).save(d / 'novelty.png')   # grayscale
  (d / 'checkpoints').mkdir()
  Image.fromarray(np.zeros((4, 5), np.uint8)).save(d / 'checkpoints' / 'skipped.png')
  summary = {'class_accuracy': 0.5, 'num_samples': 8, 'ok': True, 'headline_setting': 'topk3_t0.8',
             'settings': {'topk3_t0.8': {'frechet_distance': 12.0, 'cov': float('nan')}},
             'timings': {'load': 1.0}}
  assert log_stage_outputs(str(d), 'evaluate', summary) == 5
  events = read_events(str(d / 'tensorboard'))
  assert events == {'eval/class_accuracy': [(0, 0.5)], 'eval/num_samples': [(0, 8.0)],
                    'eval/settings/topk3_t0.8/frechet_distance': [(0, 12.0)],
                    'eval/topk3_t0.8/grid': [(0, (6, 10))], 'eval/novelty': [(0, (4, 5))]}


def _launch(workdir, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'nfjax.main', '--config=configs/mnist.py:smoke', f'--workdir={workdir}',
                         '--stages=fit', '--config.data.num_fields=8', '--config.fit.steps=5',
                         '--config.fit.shared_init_steps=5', '--config.fit.shared_init_candidates=1', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_each_launch_writes_its_own_log_file(tmp_path):
  wd = tmp_path / 'wd'
  first = _launch(wd)
  assert first.returncode == 0, first.stdout + first.stderr
  logs = sorted(glob.glob(str(wd / 'logs' / '*.log')))
  assert len(logs) == 1
  text = open(logs[0]).read()
  assert re.search(STAMP + r' \[main\] stage fit -> ', text) and re.search(STAMP + r' \[fit\] done: 8 fields', text)
  assert text.splitlines() == first.stdout.splitlines()   # everything the launch logged, nothing else
  assert first.stdout.splitlines()[-1].endswith(f"[main] this launch's log: {logs[0]}")
  second = _launch(wd)
  assert second.returncode == 0, second.stdout + second.stderr
  logs2 = sorted(glob.glob(str(wd / 'logs' / '*.log')))
  assert len(logs2) == 2 and logs[0] in logs2 and open(logs[0]).read() == text
  new = open(next(p for p in logs2 if p != logs[0])).read()
  assert 'already finished' in new and 'done: 8 fields' not in new
  # a user error that ends a launch is in its log too
  third = _launch(wd, '--config.fit.steps=-1')
  assert third.returncode == 2, third.stdout + third.stderr
  logs3 = sorted(glob.glob(str(wd / 'logs' / '*.log')))
  assert len(logs3) == 3
  last = open(next(p for p in logs3 if p not in logs2)).read()
  assert third.stderr.strip().splitlines()[0] in last
  # the fit's own pictures went to TensorBoard once (the skipped launches added none)
  events = read_events(str(wd / 'fields' / 'tensorboard'))
  assert 'fit/psnr_mean' in events and events['fit/reconstructions'] == [(0, events['fit/reconstructions'][0][1])]


@pytest.mark.slow
def test_the_pipeline_logs_every_stage_to_tensorboard(smoke_fields, tmp_path):
  """train/ and eval/ scalars of the train stage, the sample stage's per-setting grids, the evaluate
  stage's numbers and pictures, each in its stage directory's tensorboard/."""
  import json
  import shutil
  from conftest import load_config
  from nfjax import main
  workdir = str(tmp_path / 'wd')
  shutil.copytree(os.path.join(smoke_fields, 'fields'), os.path.join(workdir, 'fields'))
  config = load_config('smoke', **{'sample.num_samples': 8, 'sample.batch_size': 8, 'evaluate.classifier.epochs': 1,
                                   'sample.settings': ((3, 0.8, 1.0), (0, 1.0, 0.9))})
  summaries = main.run(config, workdir, 'all')
  train = read_events(os.path.join(workdir, 'transformer', 'tensorboard'))
  assert {'train/loss', 'train/lr', 'train/tokens_per_sec', 'eval/loss'} <= set(train), sorted(train)
  assert not [t for t in train if '/' not in t]
  assert train['train/loss'][-1][0] == summaries['train']['steps']
  samples = read_events(os.path.join(workdir, 'samples', 'tensorboard'))
  for name in ('topk3_t0.8', 'topk0_t1_p0.9'):
    (step, (h, w)), = samples[f'sample/{name}/grid']
    assert step == 0 and h > 0 and w > 0
  ev = read_events(os.path.join(workdir, 'eval', 'tensorboard'))
  summary = json.load(open(os.path.join(workdir, 'eval', 'summary.json')))
  assert ev['eval/class_accuracy'] == [(0, pytest.approx(summary['class_accuracy']))]
  fd = summary['settings']['topk0_t1_p0.9']['frechet_distance']
  assert ev['eval/settings/topk0_t1_p0.9/frechet_distance'] == [(0, pytest.approx(fd, rel=1e-6))]
  assert 'eval/novelty' in ev and not [t for t in ev if t.startswith('eval/timings')]
  tokenizer = read_events(os.path.join(workdir, 'tokenizer', 'tensorboard'))
  assert 'tokenize/reconstructions' in tokenizer
  # a second run skips every stage and logs nothing again
  main.run(config, workdir, 'all')
  assert read_events(os.path.join(workdir, 'eval', 'tensorboard')) == ev
