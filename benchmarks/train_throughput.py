r"""Train-step throughput of the GPT: nfjax's sharded, donated step vs a plain jitted step.

  python benchmarks/train_throughput.py [--embed_dim=128 --num_layers=2 --num_heads=2]
      [--batch_size=8 --seq_len=563 --vocab_size=257] [--steps=12] [--dtype=float32|bfloat16]
      [--attention=auto|einsum|xla|cudnn] [--baseline_attention=einsum] [--parity_blocks] [--classes=10]
      [--skip_plain] [--skip_before]
  python benchmarks/train_throughput.py --parity    # the MNIST parity GPT (240 wide, 12 heads, 8 layers,
                                                    # vocab 256, batch 64, bf16): the GPU/TPU figure

Measured in one run, on the same synthetic token sequences ([SOS, class, weights], random ids):

* nfjax: `nfjax.trainer.Trainer`'s step -- jax.jit with in/out shardings over the mesh of every
  device (batch on data, parameters by logical axes), the train state donated, batches built on
  the host and placed with the batch sharding each step, exactly as in the train stage.
* plain: the same model, loss and optimizer through `jax.jit(step)` on one device, no shardings,
  no donation (the new state is a fresh buffer every step).
* before: nfjax's step with the blocks formulated as before the train-step work of issue 15 (every
  stack a `lax.scan`, attention over the full T x T scores under the causal mask), i.e.
  `gpt.UNROLL_MAX_LAYERS = 0` and `gpt.CAUSAL_MAX_BLOCKS = 1` while it is traced. `speedup_vs_before`
  is what the unrolled stack and the block-causal attention buy.
* baseline attention (`--baseline_attention=X`): nfjax's step with `model.attention = X`, e.g.
  `--parity --attention=cudnn --baseline_attention=einsum` on a GPU: cuDNN flash attention (heads
  padded 20 -> 24) against the einsum path (`speedup_vs_baseline_attention`).
* peak: the device's dense matmul rate, measured here (f32 on CPU, bf16 on GPU/TPU), best of 3.

`--classes=N` adds what the quick presets' GPT has on top (class embedding from the class token,
the [classes + 1, positions, vocab] class x position logit bias, a null class for guidance), with
the class token at column 1, as the train stage builds it.

Model FLOPs per token = 6 * (matmul parameters incl. the output projection) + 12 * layers *
seq * width (attention scores and values, full T x T as computed). MFU = tokens/s x FLOPs/token /
peak. (XLA's cost analysis is not used: it counts the scanned layer body once.)
The two variants are timed in alternating rounds (best round each), so load from other processes
on a shared machine hits both alike.
Prints progress, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from nfjax import models, sharding  # noqa: E402
from nfjax.models import gpt  # noqa: E402
from nfjax.training import tasks  # noqa: E402
from nfjax.training import trainer as trainer_lib  # noqa: E402
from nfjax.utils import perf  # noqa: E402


def model_flops_per_token(cfg: models.GPTConfig, seq: int) -> float:
  d, f, n = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers
  matmul_params = n * (3 * d * d + d * d + 2 * d * f) + d * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * n * seq * d


def make_train_config(args):
  import importlib.util
  spec = importlib.util.spec_from_file_location('mnist_cfg', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                                         'mnist.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('quick')
  with c.unlocked():
    c.train.batch_size = args.batch_size
    c.train.steps = 10 ** 6
    c.train.grad_accum = args.grad_accum
  return c


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--embed_dim', type=int, default=128)
  ap.add_argument('--num_layers', type=int, default=2)
  ap.add_argument('--num_heads', type=int, default=2)
  ap.add_argument('--batch_size', type=int, default=8)
  ap.add_argument('--grad_accum', type=int, default=1)
  ap.add_argument('--seq_len', type=int, default=563, help='tokens per sequence (model inputs = seq_len - 1)')
  ap.add_argument('--vocab_size', type=int, default=257)
  ap.add_argument('--steps', type=int, default=12, help='timed steps per variant (in 3 alternating rounds)')
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--parity_blocks', action='store_true', help="NeF-GPT's blocks (no block LayerNorm), tied")
  ap.add_argument('--parity', action='store_true', help="the MNIST parity GPT and batch: width 240, 12 heads, "
                  "8 layers, vocab 256, batch 64, bfloat16, NeF-GPT's blocks")
  ap.add_argument('--attention', default='auto', choices=('auto', 'einsum', 'xla', 'cudnn'),
                  help='model.attention (auto: cuDNN flash attention on a GPU in bf16, else einsum)')
  ap.add_argument('--classes', type=int, default=0, help='class embedding + class x position bias for this '
                  'many classes (+ the null class), as the quick presets; 0 = none')
  ap.add_argument('--skip_plain', action='store_true')
  ap.add_argument('--skip_before', action='store_true')
  ap.add_argument('--baseline_attention', default='', choices=('', 'auto', 'einsum', 'xla', 'cudnn'),
                  help='also time the same step with this model.attention, alternating (speedup_vs_baseline_attention)')
  args = ap.parse_args()
  if args.parity:
    args.embed_dim, args.num_heads, args.num_layers, args.vocab_size = 240, 12, 8, 256
    args.batch_size, args.dtype, args.parity_blocks = 64, 'bfloat16', True

  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  peak_dtype = jnp.float32 if on_cpu or args.dtype == 'float32' else jnp.bfloat16
  peak = perf.matmul_peak_flops(peak_dtype, 2048 if on_cpu else 8192)
  print(f"{device.device_kind}: matmul peak {peak / 1e9:,.0f} GFLOP/s ({jnp.dtype(peak_dtype).name})", flush=True)

  c = make_train_config(args)
  cfg = models.GPTConfig(num_layers=args.num_layers, num_heads=args.num_heads, embed_dim=args.embed_dim,
                         block_size=args.seq_len - 1, vocab_size=args.vocab_size, dtype=args.dtype,
                         block_norm=not args.parity_blocks, tie_embeddings=args.parity_blocks,
                         attention=args.attention,
                         **({} if not args.classes else dict(
                             cond_position=1, cond_classes=args.classes + 1,
                             cond_first_token=args.vocab_size - args.classes - 2, null_class=args.vocab_size - 1)))
  mdef = models.build(cfg)
  rng = np.random.default_rng(0)
  data = rng.integers(0, args.vocab_size, (max(4 * args.batch_size, 64), args.seq_len)).astype(np.int32)
  if args.classes:
    data[:, 1] = cfg.cond_first_token + data[:, 1] % args.classes
  loss = tasks.gpt_loss(2, False, *((1, cfg.null_class) if args.classes else ()))
  task = tasks.Task('gpt', mdef, loss, {'tokens': data}, {}, tokens_per_example=args.seq_len - 1)
  mesh = sharding.make_mesh(c.mesh)
  trainer = trainer_lib.Trainer(task, c.train, mesh, seed=0, directory=None)
  tokens_per_step = trainer.tokens_per_step
  flops_token = model_flops_per_token(cfg, args.seq_len - 1)

  # --- nfjax: sharded, donated, compiled ahead of time --------------------------------------
  t0 = time.perf_counter()
  compiled = trainer.compile()
  compile_s = time.perf_counter() - t0
  state = trainer.init_state()
  for s in range(2):
    state, m = trainer.step(state, trainer.stream.batch(s))
  jax.block_until_ready(m)
  print(f"nfjax step compiled in {compile_s:.1f}s ({mesh.size} device(s), mesh {dict(mesh.shape)})", flush=True)
  pos = {'nfjax': 2, 'plain': 2}

  def time_nfjax(n):
    nonlocal state, m
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = trainer.step(state, trainer.stream.batch(pos['nfjax']))
      pos['nfjax'] += 1
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / n

  def timed_trainer(name, task_):
    """Another Trainer on the same data, compiled and warmed up; returns its timer (seconds/step)."""
    other = trainer_lib.Trainer(task_, c.train, mesh, seed=0, directory=None)
    other.compile()
    run = {'state': other.init_state()}
    for s in range(2):
      run['state'], run['m'] = other.step(run['state'], other.stream.batch(s))
    jax.block_until_ready(run['m'])
    pos[name] = 2

    def timer(n):
      t0 = time.perf_counter()
      for _ in range(n):
        run['state'], run['m'] = other.step(run['state'], other.stream.batch(pos[name]))
        pos[name] += 1
      jax.block_until_ready((run['state'], run['m']))
      return (time.perf_counter() - t0) / n
    return timer

  # --- before: the same step, blocks traced as before (scanned, full-mask attention) --------------
  time_before = None
  if not args.skip_before:
    saved = gpt.UNROLL_MAX_LAYERS, gpt.CAUSAL_MAX_BLOCKS
    gpt.UNROLL_MAX_LAYERS, gpt.CAUSAL_MAX_BLOCKS = 0, 1
    try:
      time_before = timed_trainer('before', task)
    finally:
      gpt.UNROLL_MAX_LAYERS, gpt.CAUSAL_MAX_BLOCKS = saved

  # --- baseline attention: the same step with model.attention = --baseline_attention ----------------
  time_attn = None
  if args.baseline_attention:
    cfg_b = dataclasses.replace(cfg, attention=args.baseline_attention)
    time_attn = timed_trainer('attention', tasks.Task('gpt', models.build(cfg_b), loss, {'tokens': data}, {},
                                                      tokens_per_example=args.seq_len - 1))

  # --- plain: one device, no shardings, no donation -----------------------------------------
  time_plain = None
  if not args.skip_plain:
    tx, _ = trainer_lib.make_optimizer(c.train, mdef)

    def plain_step(params, opt_state, tokens, key):
      def f(p):
        sums = loss(mdef.bind(p), {'tokens': tokens, 'weight': jnp.ones(tokens.shape[0])}, key)
        return sums['loss_sum'] / sums['count']
      value, grads = jax.value_and_grad(f)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(plain_step)
    key = jax.random.PRNGKey(1)
    with jax.default_device(device):
      plain = {'params': jax.jit(mdef.init)(jax.random.PRNGKey(0))}
      plain['opt'] = tx.init(plain['params'])

    def time_plain(n):
      with jax.default_device(device):
        t0 = time.perf_counter()
        for _ in range(n):
          s = pos['plain']
          plain['params'], plain['opt'], plain['value'] = step(
              plain['params'], plain['opt'], jax.device_put(trainer.stream.batch(s)['tokens'], device),
              jax.random.fold_in(key, s))
          pos['plain'] += 1
        jax.block_until_ready((plain['params'], plain['value']))
        return (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    time_plain(2)
    print(f"plain jit compiled + 2 steps in {time.perf_counter() - t0:.1f}s", flush=True)

  rounds = 3
  per_round = max(1, args.steps // rounds)
  best = {'nfjax': float('inf'), 'plain': float('inf'), 'before': float('inf'), 'attention': float('inf')}
  for r in range(rounds):
    best['nfjax'] = min(best['nfjax'], time_nfjax(per_round))
    if time_plain is not None:
      best['plain'] = min(best['plain'], time_plain(per_round))
    if time_before is not None:
      best['before'] = min(best['before'], time_before(per_round))
    if time_attn is not None:
      best['attention'] = min(best['attention'], time_attn(per_round))
  sharded_s = best['nfjax']
  sharded_tps = tokens_per_step / sharded_s
  loss_sharded = float(m['loss'])
  print(f"nfjax step: {sharded_s * 1e3:.1f} ms/step, {sharded_tps:,.0f} tokens/s", flush=True)
  plain_tps = None
  if time_plain is not None:
    plain_tps = tokens_per_step / best['plain']
    print(f"plain jit (1 device, no donation): {best['plain'] * 1e3:.1f} ms/step, {plain_tps:,.0f} tokens/s",
          flush=True)

  before_tps = None
  if time_before is not None:
    before_tps = tokens_per_step / best['before']
    print(f"before (scanned blocks, full-mask attention): {best['before'] * 1e3:.1f} ms/step, {before_tps:,.0f} "
          f"tokens/s", flush=True)

  attn_tps = None
  if time_attn is not None:
    attn_tps = tokens_per_step / best['attention']
    print(f"baseline attention {args.baseline_attention!r}: {best['attention'] * 1e3:.1f} ms/step, {attn_tps:,.0f} "
          f"tokens/s", flush=True)

  achieved = sharded_tps * flops_token
  out = {
      'benchmark': 'train_throughput', 'device_kind': device.device_kind, 'platform': device.platform,
      'jax': jax.__version__,
      'num_devices': int(mesh.size), 'mesh': dict(mesh.shape), 'cpu_count': os.cpu_count(),
      'model': {'embed_dim': args.embed_dim, 'num_layers': args.num_layers, 'num_heads': args.num_heads,
                'vocab_size': args.vocab_size, 'seq_len': args.seq_len, 'params': mdef.num_params,
                'classes': args.classes,
                'dtype': args.dtype, 'parity_blocks': args.parity_blocks, 'attention': args.attention,
                'attention_used': gpt.attention_impl(args.attention, cfg.compute_dtype, cfg.head_dim, cached=False)},
      'batch_size': args.batch_size, 'grad_accum': args.grad_accum, 'tokens_per_step': tokens_per_step,
      'timed_steps': rounds * per_round, 'rounds': rounds,
      'tokens_per_sec': sharded_tps, 'step_ms': sharded_s * 1e3, 'compile_seconds': compile_s,
      'plain_tokens_per_sec': plain_tps,
      'speedup_vs_plain': (sharded_tps / plain_tps) if plain_tps else None,
      'before_tokens_per_sec': before_tps, 'speedup_vs_before': (sharded_tps / before_tps) if before_tps else None,
      'baseline_attention': args.baseline_attention or None, 'baseline_attention_tokens_per_sec': attn_tps,
      'speedup_vs_baseline_attention': (sharded_tps / attn_tps) if attn_tps else None,
      'model_flops_per_token': flops_token,
      'achieved_tflops': achieved / 1e12, 'peak_tflops': peak / 1e12, 'peak_dtype': jnp.dtype(peak_dtype).name,
      'mfu': achieved / peak, 'last_loss': loss_sharded,
  }
  print(json.dumps(out))


if __name__ == '__main__':
  main()
