r"""Sampling throughput: the KV-cache sampler vs a no-cache reference (NeF-GPT's way: a full
forward over the whole prefix for every new token), same model, batch and settings, same run.

  python benchmarks/sample_throughput.py [--batch=8] [--layers=8 --width=240 --heads=12] [--new_tokens=561]

Default model = NeF-GPT's MNIST parity GPT (width 240, 12 heads, 8 layers, vocab 256) at its
sequence length (prompt [SOS, class] + 561 weight tokens), randomly initialised (speed does not
depend on the weights). Tokens/s counts generated tokens and excludes compilation. Both samplers
are checked to produce identical tokens. Prints one JSON object on the last line.
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--layers', type=int, default=8)
  ap.add_argument('--width', type=int, default=240)
  ap.add_argument('--heads', type=int, default=12)
  ap.add_argument('--vocab', type=int, default=256)
  ap.add_argument('--codes', type=int, default=245)
  ap.add_argument('--new_tokens', type=int, default=561)
  ap.add_argument('--reps', type=int, default=2)
  args = ap.parse_args()

  t0 = 2
  cfg = GPTConfig(num_layers=args.layers, num_heads=args.heads, embed_dim=args.width,
                  block_size=t0 + args.new_tokens, vocab_size=args.vocab, tie_embeddings=True)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  b = args.batch
  prompt = jnp.stack([jnp.full((b,), args.codes), args.codes + 1 + jnp.arange(b) % 10], 1).astype(jnp.int32)
  keys = sampling.sample_keys(0, 0, np.arange(b))
  temp = jnp.full((b,), 0.8, jnp.float32)
  top_k = jnp.full((b,), 3, jnp.int32)
  top_p = jnp.ones((b,), jnp.float32)
  allowed = jnp.arange(args.vocab) < args.codes

  result = {'batch': b, 'new_tokens': args.new_tokens, 'seq_len': t0 + args.new_tokens,
            'model': {'layers': args.layers, 'width': args.width, 'heads': args.heads, 'vocab': args.vocab},
            'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__}
  tokens = {}
  for name, use_cache in (('kv_cache', True), ('no_cache', False)):
    gen = sampling.make_generate(model, args.new_tokens, use_cache=use_cache)
    t = time.perf_counter()
    out = gen(prompt, keys, temp, top_k, top_p, allowed)
    out.block_until_ready()
    compile_and_first = time.perf_counter() - t
    best = float('inf')
    for _ in range(args.reps):
      t = time.perf_counter()
      out = gen(prompt, keys, temp, top_k, top_p, allowed)
      out.block_until_ready()
      best = min(best, time.perf_counter() - t)
    tokens[name] = np.asarray(out)
    result[f'{name}_tokens_per_sec'] = b * args.new_tokens / best
    result[f'{name}_seconds'] = best
    result[f'{name}_compile_and_first_seconds'] = compile_and_first
    print(f"{name}: {result[f'{name}_tokens_per_sec']:.0f} tokens/s", flush=True)
  result['speedup'] = result['kv_cache_tokens_per_sec'] / result['no_cache_tokens_per_sec']
  result['identical_tokens'] = bool(np.array_equal(tokens['kv_cache'], tokens['no_cache']))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
