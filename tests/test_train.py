"""The train stage: sharded == unsharded, kill-and-resume, restore on other device counts, overfit,
compile-once, gradient accumulation, NaN stop, bad configs, the regression transformer, the
params-only loader."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from nfjax import checkpoint, main
from nfjax.stages import train
from nfjax.training import tasks
from nfjax.training import trainer as trainer_lib
from nfjax.io import tokens as token_data
from nfjax.errors import ConfigError, DataError, NfjaxError
from nfjax.io import files as io
from nfjax.io import workdir as wd

MESH_8 = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.model': 2}   # data, FSDP and model (heads/mlp/vocab) sharding
MESH_1 = {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.model': 1}   # the first device only
MESH_2 = {'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.model': 1}

# Smoke model (2 layers, width 32, 2 heads); 18-token vocabulary, sequences of 2 + 18 tokens.
BASE = {'train.steps': 8, 'train.batch_size': 8, 'train.log_every': 1, 'train.eval_every': 4,
        'train.eval_batches': -1, 'train.checkpoint_every': 3, 'train.warmup_steps': 2, 'train.lr': 3e-3}


def make_tokens(workdir, n=40, num_codes=13, num_classes=3, num_weights=18, noise=0.05, seed=0):
  """A token dataset as the tokenize stage writes it: [SOS, class, w_0..w_{P-1}], where the weight
  tokens follow a class-dependent pattern with a little noise (learnable, not trivial)."""
  rng = np.random.default_rng(seed)
  vocab = token_data.Vocab(num_codes=num_codes, num_classes=num_classes)
  labels = rng.integers(0, num_classes, n)
  j = np.arange(num_weights)
  w = (labels[:, None] * 5 + j[None, :] * (labels[:, None] + 1)) % num_codes
  w = np.where(rng.random(w.shape) < noise, rng.integers(0, num_codes, w.shape), w)
  tokens = np.concatenate([np.full((n, 1), vocab.sos), vocab.class_token(labels)[:, None], w], 1)
  perm = rng.permutation(n)
  n_val = max(1, n // 8)
  directory = os.path.join(workdir, 'tokens')
  token_data.write(directory, tokens, np.arange(n), labels, np.sort(perm[n_val:]), np.sort(perm[:n_val]), vocab,
                   prefix_len=2)
  wd.write_summary(directory, {'vocab_size': vocab.vocab_size})
  return tokens


def config(**kw):
  return load_config('smoke', **{**BASE, **kw})


def logged(workdir, key='loss'):
  with open(os.path.join(workdir, 'transformer', 'metrics.jsonl')) as f:
    rows = [json.loads(ln) for ln in f]
  return {r['step']: r[key] for r in rows if key in r}


class Crash(Exception):
  pass


def crash_at(step):
  def hook(done, trainer):
    if done == step:
      raise Crash(f"simulated crash after step {done}")
  return hook


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 8-step run on 8 devices (data 2 x fsdp 2 x model 2)."""
  wd = str(tmp_path_factory.mktemp('reference'))
  make_tokens(wd)
  trainers = set()
  summary = train.run(config(**MESH_8), wd, hooks=[lambda step, trainer: trainers.add(trainer)])
  (trainer,) = trainers
  return wd, summary, trainer


@pytest.fixture(scope='module')
def crashed(tmp_path_factory):
  """The same run killed after step 5 (checkpoints every 3 steps: the latest is step 3)."""
  wd = str(tmp_path_factory.mktemp('crashed'))
  make_tokens(wd)
  with pytest.raises(Crash):
    train.run(config(**MESH_8), wd, hooks=[crash_at(5)])
  assert not os.path.exists(os.path.join(wd, 'transformer', 'summary.json'))
  assert checkpoint.Checkpointer(os.path.join(wd, 'transformer', 'checkpoints')).all_steps() == [3]
  return wd


def test_reference_run_end_to_end(reference):
  wd, s, _ = reference
  for key in ('steps', 'train_loss', 'eval_loss', 'tokens_per_sec', 'params'):
    assert key in s
  assert s['steps'] == 8 and s['num_devices'] == 8 and s['mesh'] == {'data': 2, 'fsdp': 2, 'model': 2}
  assert s['block_size'] == 19 and s['vocab_size'] == 18  # the context covers all 19 inputs
  assert np.isfinite(s['eval_loss']) and s['tokens_per_sec'] > 0
  losses = logged(wd)
  assert sorted(losses) == list(range(1, 9))
  assert losses[8] < losses[1]
  assert sorted(logged(wd, 'eval_loss')) == [4, 8]
  assert os.path.exists(os.path.join(wd, 'transformer', 'model.json'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(wd, 'transformer', 'tensorboard')))
  # Re-running skips (same summary, no training); a different config is refused.
  assert train.run(config(**MESH_8), wd) == s
  with pytest.raises(NfjaxError, match='different config'):
    train.run(config(**MESH_8, **{'train.lr': 1e-3}), wd)


def test_sharded_losses_equal_single_device(reference, tmp_path):
  wd, _, _ = reference
  make_tokens(str(tmp_path))
  single = train.run(config(**MESH_1), str(tmp_path))
  assert single['num_devices'] == 1
  a, b = logged(wd), logged(str(tmp_path))
  assert sorted(a) == sorted(b)
  # Same math, different reduction order across shards: equal to float32 rounding.
  np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5)
  ea, eb = logged(wd, 'eval_loss'), logged(str(tmp_path), 'eval_loss')
  np.testing.assert_allclose([eb[4], eb[8]], [ea[4], ea[8]], rtol=2e-5)


def test_kill_and_resume_continues_the_exact_trajectory(reference, crashed, tmp_path):
  ref_wd, ref_summary, _ = reference
  wd = str(tmp_path / 'resumed')
  shutil.copytree(crashed, wd)
  summary = train.run(config(**MESH_8), wd)   # the same command again
  assert summary['resumed_from'] == 3 and summary['steps_this_run'] == 5
  a, b = logged(ref_wd), logged(wd)
  assert sorted(b) == list(range(1, 9))      # steps 4, 5 logged again, not twice
  assert [b[k] for k in range(1, 9)] == [a[k] for k in range(1, 9)]   # bit-for-bit
  assert logged(wd, 'eval_loss') == logged(ref_wd, 'eval_loss')
  assert summary['eval_loss'] == ref_summary['eval_loss']
  pa, _ = checkpoint.load_params(os.path.join(ref_wd, 'transformer', 'checkpoints'))
  pb, _ = checkpoint.load_params(os.path.join(wd, 'transformer', 'checkpoints'))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


def test_resume_on_a_different_device_count(reference, crashed, tmp_path):
  """Saved from the 8-device mesh, resumed on 2 devices: same trajectory to float32 rounding."""
  ref_wd, _, _ = reference
  wd = str(tmp_path / 'two')
  shutil.copytree(crashed, wd)
  summary = train.run(config(**MESH_2), wd)
  assert summary['resumed_from'] == 3 and summary['num_devices'] == 2
  a, b = logged(ref_wd), logged(wd)
  np.testing.assert_allclose([b[k] for k in range(1, 9)], [a[k] for k in range(1, 9)], rtol=2e-5)


def test_params_only_loader_on_one_device(reference):
  """load_model needs no mesh/optimizer/config; its params reproduce the stage's eval loss. They land
  on the default backend's first device unless a device is asked for."""
  wd, s, _ = reference
  ckpts = os.path.join(wd, 'transformer', 'checkpoints')
  _, on_3, _ = checkpoint.load_model(ckpts, device=jax.devices()[3])
  assert {d for leaf in jax.tree.leaves(on_3) for d in leaf.devices()} == {jax.devices()[3]}
  mdef, params, meta = checkpoint.load_model(ckpts)
  assert meta['step'] == 8 and meta['data_position'] == 8 * 8
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.device_set == {jax.devices()[0]}
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, mdef.abstract_params)
  ds = token_data.load(os.path.join(wd, 'tokens'))
  val = jnp.asarray(ds.tokens[ds.val_idx])
  loss = tasks.gpt_loss(ds.prefix_len, False)
  sums = jax.jit(lambda p, b: loss(mdef.bind(p), b, None))(params, {'tokens': val, 'weight': jnp.ones(len(val))})
  assert abs(float(sums['loss_sum'] / sums['count']) - s['eval_loss']) < 1e-5


def test_overfits_a_tiny_set(tmp_path):
  make_tokens(str(tmp_path), n=5, noise=0.0)   # 4 training sequences
  s = train.run(config(**MESH_1, **{'train.steps': 120, 'train.batch_size': 4, 'train.log_every': 20,
                                   'train.eval_every': 1000, 'train.checkpoint_every': 1000,
                                   'train.warmup_steps': 10, 'train.end_lr': 3e-3}), str(tmp_path))
  losses = logged(str(tmp_path))
  assert losses[1] > 2.0                 # ~ln(18) at init
  assert s['train_loss'] < 0.1, losses   # memorised


def _tiny_task(tmp_path, **kw):
  make_tokens(str(tmp_path))
  cfg = config(**kw)
  return cfg, tasks.make_task(cfg, str(tmp_path))


def test_train_step_compiles_once(reference):
  _, s, trainer = reference
  assert s['steps'] == 8
  assert trainer.trace_count == 1        # 8 steps, one trace
  assert trainer.eval_trace_count == 1   # 2 evals (padded batch), one trace


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  from nfjax import sharding
  runs, seen = [], []
  for accum in (1, 2):
    cfg, task = _tiny_task(tmp_path, **MESH_1, **{'train.grad_accum': accum, 'train.steps': 3})
    task.val = {}  # no evals: only the train step matters here
    sizes, inner = set(), task.loss

    def loss(module, batch, rng, sizes=sizes, inner=inner):
      sizes.add(batch['tokens'].shape[0])   # trace-time: the batch size the loss really sees
      return inner(module, batch, rng)
    task.loss = loss
    trainer = trainer_lib.Trainer(task, cfg.train, sharding.make_mesh(cfg.mesh), seed=0, directory=None)
    runs.append([loss for _, loss in trainer.run()['loss_history']])
    seen.append(sizes)
  assert cfg.train.batch_size == 8 and len(runs[0]) == 3
  # Accumulation really splits the batch: the loss only ever sees micro-batches of half the size ...
  assert seen == [{8}, {4}]
  # ... and every micro-batch counts: the mean over both equals the full-batch loss (a run that
  # dropped a micro-batch, or did not accumulate, would not match), at every step (params too).
  np.testing.assert_allclose(runs[1], runs[0], rtol=2e-5)
  assert len(set(runs[0])) == 3   # the loss moves, so later steps check the updated params


def test_nan_loss_stops_with_the_step(tmp_path):
  """A NaN weight in one training field: the run stops at the first step whose batch holds it."""
  from nfjax import models, sharding
  rng = np.random.default_rng(0)
  values = rng.normal(size=(24, 10)).astype(np.float32)
  values[17, 3] = np.nan
  cfg = config(**MESH_1, **{'train.steps': 20, 'train.eval_every': 1000})
  mdef = models.build(models.RegressionConfig(num_layers=1, num_heads=2, embed_dim=16, block_size=10))
  task = tasks.Task('regression', mdef, tasks.regression_loss('l1'),
                    {'values': values, 'labels': np.zeros(24, np.int32)}, {}, tokens_per_example=10)
  trainer = trainer_lib.Trainer(task, cfg.train, sharding.make_mesh(cfg.mesh), seed=0, directory=None)
  first = next(s for s in range(20) if 17 in trainer.stream.indices(s)) + 1
  with pytest.raises(trainer_lib.TrainingDiverged, match=f'is nan at step {first}[^0-9]'):
    trainer.run()


def test_data_order_is_a_pure_function_of_seed_and_step():
  arrays = {'x': np.arange(10)}
  a, b = trainer_lib.BatchStream(arrays, 4, seed=1), trainer_lib.BatchStream(arrays, 4, seed=1)
  seq = np.concatenate([a.indices(s) for s in range(5)])           # 20 examples = 2 epochs
  assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
  np.testing.assert_array_equal(b.indices(3), a.indices(3))        # a fresh stream, straight to step 3
  assert not np.array_equal(trainer_lib.BatchStream(arrays, 4, seed=2).indices(0), a.indices(0))


def test_bad_configs_fail_before_compiling(tmp_path, monkeypatch):
  class NoTrainer:
    def __init__(self, *a, **k):
      raise AssertionError("the Trainer (and compilation) must not be reached")
  monkeypatch.setattr(train, 'Trainer', NoTrainer)
  make_tokens(str(tmp_path / 'a'))
  with pytest.raises(NfjaxError, match=r'model.vocab_size=10 is smaller than the token vocabulary \(18'):
    train.run(config(**{'model.vocab_size': 10}), str(tmp_path / 'a'))
  with pytest.raises(NfjaxError, match=r'model.block_size=12 is too short.*20 tokens.*19 model inputs'):
    train.run(config(**{'model.block_size': 12}), str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'a' / 'transformer' / 'checkpoints')
  with pytest.raises(ConfigError, match='multiple of the 4 batch shards'):
    main.run(config(**{'mesh.data': 4, 'train.batch_size': 6}), str(tmp_path / 'c'), 'train')
  with pytest.raises(ConfigError, match='num_heads'):
    main.run(config(**{'model.num_heads': 3}), str(tmp_path / 'c'), 'train')
  with pytest.raises(DataError, match='run the tokenize stage first'):
    train.run(config(), str(tmp_path / 'empty'))


def _fake_fields(workdir, n=32, p=12, num_classes=2, seed=0):
  from nfjax.io import fields as wds
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  base = np.linspace(-1, 1, p)[None, :] * (labels[:, None] + 1)
  weights = (base + 0.05 * rng.normal(size=(n, p))).astype(np.float32)
  d = os.path.join(workdir, 'fields')
  arrays = {'weights': weights, 'labels': labels, 'source_index': np.arange(n), 'quality': np.full(n, 30.0, np.float32),
            'flags': np.zeros(n, np.uint8)}
  wds.write(d, arrays, {'modality': 'images', 'num_fields': n, 'params_per_field': p, 'num_classes': num_classes})
  wd.write_summary(d, {'num_fields': n})


def test_regression_transformer_stage(tmp_path):
  _fake_fields(str(tmp_path))
  s = train.run(config(**MESH_2, **{'model.kind': 'regression', 'model.regression_loss': 'mse', 'train.steps': 30,
                                   'train.log_every': 10, 'train.eval_every': 30, 'train.checkpoint_every': 30}),
                str(tmp_path))
  assert s['model'] == 'regression' and s['block_size'] == 12 and s['loss'] == 'mse'
  assert s['num_train'] + s['num_val'] == 32
  losses = logged(str(tmp_path))
  assert losses[30] < 0.5 * losses[1]   # normalised weights: loss starts near 1
  assert np.isfinite(s['eval_loss'])


def test_init_from_a_trained_checkpoint(reference, tmp_path):
  """train.init_from: parameters from another run's checkpoints, fresh optimizer and step 0."""
  from nfjax import sharding
  ref_wd, _, _ = reference
  cfg, task = _tiny_task(tmp_path, **MESH_1, **{'train.steps': 3,
                                               'train.init_from': os.path.join(ref_wd, 'transformer', 'checkpoints')})
  task.val = {}
  trainer = trainer_lib.Trainer(task, cfg.train, sharding.make_mesh(cfg.mesh), seed=0, directory=None)
  step, loss = trainer.run()['loss_history'][0]
  scratch = logged(ref_wd)
  assert step == 1 and loss < scratch[1] - 0.1 and abs(loss - scratch[8]) < 0.1


def test_init_from_without_a_finished_checkpoint_is_one_line_and_left_as_it_was(tmp_path):
  """train.init_from naming a directory with no finished checkpoint (here only an unfinished save's
  temporary directory): one error line naming the key, no traceback at exit (the source's checkpoint
  manager is closed), and the source is only read: its unfinished save is not cleaned away."""
  import subprocess
  import sys
  from conftest import ROOT
  make_tokens(str(tmp_path / 'wd'))
  src = tmp_path / 'src'
  (src / '3.orbax-checkpoint-tmp-1765000000').mkdir(parents=True)
  p = subprocess.run([sys.executable, '-m', 'nfjax.main', f'--config={ROOT}/configs/mnist.py:smoke',
                      f'--workdir={tmp_path / "wd"}', '--stages=train', f'--config.train.init_from={src}',
                      '--config.train.steps=4'], capture_output=True, text=True, cwd=str(tmp_path))
  assert p.returncode == 2, p.stderr
  errors = [ln for ln in p.stderr.splitlines() if 'error' in ln.lower() or 'Traceback' in ln]
  assert errors == [f"nfjax: error: config key train.init_from='{src}' holds no finished checkpoint: give the "
                    f"checkpoints directory of a trained GPT (WORKDIR/transformer/checkpoints), or set it to ''"], p.stderr
  assert os.listdir(src) == ['3.orbax-checkpoint-tmp-1765000000']


def test_profile_window_writes_a_trace(tmp_path):
  """train.profile_num_steps > 0: a jax.profiler trace of that window lands in transformer/profile."""
  import glob
  make_tokens(str(tmp_path))
  s = train.run(config(**MESH_1, **{'train.steps': 5, 'train.profile_start_step': 2, 'train.profile_num_steps': 2}),
                str(tmp_path))
  assert s['steps'] == 5
  traces = glob.glob(os.path.join(str(tmp_path), 'transformer', 'profile', '**', '*.xplane.pb'), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0
  with pytest.raises(ConfigError, match='train.profile_num_steps'):
    train.run(config(**{'train.profile_num_steps': -1}), str(tmp_path / 'bad'))


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(tmp_path):
  """model.dtype='bfloat16' is the matmuls' dtype only: parameters, Adam moments and checkpoints stay float32."""
  cfg, task = _tiny_task(tmp_path, **MESH_1, **{'model.dtype': 'bfloat16'})
  from nfjax import sharding
  trainer = trainer_lib.Trainer(task, cfg.train, sharding.make_mesh(cfg.mesh), 0)
  state = trainer.init_state()
  for step in range(2):
    state, m = trainer.step(state, trainer.stream.batch(step))
  assert np.isfinite(float(m['loss']))
  floats = [x for x in jax.tree.leaves((state['params'], state['opt_state'])) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > len(jax.tree.leaves(state['params'])) and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  logits = task.model.bind(state['params'])(jnp.asarray(task.train['tokens'][:2, :-1]))
  assert logits.dtype == jnp.float32


def test_class_dropout_off_leaves_task_batches_and_fingerprint_as_before(tmp_path):
  """train.class_dropout = 0 (the default) is today's training exactly: no null class in the model (nor
  in its saved dict), batches without the drop mask (the same compiled step), and the train stage's
  fingerprint of a config that never had the key."""
  from nfjax import config as config_lib
  from nfjax import models
  cfg, task = _tiny_task(tmp_path)
  assert cfg.train.class_dropout == 0.0 and task.augment is None
  assert task.model.cfg.null_class == -1 and task.model.cfg.vocab_size == 18 and task.model.cfg.cond_classes == 3
  assert 'null_class' not in models.to_dict(task.model.cfg)
  assert set(trainer_lib.BatchStream(task.train, 8, 0, task.augment).batch(5)) == {'tokens', 'weight'}
  fp = config_lib.fingerprint(cfg, train.KEYS)
  old = config(**MESH_1)
  with old.unlocked():
    del old.train['class_dropout']     # a config from before the key existed
  assert fp == config_lib.fingerprint(old, train.KEYS) and 'train.class_dropout' not in fp
  assert config_lib.fingerprint(config(**{'train.class_dropout': 0.1}), train.KEYS)['train.class_dropout'] == 0.1


def test_class_dropout_adds_a_null_class_and_draws_from_seed_and_step(tmp_path):
  from nfjax import models
  from nfjax.configs import checks
  cfg, task = _tiny_task(tmp_path, **{'train.class_dropout': 0.5})
  m = task.model.cfg
  # The null class is the class token after the data's last one: its own embedding rows and bias row.
  assert m.null_class == 18 and m.vocab_size == 19 and m.cond_classes == 4 and m.cond_first_token == 15
  assert models.config_from_dict(models.to_dict(m)) == m
  with pytest.raises(NfjaxError, match=r'model.vocab_size=18 is smaller.*\+ 1 for the null class'):
    tasks.make_task(config(**{'train.class_dropout': 0.5, 'model.vocab_size': 18}), str(tmp_path))
  with pytest.raises(NfjaxError, match=r"train.class_dropout=0.5 needs class tokens.*\['sos'\]"):
    tasks.model_config(cfg, vocab_size=15, seq_len=19, prefix=('sos',))
  with pytest.raises(ConfigError, match=r'train.class_dropout=1.0 must be in \[0, 1\)'):
    checks.validate(config(**{'train.class_dropout': 1.0}), ('train',))
  # Which rows lose their class: a pure function of (seed, step), about p of them.
  stream = lambda seed: trainer_lib.BatchStream(task.train, 8, seed, task.augment)  # noqa: E731
  a = np.concatenate([stream(1).batch(s)['null_rows'] for s in range(200)])
  np.testing.assert_array_equal(stream(1).batch(7)['null_rows'], a[56:64])   # a fresh stream, straight to step 7
  assert not np.array_equal(np.concatenate([stream(2).batch(s)['null_rows'] for s in range(200)]), a)
  assert 0.45 < a.mean() < 0.55
  # The loss feeds the null class in place of the class token; the targets keep the class.
  from nfjax.models.gpt import cross_entropy
  rng = np.random.default_rng(0)   # any parameters do (and are quicker than the model's init)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), task.model.abstract_params)
  toks = jnp.asarray(task.train['tokens'][:4])
  drop = np.array([True, False, True, False])
  loss = jax.jit(lambda p, d: task.loss(task.model.bind(p), {'tokens': toks, 'weight': jnp.ones(4), 'null_rows': d},
                                        None)['loss_sum'])
  x = toks[:, :-1].at[:, 1].set(jnp.where(jnp.asarray(drop), 18, toks[:, 1]))
  ref = jax.jit(lambda p: cross_entropy(task.model.bind(p)(x), toks[:, 1:])[:, 1:].sum())  # loss from slot 1
  np.testing.assert_allclose(float(loss(params, drop)), float(ref(params)), rtol=1e-6)
  assert float(loss(params, ~drop)) != float(loss(params, drop))


def test_class_bias_prior_pools_the_histograms_of_thin_classes(tmp_path):
  """model.class_bias_prior: each class's per-slot counts get that many pseudo-counts spread as the pooled
  histogram of every class, which predicts held-out sequences of thin classes better than add-0.1."""
  import types
  from nfjax import config as config_lib
  from nfjax.configs import checks
  cfg, task = _tiny_task(tmp_path, **{'model.class_bias_init': 'histogram', 'model.class_bias_prior': 5.0})
  wcb = task.init_params()['wcb']
  toks, v = task.train['tokens'], wcb.shape[-1]
  for t in (1, 7, 17):
    pooled = np.bincount(toks[:, t + 1], minlength=v) + 0.01
    for c in range(3):
      counts = np.bincount(toks[toks[:, 1] == 15 + c, t + 1], minlength=v) + 5.0 * pooled / pooled.sum()
      np.testing.assert_allclose(np.exp(wcb[c, t]), counts / counts.sum(), rtol=1e-5)
  # Twenty classes of 6 sequences each, every class drawing its slots from one shared distribution:
  # the class tables alone overfit, the pooled prior generalises.
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(12, 0.3), size=10)             # [slot, code]
  def draw(n):
    seq = np.stack([rng.choice(12, size=n, p=p) for p in probs], 1)
    cls = np.repeat(np.arange(20), n // 20)
    return np.concatenate([np.full((n, 1), 12), 14 + cls[:, None], seq], 1), cls
  (train_toks, _), (held, held_cls) = draw(120), draw(2000)
  m = types.SimpleNamespace(cond_classes=20, block_size=11, vocab_size=34, cond_first_token=14, null_class=-1)
  def held_ce(table):
    return -np.mean(table[held_cls[:, None], np.arange(1, 11)[None], held[:, 2:]])
  plain, pooled_ce = (held_ce(tasks.class_histogram_bias(train_toks, m, 1, prior=a)) for a in (0.0, 10.0))
  assert pooled_ce < plain - 0.2, (pooled_ce, plain)
  assert 'class_bias_prior' not in config_lib.fingerprint(config(**{'model.class_bias_init': 'histogram'}),
                                                          train.KEYS)['model']
  assert config_lib.fingerprint(cfg, train.KEYS)['model']['class_bias_prior'] == 5.0
  with pytest.raises(ConfigError, match=r"model.class_bias_prior=-1.0 must be >= 0"):
    checks.validate(config(**{'model.class_bias_init': 'histogram', 'model.class_bias_prior': -1.0}), ('train',))
  with pytest.raises(ConfigError, match=r"model.class_bias_prior=5.0 smooths the histograms"):
    checks.validate(config(**{'model.class_bias_prior': 5.0}), ('train',))


def test_class_bias_init_histogram_starts_at_the_per_slot_histograms(tmp_path):
  """model.class_bias_init='histogram': wcb holds each class's per-slot log token frequencies of the
  training split (the null class's row pools every class), the first sharded step starts from them
  (a far lower loss than zeros), and the default leaves the fingerprint as before."""
  from nfjax import config as config_lib
  from nfjax.configs import checks
  from nfjax.models.gpt import cross_entropy
  cfg, task = _tiny_task(tmp_path, **{'model.class_bias_init': 'histogram', 'train.class_dropout': 0.5})
  m = task.model.cfg
  wcb = task.init_params()['wcb']
  assert wcb.shape == (m.cond_classes, m.block_size, m.vocab_size) == (4, 19, 19)
  toks = task.train['tokens']
  for row, rows in [(c, toks[:, 1] == 15 + c) for c in range(3)] + [(3, np.ones(len(toks), bool))]:
    for t in (1, 7, 18):   # input position t predicts token t + 1
      counts = np.bincount(toks[rows, t + 1], minlength=19) + 0.1
      np.testing.assert_allclose(np.exp(wcb[row, t]), counts / counts.sum(), rtol=1e-5)
  # The trainer starts from the table on any mesh: loss at step 1 ~ the histogram's cross-entropy.
  hist_ce = float(np.mean(cross_entropy(jnp.asarray(wcb[toks[:, 1] - 15][:, 1:]), jnp.asarray(toks[:, 2:]))))
  first = {}
  for init in ('zeros', 'histogram'):
    w = tmp_path / init
    make_tokens(str(w))
    train.run(config(**MESH_8, **{'model.class_bias_init': init, 'train.steps': 1, 'train.warmup_steps': 0,
                                  'train.decay_steps': 1}), str(w))
    first[init] = logged(str(w))[1]
  assert first['histogram'] < first['zeros'] - 1.0 and abs(first['histogram'] - hist_ce) < 0.3, (first, hist_ce)
  fp = config_lib.fingerprint(config(), train.KEYS)
  assert 'class_bias_init' not in fp['model']
  assert config_lib.fingerprint(config(**{'model.class_bias_init': 'histogram'}), train.KEYS)['model'][
      'class_bias_init'] == 'histogram'
  with pytest.raises(ConfigError, match=r"model.class_bias_init='hist' is not one of"):
    checks.validate(config(**{'model.class_bias_init': 'hist'}), ('train',))
  with pytest.raises(ConfigError, match=r"model.class_bias_init='histogram' starts the class x position bias"):
    checks.validate(config(**{'model.class_bias_init': 'histogram', 'model.class_bias': False}), ('train',))


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_the_directory(tmp_path, monkeypatch):
  import logging
  from nfjax.errors import NfjaxError
  directory = str(tmp_path / 'ckpt')
  ck = checkpoint.Checkpointer(directory, async_save=False)
  params, opt_state = {'w': jnp.ones((4, 4))}, {'m': jnp.zeros((4, 4))}
  full = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "x": Failed writing')

  def fail(*a, **k):
    raise full

  def mismatch(*a, **k):
    raise ValueError('a shape mismatch')
  monkeypatch.setattr(ck._mngr, 'save', fail)
  with pytest.raises(NfjaxError, match=r"cannot write the checkpoint of step 2 in .*ckpt: no space left on its disk\. "
                                       r"Free space there"):
    ck.save(2, params, opt_state, {'step': 2})
  monkeypatch.setattr(ck._mngr, 'save', mismatch)
  with pytest.raises(ValueError, match='a shape mismatch'):   # anything else is left as it is
    ck.save(2, params, opt_state, {'step': 2})
  monkeypatch.setattr(ck._mngr, 'wait_until_finished', fail)
  with pytest.raises(NfjaxError, match='no space left'):
    ck.wait()
  ck.close(failed=True)            # the run already ends with that error: closing does not raise it again
  with pytest.raises(NfjaxError, match='no space left'):
    ck.close()                     # a last save that failed is not lost in the close
  # Orbax's own reports of such a save (from its background threads) are left to that one line
  orbax_record = logging.LogRecord('absl', logging.ERROR, '/x/orbax/checkpoint/future.py', 1,
                                   '_SignalingThread.run() raised an exception: %s', (full,), None)
  other = logging.LogRecord('absl', logging.ERROR, '/x/orbax/checkpoint/future.py', 1, 'something else', (), None)
  assert not checkpoint._not_a_write_failure(orbax_record) and checkpoint._not_a_write_failure(other)
