"""The train stage: WORKDIR/tokens (or fields) -> WORKDIR/transformer.

`run(config, workdir)` trains `config.model` (a GPT on the token sequences, or the regression
transformer on the fitted weights; nfjax/training/tasks.py) for `train.steps` optimizer steps with
the Trainer (nfjax/training/trainer.py) and writes

  transformer/checkpoints/<step>/   Orbax checkpoints (params, opt_state, meta; nfjax/checkpoint.py)
  transformer/model.json            the resolved model config + the data it was sized for
  transformer/metrics.jsonl         train metrics every `train.log_every` steps, eval metrics every
                                    `train.eval_every` steps (also TensorBoard in transformer/tensorboard)
  transformer/summary.json          written last: steps, train_loss, eval_loss, tokens_per_sec, params, ...
A killed run resumes from its last checkpoint with the same command.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax

from nfjax import models, processes, sharding
from nfjax.configs import checks
from nfjax.io import files
from nfjax.io import workdir as wd
from nfjax.models import gpt as gpt_lib
from nfjax.training import tasks
from nfjax.training.trainer import Trainer
from nfjax.utils.logging import fmt_seconds, is_main_process, log

STAGE = 'train'
# train.* keys that change what is trained (the others -- log/eval/checkpoint cadence -- may change
# between a run and its resumption). The data it trains on is tracked by the tokens/ and fields/ digests.
KEYS = ('seed', 'model') + tuple(f'train.{k}' for k in (
    'steps', 'batch_size', 'lr', 'warmup_steps', 'decay_steps', 'end_lr', 'b1', 'b2', 'eps', 'weight_decay',
    'decay_embeddings', 'grad_clip', 'grad_accum', 'loss_on_prefix', 'init_from', 'class_dropout'))
# (train.class_dropout is fingerprinted only when > 0: nfjax.config.OMITTED_AT.)


def needs(config) -> tuple[str, ...]:
  """The directories this stage reads (what the launcher checks before the first stage): the tokens
  for a GPT, the fields for the regression transformer."""
  return (wd.TOKENS,) if config.model.kind == 'gpt' else (wd.FIELDS,)


def run(config, workdir: str, *, hooks: Iterable[Callable[[int, Trainer], None]] = ()) -> dict:
  """The train stage. `hooks` (see Trainer.run) are for tests and notebooks."""
  t_start = time.perf_counter()
  checks.validate(config, (STAGE,))
  stage = wd.StageDir(workdir, wd.TRANSFORMER, config, KEYS, consumes=(wd.FIELDS, wd.TOKENS), stage=STAGE)
  if stage.summary is not None:
    done = stage.finished()  # raises if the finished run had a different config; clears it if its data changed
    if done is not None:
      log(STAGE, f"already finished in {stage.path} ({done['steps']} steps, eval loss {done['eval_loss']:.4f}); "
                 f"skipping")
      return done

  # Data and model checks come before the directory is claimed (a config rejected here leaves
  # nothing behind) and before anything is compiled.
  for d in needs(config):
    wd.require(workdir, d, STAGE)
  task = tasks.make_task(config, workdir)
  stage.claim()
  mdef = task.model
  mesh = sharding.make_mesh(config.mesh)
  model_meta = models.to_dict(mdef.cfg)
  if is_main_process():
    files.write_json(stage.file('model.json'), {'model': model_meta, 'data': task.info,
                                             'num_params': mdef.num_params})
  t = config.train
  log(STAGE, f"{task.name}: {mdef.num_params:,} params ({mdef.cfg.num_layers} layers, width {mdef.cfg.embed_dim}, "
             f"{mdef.cfg.num_heads} heads, block {mdef.cfg.block_size}"
             + (f", vocab {mdef.cfg.vocab_size}" if task.name == 'gpt' else '') + f", {mdef.cfg.dtype}, "
             f"attention {gpt_lib.attention_summary(mdef.cfg)}); "
             f"{task.info['num_train']} train / {task.info['num_val']} val sequences; {t.steps} steps of batch "
             f"{t.batch_size} ({task.tokens_per_example * t.batch_size:,} tokens); mesh {dict(mesh.shape)} of "
             f"{mesh.devices.flat[0].device_kind}")
  trainer = Trainer(task, t, mesh, int(config.seed), stage.path, model_meta=model_meta)
  res = trainer.run(hooks)

  def finish():   # on process 0; its summary is every process's (nfjax/processes.py)
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
        'device_kind': mesh.devices.flat[0].device_kind, 'num_devices': int(mesh.size), 'mesh': dict(mesh.shape),
        'checkpoint_dir': stage.file('checkpoints'),
    }
    if task.name == 'regression':
      summary.update(value_mean=task.info['value_mean'], value_std=task.info['value_std'], loss=mdef.cfg.loss)
    stage.write_summary(summary)
    log(STAGE, f"done: {res['steps']} steps, train loss {train_loss or float('nan'):.4f}, eval loss "
               f"{res['eval_loss']:.4f}, {res['tokens_per_sec']:,.0f} tokens/s, {fmt_seconds(summary['seconds'])} "
               f"-> {stage.path}")
    return summary
  return processes.on_main(STAGE, finish)


def _last_logged(path: str, key: str):
  values = [d[key] for d in files.read_jsonl(path) if key in d]
  return values[-1] if values else None
