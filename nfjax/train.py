"""The train stage: WORKDIR/tokens -> WORKDIR/transformer, and the training loop it is built on.

`run(config, workdir)` trains `config.model` (a GPT on the token sequences, or the regression
transformer on the fitted weights) for `train.steps` optimizer steps and writes

  transformer/checkpoints/<step>/   Orbax checkpoints (params, opt_state, meta; nfjax/checkpoint.py)
  transformer/model.json            the resolved model config + the data it was sized for
  transformer/metrics.jsonl         train metrics every `train.log_every` steps, eval metrics every
                                    `train.eval_every` steps (also TensorBoard in transformer/tensorboard)
  transformer/summary.json          written last: steps, train_loss, eval_loss, tokens_per_sec, params, ...

The reusable part is `Trainer`: give it a `Task` (a ModelDef, a loss, numpy train/val arrays) and it
runs the compiled, sharded, donated train step with resume, eval, logging and checkpoints.

Semantics worth knowing:
* Data order is a pure function of (seed, step): example k of the infinite stream is row
  perm_e[k mod N] with e = k // N and perm_e a permutation seeded by (seed, e). Step s reads
  stream examples [s*B, (s+1)*B). Dropout keys are fold_in(run key, step). So a run killed anywhere
  and started again with the same command continues the exact loss trajectory.
* The state is created abstract-first (eval_shape -> shardings -> jitted init), the step is
  `jax.jit(..., in_shardings, out_shardings, donate_argnums=0)` compiled once ahead of time.
* Metrics are fetched one step late (the device always has the next step queued); a non-finite
  loss stops the run with an NfjaxError naming the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfjax import checkpoint as ckpt_lib
from nfjax import models, sharding
from nfjax.data import tokens as token_data
from nfjax.errors import ConfigError, DataError, NfjaxError
from nfjax.models import layers
from nfjax.models.gpt import cross_entropy
from nfjax.models.regression import LOSSES, regression_error
from nfjax.utils import config as cfg_utils
from nfjax.utils import io
from nfjax.utils.logging import MetricsWriter, Progress, fmt_seconds, is_main_process, log
from nfjax.utils.stage import StageDir

STAGE = 'train'
DIRNAME = 'transformer'
MODEL_KINDS = ('gpt', 'regression')

# train.* keys that change what is trained (the others -- log/eval/checkpoint cadence -- may change
# between a run and its resumption).
TRAIN_KEYS = ('steps', 'batch_size', 'lr', 'warmup_steps', 'decay_steps', 'end_lr', 'b1', 'b2', 'eps',
              'weight_decay', 'decay_embeddings', 'grad_clip', 'grad_accum', 'loss_on_prefix', 'init_from')


def fingerprint_keys(config) -> tuple[str, ...]:
  from nfjax import fit
  keys = ['seed', *fit.fingerprint_keys(config)]
  if 'tokenize' in config:
    keys.append('tokenize')
  keys.append('model')
  keys += [f'train.{k}' for k in TRAIN_KEYS]
  return tuple(dict.fromkeys(keys))


# ------------------------------------------------------------------------------------------------
# Config

def validate(config) -> None:
  """Checks that need neither data nor compilation."""
  m, t = config.model, config.train
  cfg_utils.check_choice(config, 'model.kind', MODEL_KINDS)
  for key in ('model.num_layers', 'model.num_heads', 'model.embed_dim', 'model.mlp_ratio'):
    cfg_utils.check_positive(config, key)
  for key in ('model.vocab_size', 'model.block_size'):
    cfg_utils.check_positive(config, key, allow_minus_one=True)
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config key model.dropout={m.dropout!r} must be in [0, 1)")
  if m.embed_dim % m.num_heads:
    raise ConfigError(f"config key model.embed_dim={m.embed_dim} is not a multiple of model.num_heads={m.num_heads}")
  cfg_utils.check_choice(config, 'model.position', layers.POSITIONS)
  if m.position == 'rope' and (m.embed_dim // m.num_heads) % 2:
    raise ConfigError(f"model.position='rope' needs an even head dimension; embed_dim/num_heads = "
                      f"{m.embed_dim // m.num_heads}")
  cfg_utils.check_choice(config, 'model.dtype', tuple(layers.DTYPES))
  cfg_utils.check_choice(config, 'model.regression_loss', LOSSES)
  for key in ('train.steps', 'train.batch_size', 'train.lr', 'train.grad_accum', 'train.eval_every',
              'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints'):
    cfg_utils.check_positive(config, key)
  for key in ('train.warmup_steps', 'train.end_lr', 'train.weight_decay', 'train.grad_clip', 'train.eps'):
    cfg_utils.check_positive(config, key, allow_zero=True)
  cfg_utils.check_positive(config, 'train.decay_steps', allow_minus_one=True)
  cfg_utils.check_positive(config, 'train.eval_batches', allow_minus_one=True)
  for key in ('train.b1', 'train.b2'):
    if not 0.0 <= cfg_utils.get(config, key) < 1.0:
      raise ConfigError(f"config key {key}={cfg_utils.get(config, key)!r} must be in [0, 1)")
  decay = t.steps if t.decay_steps == -1 else t.decay_steps
  if decay <= t.warmup_steps:
    raise ConfigError(f"train.decay_steps ({decay}, -1 = train.steps) must exceed train.warmup_steps "
                      f"({t.warmup_steps})")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.grad_accum={t.grad_accum}")
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh)))
  shards = shape['data'] * shape['fsdp']
  micro = t.batch_size // t.grad_accum
  if micro % shards:
    raise ConfigError(f"the micro-batch (train.batch_size / train.grad_accum = {micro}) must be a multiple of the "
                      f"{shards} batch shards of mesh {shape} (data x fsdp)")


def model_config(config, *, vocab_size: int | None = None, seq_len: int | None = None,
                 num_params: int | None = None, num_classes: int = 0,
                 prefix: tuple = ('sos', 'class'), class_token0: int = -1) -> models.TransformerConfig:
  """The model config for this data; raises NfjaxError when the model cannot hold the data.

  GPT: sequences of seq_len tokens give seq_len-1 inputs, every one a training target, so
  block_size must be >= seq_len-1 and vocab_size >= the data's vocabulary (-1 = exactly that).
  Regression: a field of num_params weights gives num_params inputs (start + P-1 weights).
  """
  m = config.model
  common = dict(num_layers=int(m.num_layers), num_heads=int(m.num_heads), embed_dim=int(m.embed_dim),
                mlp_ratio=int(m.mlp_ratio), dropout=float(m.dropout), block_norm=not bool(m.nef_gpt_parity),
                position=str(m.position), rope_base=float(m.rope_base), bias=bool(m.bias),
                ln_eps=float(m.ln_eps), init_std=float(m.init_std), dtype=str(m.dtype))
  if m.kind == 'gpt':
    need = seq_len - 1
    block = need if m.block_size == -1 else int(m.block_size)
    if block < need:
      raise NfjaxError(
          f"model.block_size={block} is too short for the token sequences: they have {seq_len} tokens "
          f"(prefix + weights), i.e. {need} model inputs, and every weight must be a training target. "
          f"Set model.block_size={need} or -1 (= fit the data). (NeF-GPT's 561 never trained on the last weight.)")
    vocab = vocab_size if m.vocab_size == -1 else int(m.vocab_size)
    if vocab < vocab_size:
      raise NfjaxError(f"model.vocab_size={vocab} is smaller than the token vocabulary ({vocab_size} ids: codes, "
                       f"specials, classes; see tokens/vocab.json). Set model.vocab_size=-1 to fit it.")
    cond = -1
    conditioned = 'class' in prefix
    if not conditioned and (bool(m.class_embedding) or bool(m.class_bias)):
      log(STAGE, f"the tokens' prefix is {list(prefix)} (no class token: one class, or tokenize.class_token='no'): "
                 f"model.class_embedding / class_bias have nothing to condition on and are off")
    if bool(m.class_embedding) and conditioned:
      cond = list(prefix).index('class')
    classes = 0
    if bool(m.class_bias) and conditioned:
      if cond < 0 or num_classes < 1 or class_token0 < 0:
        raise NfjaxError("model.class_bias=True needs model.class_embedding=True and class tokens in the sequences")
      classes = int(num_classes)
    return models.GPTConfig(**common, block_size=block, vocab_size=vocab, tie_embeddings=bool(m.tie_embeddings),
                            cond_position=cond, cond_classes=classes,
                            cond_first_token=class_token0 if classes else 0)
  need = num_params
  block = need if m.block_size == -1 else int(m.block_size)
  if block < need:
    raise NfjaxError(f"model.block_size={block} is too short for fields of {num_params} weights (the regression "
                     f"transformer reads start + {num_params - 1} weights). Set model.block_size=-1.")
  return models.RegressionConfig(**common, block_size=block, num_classes=num_classes, loss=str(m.regression_loss))


def make_optimizer(t, mdef: models.ModelDef):
  """AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

  Decay applies to kernels only (plus embeddings with train.decay_embeddings); never to biases
  or norms. After decay_steps the learning rate stays at end_lr (NeF-GPT's min_lr).
  """
  decay_steps = int(t.steps if t.decay_steps == -1 else t.decay_steps)
  base = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=float(t.lr),
                                            warmup_steps=int(t.warmup_steps), decay_steps=decay_steps,
                                            end_value=float(t.end_lr))
  # The update of step s (0-based) uses base(s + 1): no wasted first step at lr 0, and the last
  # step of a full-length decay runs at end_lr.
  schedule = lambda count: base(count + 1)  # noqa: E731
  decay_kinds = ('kernel', 'embedding') if t.decay_embeddings else ('kernel',)
  mask = mdef.tree_from_paths(lambda p: models.param_kind(p) in decay_kinds)
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                           weight_decay=float(t.weight_decay), mask=mask))
  return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------------------------
# Data

class BatchStream:
  """Batches as a pure function of (seed, step): see the module docstring."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))
    if self.n == 0:
      raise DataError("the training split is empty")
    self.batch_size, self.seed = batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(self.n)
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    k = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
    epochs = k // self.n
    out = np.empty_like(k)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._perm(int(e))[k[sel] % self.n]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    out = {k: v[idx] for k, v in self.arrays.items()}
    out['weight'] = np.ones((self.batch_size,), np.float32)
    return out


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, max_batches: int) -> list[dict[str, np.ndarray]]:
  """The first max_batches*batch_size val examples (-1 = all) in fixed batches; the last one is
  padded with weight-0 rows so every batch has the compiled shape."""
  n = len(next(iter(arrays.values()))) if arrays else 0
  if max_batches != -1:
    n = min(n, max_batches * batch_size)
  out = []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, lo + batch_size)
    w = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    out.append({**{k: v[idx] for k, v in arrays.items()}, 'weight': w})
  return out


# ------------------------------------------------------------------------------------------------
# Tasks: a model, its loss and its data

@dataclasses.dataclass
class Task:
  """What the Trainer trains.

  loss(module, batch, rng) returns sums over the batch: {'loss_sum', 'count', ...more sums}; the
  training loss is loss_sum / count. rng is None for evaluation (no dropout). Batches are dicts of
  numpy arrays with a leading example axis, plus 'weight' [B] (0 marks eval padding).
  """
  name: str
  model: models.ModelDef
  loss: Callable
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  tokens_per_example: int
  info: dict = dataclasses.field(default_factory=dict)


def gpt_loss(prefix_len: int, loss_on_prefix: bool) -> Callable:
  """Next-token cross-entropy. Inputs tokens[:, :-1], targets tokens[:, 1:]; targets inside the
  prefix (e.g. the class token after SOS) count only with loss_on_prefix (NeF-GPT: yes)."""
  first = 0 if loss_on_prefix else max(0, prefix_len - 1)

  def loss(module, batch, rng):
    tokens = batch['tokens']
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = module(x, rng=rng)
    ce = cross_entropy(logits, y)
    w = (jnp.arange(y.shape[1]) >= first).astype(jnp.float32)[None, :] * batch['weight'][:, None]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {'loss_sum': jnp.sum(ce * w), 'count': jnp.sum(w), 'correct': jnp.sum(correct * w)}
  return loss


def regression_loss(kind: str) -> Callable:
  def loss(module, batch, rng):
    values = batch['values']
    pred = module(values[:, :-1], batch['labels'], rng=rng)
    err = regression_error(pred, values, kind)
    w = jnp.broadcast_to(batch['weight'][:, None], err.shape)
    return {'loss_sum': jnp.sum(err * w), 'count': jnp.sum(w)}
  return loss


def _hash_arrays(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def gpt_task(config, workdir: str) -> Task:
  directory = os.path.join(workdir, 'tokens')
  try:
    ds = token_data.load(directory)
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  n, seq_len = ds.tokens.shape
  if seq_len < 2:
    raise DataError(f"token sequences in {directory} have length {seq_len}; need at least 2")
  used = int(ds.tokens.max()) + 1 if ds.tokens.size else 0
  vocab_size = max(ds.vocab.vocab_size, used)
  num_classes = ds.vocab.num_classes
  cfg = model_config(config, vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes,
                     prefix=tuple(ds.meta.get('prefix', ['sos', 'class'][:ds.prefix_len])),
                     class_token0=ds.vocab.class_token(0) if num_classes else -1)
  if used > cfg.vocab_size:
    raise NfjaxError(f"token id {used - 1} in {directory} does not fit model.vocab_size={cfg.vocab_size}")
  mdef = models.build(cfg)
  tokens = np.asarray(ds.tokens, np.int32)
  train = {'tokens': tokens[ds.train_idx]}
  val = {'tokens': tokens[ds.val_idx]}
  info = {'data': 'tokens', 'vocab': ds.vocab.to_dict(), 'seq_len': int(seq_len), 'prefix_len': ds.prefix_len,
          'num_train': int(len(ds.train_idx)), 'num_val': int(len(ds.val_idx)),
          'data_hash': _hash_arrays(tokens, ds.train_idx, ds.val_idx)}
  loss = gpt_loss(ds.prefix_len, bool(config.train.loss_on_prefix))
  return Task('gpt', mdef, loss, train, val, tokens_per_example=seq_len - 1, info=info)


def regression_task(config, workdir: str) -> Task:
  from nfjax.data import weights as wds
  fields_dir = os.path.join(workdir, 'fields')
  if not wds.is_complete(fields_dir):
    raise DataError(f"no finished weight dataset at {fields_dir}: run the fit stage first")
  fds = wds.load(fields_dir)
  tok_dir = os.path.join(workdir, 'tokens')
  if os.path.exists(os.path.join(tok_dir, 'summary.json')):  # the GPT's split, for comparable numbers
    tds = token_data.load(tok_dir)
    train_rows, val_rows = tds.field_index[tds.train_idx], tds.field_index[tds.val_idx]
    split = 'tokens'
  else:
    good = fds.good()
    rng = np.random.default_rng([int(config.seed), 0x5B117])
    perm = good[rng.permutation(len(good))]
    n_val = max(1, len(perm) // 10) if len(perm) > 1 else 0
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    split = 'seeded 90/10 of the unflagged fields'
  w = np.asarray(fds.weights, np.float32)
  mean, std = float(w[train_rows].mean()), float(w[train_rows].std() + 1e-8)
  norm = (w - mean) / std
  num_classes = int(fds.meta.get('num_classes', 0) or 0)
  labels = np.asarray(fds.labels, np.int32) if num_classes else np.zeros(len(w), np.int32)
  cfg = model_config(config, num_params=w.shape[1], num_classes=num_classes)
  mdef = models.build(cfg)
  train = {'values': norm[train_rows], 'labels': labels[train_rows]}
  val = {'values': norm[val_rows], 'labels': labels[val_rows]}
  info = {'data': 'fields', 'split': split, 'num_params': int(w.shape[1]), 'value_mean': mean, 'value_std': std,
          'num_train': int(len(train_rows)), 'num_val': int(len(val_rows)),
          'data_hash': _hash_arrays(norm, train_rows, val_rows)}
  return Task('regression', mdef, regression_loss(cfg.loss), train, val, tokens_per_example=w.shape[1], info=info)


def make_task(config, workdir: str) -> Task:
  return gpt_task(config, workdir) if config.model.kind == 'gpt' else regression_task(config, workdir)


# ------------------------------------------------------------------------------------------------
# The trainer

class TrainingDiverged(NfjaxError):
  """A non-finite loss."""


class Trainer:
  """Compiled, sharded training of a Task with resume, eval, logging and Orbax checkpoints.

  `train_cfg` is the `config.train` section. `directory` receives checkpoints/ and metrics; None
  = no checkpoints and no files (benchmarks, tests). `trace_count` counts traces of the train step.
  """

  def __init__(self, task: Task, train_cfg, mesh, seed: int, directory: str | None = None,
               model_meta: dict | None = None):
    self.task, self.t, self.mesh, self.seed = task, train_cfg, mesh, int(seed)
    self.directory = directory
    self.mdef = task.model
    self.batch_size = int(train_cfg.batch_size)
    self.accum = int(train_cfg.grad_accum)
    self.total_steps = int(train_cfg.steps)
    self.tokens_per_step = self.batch_size * task.tokens_per_example
    self.model_meta = model_meta or models.to_dict(self.mdef.cfg)
    self.tx, self.schedule = make_optimizer(train_cfg, self.mdef)
    self.trace_count = 0
    self.eval_trace_count = 0
    self.compile_seconds = 0.0

    # Abstract-first state: shapes from eval_shape, shardings from logical axes, then a jitted init.
    rep = sharding.replicated(mesh)
    self.param_shardings = self.mdef.shardings(mesh)
    abstract_opt = jax.eval_shape(self.tx.init, self.mdef.abstract_params)
    self.opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                               transform_non_params=lambda _: rep)
    self.state_shardings = {'step': rep, 'rng': rep, 'params': self.param_shardings, 'opt_state': self.opt_shardings}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        {'step': jax.ShapeDtypeStruct((), jnp.int32), 'rng': jax.ShapeDtypeStruct((2,), jnp.uint32),
         'params': self.mdef.abstract_params, 'opt_state': abstract_opt}, self.state_shardings)

    self.stream = BatchStream(task.train, self.batch_size, self.seed)
    sample = self.stream.batch(0)
    self.batch_shardings = {k: sharding.named(mesh, 'batch', *([None] * (v.ndim - 1))) for k, v in sample.items()}
    self.abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                           for k, v in sample.items()}
    self.eval_data = eval_batches(task.val, self.batch_size // self.accum, int(train_cfg.eval_batches))
    self._step_fn = None
    self._eval_fn = None

  # -- compiled functions ------------------------------------------------------------------------

  def _init_state(self, key):
    params = self.mdef.init(jax.random.fold_in(key, 0))
    return {'step': jnp.zeros((), jnp.int32), 'rng': jax.random.fold_in(key, 1), 'params': params,
            'opt_state': self.tx.init(params)}

  def init_state(self):
    init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    return init(jax.random.PRNGKey(self.seed))

  def _grads(self, params, batch, rng):
    def loss_fn(p, b, key):
      sums = self.task.loss(self.mdef.bind(p), b, key)
      return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.accum == 1:
      (_, sums), grads = grad_fn(params, batch, rng)
      return grads, sums
    a = self.accum

    def split(x):  # row i*a + j -> micro-batch j: every micro-batch spans all batch shards
      return jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      g_acc, s_acc = carry
      mb, j = xs
      (_, sums), g = grad_fn(params, mb, jax.random.fold_in(rng, j))
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_s = jax.tree.map(lambda x: jnp.zeros((), jnp.float32),
                           jax.eval_shape(lambda: self.task.loss(self.mdef.bind(params), jax.tree.map(lambda x: x[0], micro), None)))
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micro, jnp.arange(a)))
    return jax.tree.map(lambda g: g / a, grads), sums

  def _train_step(self, state, batch):
    self.trace_count += 1  # Python side effect: runs once per trace
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    params = state['params']
    grads, sums = self._grads(params, batch, rng)
    updates, opt_state = self.tx.update(grads, state['opt_state'], params)
    params = optax.apply_updates(params, updates)
    count = jnp.maximum(sums['count'], 1.0)
    metrics = {'loss': sums['loss_sum'] / count, 'grad_norm': optax.tree.norm(grads), 'lr': self.schedule(step)}
    if 'correct' in sums:
      metrics['accuracy'] = sums['correct'] / count
    return {'step': step + 1, 'rng': state['rng'], 'params': params, 'opt_state': opt_state}, metrics

  def _eval_step(self, params, batch):
    self.eval_trace_count += 1
    return self.task.loss(self.mdef.bind(params), batch, None)

  def compile(self):
    """Compile the train step (and eval step) once, ahead of time, for the abstract state/batch."""
    if self._step_fn is None:
      t0 = time.perf_counter()
      rep = sharding.replicated(self.mesh)
      step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                     out_shardings=(self.state_shardings, rep), donate_argnums=0)
      self._step_fn = step.lower(self.abstract_state, self.abstract_batch).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self._step_fn

  def compile_eval(self):
    """Compile the eval step once (on first use: runs without evals never pay for it)."""
    if self._eval_fn is None and self.eval_data:
      t0 = time.perf_counter()
      rep = sharding.replicated(self.mesh)
      ev = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings), out_shardings=rep)
      abstract_eval = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                       for k, v in self.eval_data[0].items()}
      self._eval_fn = ev.lower(self.abstract_state['params'], abstract_eval).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self._eval_fn

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host batch (the same global batch on every process) -> global arrays on the mesh."""
    return {k: jax.make_array_from_callback(v.shape, self.batch_shardings[k], lambda idx, v=v: v[idx])
            for k, v in batch.items()}

  def step(self, state, batch_np):
    return self.compile()(state, self.put(batch_np))

  def evaluate(self, params) -> dict[str, float]:
    if not self.eval_data:
      return {}
    self.compile_eval()
    totals: dict[str, float] = {}
    for b in self.eval_data:
      sums = jax.device_get(self._eval_fn(params, self.put(b)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop('count'), 1.0)
    out = {'eval_loss': totals.pop('loss_sum') / count}
    if 'correct' in totals:
      out['eval_accuracy'] = totals.pop('correct') / count
    return out

  # -- the loop ----------------------------------------------------------------------------------

  def _meta(self, step: int, rng) -> dict:
    return {'step': int(step), 'rng': [int(x) for x in np.asarray(jax.device_get(rng))],
            'data_position': int(step) * self.batch_size, 'seed': self.seed, 'batch_size': self.batch_size,
            'model': self.model_meta, 'task': self.task.name, 'data_hash': self.task.info.get('data_hash')}

  def _restore_or_init(self, ckpt: ckpt_lib.Checkpointer | None):
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:
      params, opt_state, meta = ckpt.restore(latest, self.abstract_state['params'], self.abstract_state['opt_state'])
      ours = self._meta(0, np.zeros(2, np.uint32))
      for key in ('seed', 'batch_size', 'data_hash'):
        if meta.get(key) != ours[key]:
          raise NfjaxError(f"the checkpoint at step {latest} in {ckpt.directory} was written with {key}="
                           f"{meta.get(key)!r}, this run has {ours[key]!r}; use a new --workdir or delete "
                           f"{os.path.dirname(ckpt.directory)}")
      rep = sharding.replicated(self.mesh)
      state = {'step': jax.device_put(jnp.asarray(meta['step'], jnp.int32), rep),
               'rng': jax.device_put(jnp.asarray(meta['rng'], jnp.uint32), rep),
               'params': params, 'opt_state': opt_state}
      return state, int(meta['step'])
    state = self.init_state()
    init_from = str(getattr(self.t, 'init_from', '') or '')
    if init_from:
      src = ckpt_lib.Checkpointer(init_from, async_save=False)
      step = src.latest_step()
      if step is None:
        raise NfjaxError(f"train.init_from={init_from!r} holds no checkpoint")
      params, _ = src.restore_params(step, self.abstract_state['params'])
      src.close()
      state = {**state, 'params': params}
      log(STAGE, f"initialised the parameters from {init_from} step {step}")
    return state, 0

  def run(self, hooks: Iterable[Callable[[int, 'Trainer'], None]] = ()) -> dict:
    """Train to train.steps (resuming from the latest checkpoint); returns the final figures.

    hooks: called as hook(step, trainer) after each step is dispatched (step = steps done).
    """
    t_start = time.perf_counter()
    ckpt = None
    if self.directory is not None:
      ckpt = ckpt_lib.Checkpointer(os.path.join(self.directory, 'checkpoints'), keep=int(self.t.keep_checkpoints),
                                   async_save=bool(self.t.async_checkpoints))
    writer = None
    try:
      state, start = self._restore_or_init(ckpt)
      if start:
        log(STAGE, f"resuming from the checkpoint at step {start}/{self.total_steps}")
      if self.directory is not None:
        _truncate_metrics(os.path.join(self.directory, 'metrics.jsonl'), start)
        writer = MetricsWriter(self.directory)
      return self._run(state, start, ckpt, writer, list(hooks), t_start)
    finally:
      if writer is not None:
        writer.close()
      if ckpt is not None:
        ckpt.close()

  def _run(self, state, start, ckpt, writer, hooks, t_start) -> dict:
    t = self.t
    total = self.total_steps
    self.compile()
    log(STAGE, f"compiled the train step in {self.compile_seconds:.1f}s")
    progress = Progress(STAGE, total, 'steps')
    progress.start(start)
    excluded = 0.0  # eval + checkpoint seconds, not counted in tokens/s
    window: list[dict] = []
    last = {'train_loss': None, 'eval': {}}
    loss_history: list[tuple[int, float]] = []

    def tokens_per_sec(done):
      busy = progress.elapsed - excluded
      return (done - start) * self.tokens_per_step / busy if busy > 0 and done > start else float('nan')

    def consume(done, metrics):
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not math.isfinite(m['loss']):
        raise TrainingDiverged(
            f"the training loss is {m['loss']} at step {done} (lr {m['lr']:.3g}, grad norm {m['grad_norm']:.3g}); "
            f"stopping. Lower train.lr, raise train.warmup_steps or set train.grad_clip; the run resumes from "
            f"the last checkpoint ({ckpt.latest_step() if ckpt is not None else None}) with the same command.")
      window.append(m)
      loss_history.append((done, m['loss']))
      if done <= start + 3 or done % t.log_every == 0 or done == total:
        avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        avg['lr'] = m['lr']
        tps = tokens_per_sec(done)
        extra = (f"loss {avg['loss']:.4f}" + (f" acc {avg['accuracy']:.3f}" if 'accuracy' in avg else '')
                 + f"  lr {m['lr']:.3g}  {tps:,.0f} tokens/s")
        progress.update(done, extra)
        if writer is not None:
          writer.write(done, **avg, tokens_per_sec=tps)
        last['train_loss'] = avg['loss']
        window.clear()

    pending = None
    for step in range(start, total):
      batch = self.put(self.stream.batch(step))
      state, metrics = self._step_fn(state, batch)
      done = step + 1
      if pending is not None:
        consume(*pending)
      pending = (done, metrics)
      for hook in hooks:
        hook(done, self)
      do_eval = self.eval_data and (done % t.eval_every == 0 or done == total)
      do_ckpt = ckpt is not None and (done % t.checkpoint_every == 0 or done == total)
      if do_eval or do_ckpt:
        consume(*pending)
        pending = None
        t0 = time.perf_counter()
        if do_eval:
          last['eval'] = self.evaluate(state['params'])
          log(STAGE, f"step {done}: " + '  '.join(f"{k} {v:.4f}" for k, v in last['eval'].items()))
          if writer is not None:
            writer.write(done, **last['eval'])
        if do_ckpt:
          ckpt.save(done, state['params'], state['opt_state'], self._meta(done, state['rng']))
        excluded += time.perf_counter() - t0
    if pending is not None:
      consume(*pending)
    done_steps = total
    if start >= total and self.eval_data:  # resumed after the last step: only the final eval remains
      last['eval'] = self.evaluate(state['params'])
    train_seconds = progress.elapsed
    if ckpt is not None:
      ckpt.wait()
    self.final_state = state
    return {
        'steps': done_steps, 'steps_this_run': total - start, 'resumed_from': start,
        'train_loss': last['train_loss'], 'eval_loss': last['eval'].get('eval_loss', float('nan')),
        'eval_accuracy': last['eval'].get('eval_accuracy'),
        'tokens_per_sec': tokens_per_sec(total) if total > start else float('nan'),
        'train_seconds': train_seconds, 'compile_seconds': self.compile_seconds,
        'seconds': time.perf_counter() - t_start, 'loss_history': loss_history,
    }


def _truncate_metrics(path: str, step: int) -> None:
  """Drop metrics logged after `step` (a resumed run logs those steps again)."""
  if not os.path.exists(path) or not is_main_process():
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  keep = [ln for ln in lines if json.loads(ln).get('step', 0) <= step]
  if len(keep) != len(lines):
    io.write_bytes(path, ''.join(keep).encode())


# ------------------------------------------------------------------------------------------------
# The stage

def run(config, workdir: str, *, hooks: Iterable[Callable[[int, Trainer], None]] = ()) -> dict:
  """The train stage. `hooks` (see Trainer.run) are for tests and notebooks."""
  t_start = time.perf_counter()
  validate(config)
  stage = StageDir(workdir, DIRNAME, config, fingerprint_keys(config))
  if stage.summary is not None:
    done = stage.finished()  # raises if the finished run had a different config
    log(STAGE, f"already finished in {stage.path} ({done['steps']} steps, eval loss {done['eval_loss']:.4f}); skipping")
    return done

  # Data and model checks come before the directory is claimed (a config rejected here leaves
  # nothing behind) and before anything is compiled.
  task = make_task(config, workdir)
  stage.claim()
  mdef = task.model
  mesh = sharding.make_mesh(config.mesh)
  model_meta = models.to_dict(mdef.cfg)
  if is_main_process():
    io.write_json(stage.file('model.json'), {'model': model_meta, 'data': task.info,
                                             'num_params': mdef.num_params})
  t = config.train
  log(STAGE, f"{task.name}: {mdef.num_params:,} params ({mdef.cfg.num_layers} layers, width {mdef.cfg.embed_dim}, "
             f"{mdef.cfg.num_heads} heads, block {mdef.cfg.block_size}"
             + (f", vocab {mdef.cfg.vocab_size}" if task.name == 'gpt' else '') + f", {mdef.cfg.dtype}); "
             f"{task.info['num_train']} train / {task.info['num_val']} val sequences; {t.steps} steps of batch "
             f"{t.batch_size} ({task.tokens_per_example * t.batch_size:,} tokens); mesh {dict(mesh.shape)} of "
             f"{jax.devices()[0].device_kind}")
  trainer = Trainer(task, t, mesh, int(config.seed), stage.path, model_meta=model_meta)
  res = trainer.run(hooks)
  train_loss = res['train_loss']
  if train_loss is None:  # nothing trained in this run (resumed at the end): the last logged value
    train_loss = _last_logged(stage.file('metrics.jsonl'), 'loss')
  summary = {
      'steps': res['steps'], 'train_loss': train_loss, 'eval_loss': res['eval_loss'],
      'eval_accuracy': res['eval_accuracy'], 'tokens_per_sec': res['tokens_per_sec'],
      'params': mdef.num_params, 'params_non_embedding': mdef.num_non_embedding_params,
      'model': task.name, 'num_layers': mdef.cfg.num_layers, 'embed_dim': mdef.cfg.embed_dim,
      'num_heads': mdef.cfg.num_heads, 'block_size': mdef.cfg.block_size,
      'vocab_size': getattr(mdef.cfg, 'vocab_size', None), 'batch_size': int(t.batch_size),
      'tokens_per_step': trainer.tokens_per_step, 'num_train': task.info['num_train'],
      'num_val': task.info['num_val'], 'epochs': res['steps'] * int(t.batch_size) / max(1, task.info['num_train']),
      'final_lr': float(trainer.schedule(res['steps'])), 'resumed_from': res['resumed_from'],
      'steps_this_run': res['steps_this_run'], 'train_seconds': res['train_seconds'],
      'compile_seconds': res['compile_seconds'], 'seconds': time.perf_counter() - t_start,
      'device_kind': jax.devices()[0].device_kind, 'num_devices': int(mesh.size), 'mesh': dict(mesh.shape),
      'checkpoint_dir': stage.file('checkpoints'),
  }
  if task.name == 'regression':
    summary.update(value_mean=task.info['value_mean'], value_std=task.info['value_std'], loss=mdef.cfg.loss)
  stage.write_summary(summary)
  log(STAGE, f"done: {res['steps']} steps, train loss {train_loss or float('nan'):.4f}, eval loss {res['eval_loss']:.4f}, "
             f"{res['tokens_per_sec']:,.0f} tokens/s, {fmt_seconds(summary['seconds'])} -> {stage.path}")
  return summary


def _last_logged(path: str, key: str):
  if not os.path.exists(path):
    return None
  value = None
  with open(path) as f:
    for ln in f:
      d = json.loads(ln)
      if key in d:
        value = d[key]
  return value
