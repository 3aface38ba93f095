r"""Sampling throughput of the parity GPTs (MNIST and ShapeNet) at several batch sizes, with the
KV-cache sampler, against a no-cache reference (NeF-GPT's way: a full forward over the whole
prefix for every new token) measured in the same run.

  python benchmarks/sample_throughput.py [--models=mnist,shapenet] [--batches=1,64,1024]
      [--new_tokens=N] [--baseline_tokens=N] [--dtype=auto|float32|bfloat16] [--attention=auto|einsum|xla]

Models (random weights: speed does not depend on them), NeF-GPT's blocks (no block LayerNorm, tied):
  mnist     width 240, 12 heads, 8 layers, vocab 256; prompt [SOS, class] + 561 weight tokens
            (configs/mnist.py parity)
  shapenet  width 384, 16 heads, 7 layers, vocab 128; prompt [SOS] + 3,712 weight tokens
            (configs/shapes.py parity)

Defaults depend on the backend, and the JSON says what was measured:
  GPU / TPU  batches 1, 64, 1024; every weight token of the sequence; bfloat16 (the parity presets').
  CPU        batches 1, 64; the first 561 (mnist) / 128 (shapenet) tokens of each sequence; float32 (no
             fast bf16 matmuls). So that the default run ends within 5 minutes on a 2-core CPU.
A run of fewer tokens than the sequence holds still works over the whole sequence length (the
cache, or the no-cache forward, is sized for all of it: `sampling.generate(max_len=)`), so its
tokens/s is the per-token cost of full-length decoding, not of short sequences.

The baseline (`speedup`): the no-cache sampler at batch 1 for `baseline_tokens` tokens (default 32
on GPU/TPU, 16 (mnist) / 2 (shapenet) on CPU) against the KV-cache sampler's batch-1 rate, both at
the full sequence length; the two are checked to draw identical tokens. Tokens/s counts generated
tokens and excludes compilation. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from nfjax import sampling  # noqa: E402
from nfjax.models.gpt import GPT, GPTConfig  # noqa: E402

# name: (model dims, prompt length, weight tokens, codes, CPU default tokens, CPU baseline tokens)
MODELS = {
    'mnist': (dict(num_layers=8, num_heads=12, embed_dim=240, vocab_size=256), 2, 561, 245, 561, 16),
    'shapenet': (dict(num_layers=7, num_heads=16, embed_dim=384, vocab_size=128), 1, 3712, 127, 128, 2),
}


def ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(',') if x)


def time_sampler(model, b, t0, new, codes, max_len, use_cache, reps):
  """(tokens [b, new], best seconds of `reps` runs, compile seconds)."""
  vocab = model.cfg.vocab_size
  prompt = jnp.full((b, t0), codes, jnp.int32)          # [SOS] or [SOS, class]
  if t0 > 1:
    prompt = prompt.at[:, 1].set(codes + 1 + jnp.arange(b) % max(1, vocab - codes - 1))
  args = (prompt, sampling.sample_keys(0, 0, np.arange(b)), jnp.full((b,), 0.8, jnp.float32),
          jnp.full((b,), 3, jnp.int32), jnp.ones((b,), jnp.float32), jnp.arange(vocab) < codes)
  t = time.perf_counter()
  run = sampling.make_generate(model, new, use_cache=use_cache, max_len=max_len).compile(*args)
  compile_s = time.perf_counter() - t
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    out = run(*args)
    out.block_until_ready()
    best = min(best, time.perf_counter() - t)
  return np.asarray(out), best, compile_s


def main():
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default='mnist,shapenet')
  ap.add_argument('--batches', type=ints, default=(1, 64) if on_cpu else (1, 64, 1024))
  ap.add_argument('--new_tokens', type=int, default=0, help='tokens generated per row; 0 = the backend default')
  ap.add_argument('--baseline_tokens', type=int, default=0, help='no-cache tokens at batch 1; 0 = backend default; '
                  '-1 = no baseline')
  ap.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                  help='auto: bfloat16 on GPU/TPU, float32 on CPU')
  ap.add_argument('--attention', default='auto', choices=('auto', 'einsum', 'xla', 'cudnn'))
  ap.add_argument('--reps', type=int, default=1 if on_cpu else 3, help='timed runs per measurement (best is kept)')
  args = ap.parse_args()
  dtype = args.dtype if args.dtype != 'auto' else ('float32' if on_cpu else 'bfloat16')

  result = {'benchmark': 'sample_throughput', 'device_kind': device.device_kind, 'platform': device.platform,
            'jax': jax.__version__, 'cpu_count': os.cpu_count(), 'dtype': dtype, 'attention': args.attention,
            'reps': args.reps, 'models': {}}
  t_all = time.perf_counter()
  for name in args.models.split(','):
    dims, t0, weights, codes, cpu_new, cpu_base = MODELS[name]
    seq = t0 + weights
    cfg = GPTConfig(**dims, block_size=seq - 1, block_norm=False, tie_embeddings=True, dtype=dtype,
                    attention=args.attention)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    new = min(weights, args.new_tokens or (cpu_new if on_cpu else weights))
    base_new = args.baseline_tokens or (cpu_base if on_cpu else 32)
    r = {'seq_len': seq, 'weight_tokens': weights, 'new_tokens_timed': new, 'max_len': seq - 1,
         'model': {**dims, 'params': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))},
         'kv_cache': {}}
    print(f"{name}: {r['model']['params']:,} params, sequences of {seq} tokens; timing {new} new tokens per row",
          flush=True)
    first = None   # the batch-1 tokens of the KV-cache sampler
    for b in args.batches:
      toks, s, c = time_sampler(model, b, t0, new, codes, seq - 1, True, args.reps)
      first = toks if b == 1 else first
      r['kv_cache'][str(b)] = {'tokens_per_sec': b * new / s, 'seconds': s, 'compile_seconds': c}
      print(f"  kv cache, batch {b}: {b * new / s:,.0f} tokens/s ({s:.2f}s, compile {c:.1f}s)", flush=True)
    if base_new > 0:
      base_new = min(base_new, new)
      if first is None:
        toks, s, _ = time_sampler(model, 1, t0, new, codes, seq - 1, True, args.reps)
        first = toks
        r['kv_cache']['1'] = {'tokens_per_sec': new / s, 'seconds': s}
      plain, s_n, c_n = time_sampler(model, 1, t0, base_new, codes, seq - 1, False, args.reps)
      r['baseline'] = {'what': 'no-cache sampler (full forward per token), batch 1', 'new_tokens_timed': base_new,
                       'no_cache_tokens_per_sec': base_new / s_n, 'compile_seconds': c_n,
                       'identical_tokens': bool(np.array_equal(first[:, :base_new], plain))}
      r['speedup_vs_no_cache'] = r['kv_cache']['1']['tokens_per_sec'] / r['baseline']['no_cache_tokens_per_sec']
      print(f"  no cache, batch 1: {base_new / s_n:,.1f} tokens/s; kv cache batch 1 is "
            f"{r['speedup_vs_no_cache']:.1f}x; identical tokens: {r['baseline']['identical_tokens']}", flush=True)
    result['models'][name] = r
  result['seconds'] = time.perf_counter() - t_all
  print(json.dumps(result))


if __name__ == '__main__':
  main()
