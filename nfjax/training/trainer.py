"""The training loop: `Trainer` runs a `Task` (nfjax/training/tasks.py) for `train.steps` steps.

Read top to bottom: the optimizer, the data stream, then the Trainer -- abstract-first state, the
compiled step (gradient accumulation inside it), eval, and the loop with resume, one-step-late
metrics, checkpoints and progress. The train stage (nfjax/stages/train.py) is a thin caller.

Semantics worth knowing:
* Data order is a pure function of (seed, step): example k of the infinite stream is row
  perm_e[k mod N] with e = k // N and perm_e a permutation seeded by (seed, e). Step s reads
  stream examples [s*B, (s+1)*B). Dropout keys are fold_in(run key, step); the task's batch
  augmentation (class dropout: which rows lose their class) is drawn from (seed, step) too. So a
  run killed anywhere and started again with the same command continues the exact loss trajectory.
* The state is created abstract-first (eval_shape -> shardings -> jitted init), the step is
  `jax.jit(..., in_shardings, out_shardings, donate_argnums=0)` compiled once ahead of time.
* Metrics are fetched one step late (the device always has the next step queued); a non-finite
  loss stops the run with an NfjaxError naming the step.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfjax import checkpoint as ckpt_lib
from nfjax import models, sharding
from nfjax.errors import DataError, NfjaxError
from nfjax.io import files
from nfjax.training.tasks import Task
from nfjax.utils import preemption
from nfjax.utils.logging import MetricsWriter, Progress, is_main_process, log

STAGE = 'train'


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


class BatchStream:
  """Batches as a pure function of (seed, step): see the module docstring."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, augment=None):
    self.arrays = arrays
    self.augment = augment   # Task.augment: fn(batch, seed, step) -> batch, or None
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
    return out if self.augment is None else self.augment(out, self.seed, step)


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

    self.stream = BatchStream(task.train, self.batch_size, self.seed, getattr(task, 'augment', None))
    if self.batch_size > self.stream.n:
      log(STAGE, f"WARNING: train.batch_size={self.batch_size} is larger than the {self.stream.n} training "
                 f"examples: every step repeats examples; lower train.batch_size or fit more fields")
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
      eval_shardings = {k: self.batch_shardings[k] for k in self.eval_data[0]}   # no augmentation keys
      ev = jax.jit(self._eval_step, in_shardings=(self.param_shardings, eval_shardings), out_shardings=rep)
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

  def _meta(self, step: int, rng, window: list[dict] | None = None) -> dict:
    """A checkpoint's meta; `log_window`: the step metrics since the last regular log, so that a
    resumed run logs (and reports as train_loss) the same averages as an uninterrupted one."""
    return {'step': int(step), 'rng': [int(x) for x in np.asarray(jax.device_get(rng))],
            'data_position': int(step) * self.batch_size, 'seed': self.seed, 'batch_size': self.batch_size,
            'model': self.model_meta, 'task': self.task.name, 'data_hash': self.task.info.get('data_hash'),
            'log_window': list(window or [])}

  def _restore_or_init(self, ckpt: ckpt_lib.Checkpointer | None):
    self._window0 = []
    steps = ckpt.all_steps() if ckpt is not None else []
    if steps:   # the newest intact checkpoint (a damaged newer one is skipped with a warning)
      latest, (params, opt_state, meta) = ckpt_lib.newest_intact(
          steps, lambda s: ckpt.restore(s, self.abstract_state['params'], self.abstract_state['opt_state']),
          ckpt.directory)
      ours = self._meta(0, np.zeros(2, np.uint32))
      for key in ('seed', 'batch_size', 'data_hash'):
        if meta.get(key) != ours[key]:
          raise NfjaxError(f"the checkpoint at step {latest} in {ckpt.directory} was written with {key}="
                           f"{meta.get(key)!r}, this run has {ours[key]!r}; use a new --workdir or delete "
                           f"{files.dirname(ckpt.directory)}")
      rep = sharding.replicated(self.mesh)
      state = {'step': jax.device_put(jnp.asarray(meta['step'], jnp.int32), rep),
               'rng': jax.device_put(jnp.asarray(meta['rng'], jnp.uint32), rep),
               'params': params, 'opt_state': opt_state}
      self._window0 = [dict(w) for w in meta.get('log_window', [])]
      return state, int(meta['step'])
    state = self.init_state()
    init_from = str(getattr(self.t, 'init_from', '') or '')
    if not init_from and getattr(self.task, 'init_params', None) is not None:
      params = dict(state['params'])
      for name, value in self.task.init_params().items():
        if value.shape != params[name].shape:
          raise ValueError(f"init_params[{name!r}] has shape {value.shape}, the model's is {params[name].shape}")
        params[name] = jax.make_array_from_callback(value.shape, params[name].sharding, lambda idx, v=value: v[idx])
      state = {**state, 'params': params}
    if init_from:
      if not files.isdir(files.absolute(init_from)):
        raise NfjaxError(ckpt_lib.init_from_error(init_from))
      src = ckpt_lib.Checkpointer(init_from, async_save=False, read_only=True)
      try:
        step = src.latest_step()
        if step is None:
          raise NfjaxError(ckpt_lib.init_from_error(init_from, 'holds no finished checkpoint'))
        params, _ = src.restore_params(step, self.abstract_state['params'])
      finally:
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
      ckpt = ckpt_lib.Checkpointer(files.join(self.directory, 'checkpoints'), keep=int(self.t.keep_checkpoints),
                                   async_save=bool(self.t.async_checkpoints))
    writer = None
    self._profile = None
    failed = False
    try:
      state, start = self._restore_or_init(ckpt)
      if start:
        log(STAGE, f"resuming from the checkpoint at step {start}/{self.total_steps}")
      if self.directory is not None:
        _truncate_metrics(files.join(self.directory, 'metrics.jsonl'), start)
        writer = MetricsWriter(self.directory, namespace=STAGE)
      return self._run(state, start, ckpt, writer, list(hooks), t_start)
    except BaseException:
      failed = True
      raise
    finally:
      if self._profile is not None:
        self._profile.close()
      if writer is not None:
        writer.close()
      if ckpt is not None:
        ckpt.close(failed=failed)

  def _run(self, state, start, ckpt, writer, hooks, t_start) -> dict:
    t = self.t
    total = self.total_steps
    self.compile()
    log(STAGE, f"compiled the train step in {self.compile_seconds:.1f}s")
    progress = Progress(STAGE, total, 'steps')
    progress.start(start)
    excluded = 0.0  # eval + checkpoint seconds, not counted in tokens/s
    window: list[dict] = list(self._window0)   # step metrics since the last regular log (resumed too)
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
      regular = done % t.log_every == 0 or done == total
      if regular or done <= start + 3:   # the first steps of a run are shown at once, without closing the window
        avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        avg['lr'] = m['lr']
        tps = tokens_per_sec(done)
        extra = (f"loss {avg['loss']:.4f}" + (f" acc {avg['accuracy']:.3f}" if 'accuracy' in avg else '')
                 + f"  lr {m['lr']:.3g}  {tps:,.0f} tokens/s")
        progress.update(done, extra)
        if writer is not None:
          writer.write(done, **avg, tokens_per_sec=tps)
        last['train_loss'] = avg['loss']
        if regular:
          window.clear()

    pending = None
    profile = self._profile = ProfileWindow(t, start, total, self.directory)   # closed by run() whatever happens
    for step in range(start, total):
      excluded += profile.before(step)
      batch = self.put(self.stream.batch(step))
      state, metrics = self._step_fn(state, batch)
      done = step + 1
      if pending is not None:
        consume(*pending)
      pending = (done, metrics)
      excluded += profile.after(done, state)
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
          ckpt.save(done, state['params'], state['opt_state'], self._meta(done, state['rng'], window))
        excluded += time.perf_counter() - t0
      if done < total and preemption.requested(done):   # SIGTERM: a checkpoint of this step, then stop
        if pending is not None:
          consume(*pending)
          pending = None
        if ckpt is not None:
          if not do_ckpt:
            ckpt.save(done, state['params'], state['opt_state'], self._meta(done, state['rng'], window))
          ckpt.wait()
        preemption.stop(STAGE, f"step {done}/{total} " + ("saved as a checkpoint" if ckpt is not None
                                                          else "reached (no checkpoint directory)"))
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


class ProfileWindow:
  """A jax.profiler trace of train steps [profile_start_step, + profile_num_steps) (config.train; 0 steps
  = off) into DIRECTORY/profile (TensorBoard's profile plugin or Perfetto read it). The trace is
  started before the first step of the window is dispatched and stopped once its last step has
  finished; the seconds spent writing it are returned so tokens/s leaves them out."""

  def __init__(self, t, start: int, total: int, directory: str | None):
    first, num = int(t.get('profile_start_step', 0)), int(t.get('profile_num_steps', 0))
    self.lo, self.hi = max(first, start), min(first + num, total)
    self.on = num > 0 and directory is not None and self.lo < self.hi
    self.path = files.join(directory, 'profile') if directory is not None else None
    self.tracing = False

  def before(self, step: int) -> float:
    if self.on and step == self.lo:
      t0 = time.perf_counter()
      jax.profiler.start_trace(self.path)
      self.tracing = True
      return time.perf_counter() - t0
    return 0.0

  def after(self, done: int, state) -> float:
    if self.tracing and done == self.hi:
      t0 = time.perf_counter()
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing = False
      log(STAGE, f"profiled steps {self.lo + 1}..{self.hi} -> {self.path}")
      return time.perf_counter() - t0
    return 0.0

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _truncate_metrics(path: str, step: int) -> None:
  """Drop metrics logged after `step` (a resumed run logs those steps again)."""
  if not files.exists(path) or not is_main_process():
    return
  records = files.read_jsonl(path)
  keep = [r for r in records if r.get('step', 0) <= step]
  if len(keep) != len(records):
    files.write_bytes(path, ''.join(json.dumps(r) + '\n' for r in keep).encode())


