"""A decoder-only GPT over token sequences, with a KV cache for decoding.

Architecture (nanoGPT family): token embedding + learned absolute position embedding (or RoPE),
`num_layers` blocks (`Blocks` below), final LayerNorm `ln_f`, output projection
(tied to the token embedding when `tie_embeddings`). `nef_gpt_parity=True` gives NeF-GPT's blocks:
no LayerNorm inside the blocks, only `ln_f`.

Training uses `model(tokens)`: logits for every position of a causal forward.

Decoding (what the sample stage uses) — static shapes, works inside a jitted `lax` loop:

    cache = model.init_cache(batch, max_len)               # KVCache, zeros
    logits, cache = model.decode(prompt, cache, 0)         # prefill: prompt [B, T0] at positions 0..T0-1
    logits, cache = model.decode(next_tok, cache, T0)      # next_tok [B, 1] at position T0, and so on

`decode(tokens [B, T], cache, positions)` writes the T tokens' keys/values into cache slots
positions .. positions+T-1 and returns float32 logits [B, T, vocab_size] for them, identical (up
to float rounding) to `model(full_sequence)` at those positions. `positions` is the start position:
a Python int, an int32 scalar or an int32 [B] array (one start per row). Slots must be filled in
order from 0 (a token attends to every slot at a position <= its own), and
positions + T <= max_len <= block_size (not checked inside jit; the sample stage sizes the cache).

The file reads top to bottom: the config, parameter helpers, LayerNorm / dropout / RoPE,
attention (full and cached), the KV cache, the stacked blocks, then the GPT itself. The
regression transformer (nfjax/models/regression.py) reuses the blocks.

Transformer building blocks shared by the GPT and the regression transformer.

Parameters are `nnx.Param`s carrying a `logical` metadata tuple (logical axis names, see
`nfjax.sharding.LOGICAL_RULES`); `nfjax.models.ModelDef` turns them into shardings. The blocks of a
model are stored *stacked* (leading `layers` axis) and applied with one `lax.scan`, so compile
time does not grow with depth; the KV cache is stacked the same way.

Numerics: parameters are float32; `dtype` ('float32' | 'bfloat16') is the compute dtype of the
matmuls. LayerNorm statistics, attention softmax and logits are always float32.

Attention (`attention`, see `attention_impl`): 'einsum' is the reference (two einsums and a float32
softmax, written out below); 'xla' and 'cudnn' go through `jax.nn.dot_product_attention` with that
implementation (cuDNN flash attention needs a GPU and bf16/fp16); 'auto' (the default) picks by the
backend at trace time: cuDNN for training on a GPU in bf16 when the head dimension suits it, else
the einsum path, which was the faster one on CPU (benchmarks/RESULTS.md, issue 16). All agree to
float rounding, so the choice is not part of the model: checkpoints and fingerprints omit it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
POSITIONS = ('learned', 'rope')
ATTENTION = ('auto', 'einsum', 'xla', 'cudnn')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """What every block stack needs. Frozen (hashable): it is static in the NNX graph."""
  num_layers: int
  num_heads: int
  embed_dim: int
  block_size: int             # the longest input sequence (positions 0 .. block_size-1)
  mlp_ratio: int = 4
  dropout: float = 0.0
  block_norm: bool = True     # pre-LayerNorm blocks; False = NeF-GPT's blocks (no LayerNorm at all)
  position: str = 'learned'   # learned absolute embeddings | rope (rotary, no position table)
  rope_base: float = 10000.0
  bias: bool = True
  ln_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = 'float32'
  attention: str = 'auto'     # how attention is computed (ATTENTION); not part of the model (see to_dict)

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r} is not one of {POSITIONS}")
    if self.position == 'rope' and self.head_dim % 2:
      raise ValueError(f"rope needs an even head dimension, got {self.head_dim}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not one of {tuple(DTYPES)}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION}")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.mlp_ratio * self.embed_dim

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def param(value: jax.Array, *logical: str | None) -> nnx.Param:
  if len(logical) != value.ndim:
    raise ValueError(f"{len(logical)} logical axes for a {value.ndim}-d parameter")
  return nnx.Param(value, logical=tuple(logical))


def normal(key, shape, std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
  """LayerNorm in float32, result in x's dtype."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding. x [B, T, H, K], positions [B, T] (int)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * freqs          # [B, T, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def attention_impl(choice: str, dtype, head_dim: int, cached: bool) -> str:
  """'einsum' | 'xla' | 'cudnn': what `choice` (TransformerConfig.attention) means here, at trace time.

  'auto': cuDNN flash attention for the full causal forward (training, the no-cache sampler) on a GPU
  in bfloat16 with a head dimension cuDNN takes as it is (a multiple of 8, at most 128); the einsum path
  everywhere else (on CPU it was faster than XLA's dot_product_attention, see benchmarks/RESULTS.md).
  Cached decoding never uses cuDNN ('cudnn' means 'einsum' there): one new query per step is not
  what flash attention is for, and the cache would need another layout; on an H200 the parity GPT
  sampled 471k tokens/s on the einsum path against 257k through XLA's dot_product_attention.
  An explicit 'cudnn' also takes other head dimensions up to 128, zero-padded (`attend_padded`): on the
  MNIST parity GPT (heads of 20) that made the train step 2.8x faster on an H200, and in two paired
  seeds its samples scored 0.03-0.07 lower class consistency than the einsum path's (FD better in
  one pair, worse in the other; benchmarks/RESULTS.md, "GPU runs", run 4), so 'auto' does not pad.
  """
  if choice == 'auto':
    flash = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) == jnp.bfloat16
             and head_dim % CUDNN_HEAD_MULTIPLE == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)
    return 'cudnn' if flash and not cached else 'einsum'
  if choice == 'cudnn' and cached:
    return 'einsum'
  return choice


def attention_summary(cfg: TransformerConfig) -> str:
  """What the full forward's attention runs on this backend, for the train stage's log line; on a GPU
  in bfloat16, where 'auto' keeps the einsum path only because the heads are no cuDNN size, how to
  ask for cuDNN."""
  impl = attention_impl(cfg.attention, cfg.compute_dtype, cfg.head_dim, cached=False)
  padded = padded_head_dim(cfg.head_dim)
  if (cfg.attention == 'auto' and impl == 'einsum'
      and attention_impl('auto', cfg.compute_dtype, padded, cached=False) == 'cudnn'):
    return (f"einsum (heads of {cfg.head_dim}: --config.model.attention=cudnn pads them to "
            f"{padded} for cuDNN flash attention, docs/train.md)")
  return impl


def attend_fast(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                implementation: str) -> jax.Array:
  """`attend` through jax.nn.dot_product_attention ('xla': the same mask by position; 'cudnn': its
  causal mask, valid for the full forward where q_pos = k_pos = 0..T-1)."""
  if implementation == 'cudnn':
    return attend_padded(q, k, v, implementation='cudnn')
  mask = k_pos[None, None, None, :] <= q_pos[:, None, :, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')


# cuDNN's flash attention takes head dimensions that are multiples of this, up to the maximum (the
# MNIST parity GPT's is 20: padded to 24 by `attend_padded`).
CUDNN_HEAD_MULTIPLE = 8
CUDNN_MAX_HEAD_DIM = 128


def padded_head_dim(head_dim: int) -> int:
  return -(-head_dim // CUDNN_HEAD_MULTIPLE) * CUDNN_HEAD_MULTIPLE


def attend_padded(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
  """Causal `jax.nn.dot_product_attention` over the full sequence [B, T, H, K] with the head dimension
  zero-padded to a multiple of CUDNN_HEAD_MULTIPLE and the sequence to an even length (cuDNN's
  training kernels in jax 0.11 take no odd T): the padded query and key columns add exact zeros to
  every score, the scale stays 1/sqrt(the true head dimension), a padded last position is a key no
  real query sees under the causal mask, and the padded value columns and query rows are sliced off,
  so the result is the unpadded attention's (to the kernel's rounding)."""
  t, k_dim = q.shape[1], q.shape[-1]
  pad, t_pad = padded_head_dim(k_dim) - k_dim, t % 2
  if pad or t_pad:
    widths = ((0, 0), (0, t_pad)) + ((0, 0),) * (q.ndim - 3) + ((0, pad),)
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(k_dim), is_causal=True,
                                     implementation=implementation)
  return out[:, :t, ..., :k_dim]


def attend_cached_fast(q: jax.Array, k: jax.Array, v: jax.Array, ck: jax.Array, cv: jax.Array,
                       q_pos: jax.Array) -> jax.Array:
  """`attend_cached` through jax.nn.dot_product_attention (XLA): the cache, moved to [B, S, H, K], and
  the new keys side by side, under a mask built from the positions (cache slots before the first
  new position; the new tokens causally)."""
  dt = q.dtype
  keys = jnp.concatenate([ck.astype(dt).transpose(0, 2, 1, 3), k], axis=1)     # [B, S + T, H, K]
  values = jnp.concatenate([cv.astype(dt).transpose(0, 2, 1, 3), v.astype(dt)], axis=1)
  earlier = jnp.arange(ck.shape[2])[None, None, None, :] < q_pos[:, None, :1, None]
  causal = q_pos[:, None, None, :] <= q_pos[:, None, :, None]
  mask = jnp.concatenate([jnp.broadcast_to(earlier, (q.shape[0], 1, q.shape[1], ck.shape[2])), causal], axis=-1)
  return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation='xla')


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """Causal attention by position: query at position p sees keys at positions <= p.

  q [B, T, H, K]; k, v [B, S, H, K]; q_pos [B, T]; k_pos [S]. The same function serves the full
  forward (S = T, k_pos = 0..T-1) and cached decoding (S = cache length; unwritten cache slots
  have positions beyond every query, so they are masked), which is what makes the two agree.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=jnp.float32) * scale
  mask = k_pos[None, None, None, :] <= q_pos[:, None, :, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhts,bshk->bthk', probs, v)


# Stacks of at most this many blocks are applied unrolled in the full forward (see Blocks.__call__).
UNROLL_MAX_LAYERS = 4

# Queries per block of `attend_causal` (at most CAUSAL_MAX_BLOCKS blocks): the size that was fastest on
# the 2-core CPU of benchmarks/RESULTS.md for the quick presets' sequences (375 and 1,298 tokens).
CAUSAL_QUERY_BLOCK = 128
CAUSAL_MAX_BLOCKS = 8


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attend` for the full causal forward (positions 0..T-1 for queries and keys), block by block.

  The T queries are cut into ceil(T / CAUSAL_QUERY_BLOCK) blocks (at most CAUSAL_MAX_BLOCKS); a block
  ending at position e attends to keys 0..e-1 only, so the scores above the diagonal that the mask
  would throw away are mostly never computed (about half the attention work at many blocks). Equal to
  `attend` up to float rounding (the softmax rows are the same numbers summed in another grouping).
  """
  t = q.shape[1]
  n = min(CAUSAL_MAX_BLOCKS, -(-t // CAUSAL_QUERY_BLOCK))
  if n <= 1:
    pos = jnp.arange(t)
    return attend(q, k, v, pos[None, :], pos)
  edges = [round(t * i / n) for i in range(n + 1)]
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    q_pos = jnp.arange(lo, hi)[None, :]
    out.append(attend(q[:, lo:hi], k[:, :hi], v[:, :hi], q_pos, jnp.arange(hi)))
  return jnp.concatenate(out, axis=1)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, ck: jax.Array, cv: jax.Array,
                  q_pos: jax.Array) -> jax.Array:
  """Attention of T new tokens over a read-only cache plus themselves (decoding).

  q, k, v [B, T, H, K] of the new tokens at positions q_pos [B, T] (contiguous per row);
  ck, cv [B, H, S, K] the cache, whose slots before q_pos[:, 0] hold the earlier tokens (later
  slots are ignored). Equal to `attend` over the cache with the new keys written in, without
  writing: the cache is only read here, and the caller writes the new keys once per step.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  dt = q.dtype
  lo = jnp.finfo(jnp.float32).min
  s_cache = jnp.einsum('bthk,bhsk->bhts', q, ck.astype(dt), preferred_element_type=jnp.float32) * scale
  s_new = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=jnp.float32) * scale
  earlier = jnp.arange(ck.shape[2])[None, None, None, :] < q_pos[:, None, :1, None]
  causal = q_pos[:, None, None, :] <= q_pos[:, None, :, None]
  scores = jnp.concatenate([jnp.where(earlier, s_cache, lo), jnp.where(causal, s_new, lo)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  s = ck.shape[2]
  return (jnp.einsum('bhts,bhsk->bthk', probs[..., :s], cv.astype(dt))
          + jnp.einsum('bhts,bshk->bthk', probs[..., s:], v))


class KVCache(NamedTuple):
  """Keys and values of every layer: k, v [num_layers, batch, num_heads, max_len, head_dim].

  Slot j holds the token at absolute position j. Heads before positions, so attention reads the
  cache in the layout its matmuls want (no transpose of the whole cache per step). A plain pytree: carry it through `lax.scan` /
  `lax.fori_loop`, donate it to `jax.jit`.
  """
  k: jax.Array
  v: jax.Array
  cond: jax.Array | None = None   # [1, batch] conditioning token (GPTConfig.cond_position), else None


  @property
  def max_len(self) -> int:
    return int(self.k.shape[3])

  @property
  def batch_size(self) -> int:
    return int(self.k.shape[1])


class Blocks(nnx.Module):
  """`num_layers` transformer blocks with stacked parameters, applied by one `lax.scan`.

  Block (default, pre-LN):   x += attn(ln1(x));  x += mlp(ln2(x))
  Block (block_norm=False):  x += attn(x);       x += mlp(x)        (NeF-GPT's blocks)
  Attention: fused q/k/v projection, causal softmax attention, output projection; MLP: Linear ->
  GELU (exact) -> Linear. Init as GPT-2/nanoGPT: N(0, init_std), output projections scaled by
  1/sqrt(2 * num_layers), biases 0, LayerNorm scale 1.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    n, d, h, k, f = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * n)
    zeros = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    if cfg.block_norm:
      self.ln1_scale = param(ones(n, d), 'layers', 'norm')
      self.ln1_bias = param(zeros(n, d), 'layers', 'norm') if cfg.bias else None
      self.ln2_scale = param(ones(n, d), 'layers', 'norm')
      self.ln2_bias = param(zeros(n, d), 'layers', 'norm') if cfg.bias else None
    self.qkv_kernel = param(normal(rngs.params(), (n, 3, d, h, k), std), 'layers', None, 'embed', 'heads', 'kv')
    self.out_kernel = param(normal(rngs.params(), (n, h, k, d), out_std), 'layers', 'heads', 'kv', 'embed')
    self.mlp_in_kernel = param(normal(rngs.params(), (n, d, f), std), 'layers', 'embed', 'mlp')
    self.mlp_out_kernel = param(normal(rngs.params(), (n, f, d), out_std), 'layers', 'mlp', 'embed')
    if cfg.bias:
      self.qkv_bias = param(zeros(n, 3, h, k), 'layers', None, 'heads', 'kv')
      self.out_bias = param(zeros(n, d), 'layers', 'embed')
      self.mlp_in_bias = param(zeros(n, f), 'layers', 'mlp')
      self.mlp_out_bias = param(zeros(n, d), 'layers', 'embed')

  NAMES = ('ln1_scale', 'ln1_bias', 'ln2_scale', 'ln2_bias', 'qkv_kernel', 'qkv_bias', 'out_kernel', 'out_bias',
           'mlp_in_kernel', 'mlp_in_bias', 'mlp_out_kernel', 'mlp_out_bias')

  def _stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in self.NAMES if getattr(self, name, None) is not None}

  def __call__(self, x: jax.Array, positions: jax.Array, *, rng: jax.Array | None = None,
               cache: KVCache | None = None, start=None) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D] (compute dtype), positions [B, T] absolute positions of the T tokens.

    Without a cache: causal self-attention over the T tokens (positions must be 0..T-1 in order).
    With a cache: the T new keys/values are written into their slots (positions[:, 0] onwards,
    contiguous) and each token attends to every cached slot at a position <= its own. `start`: the
    first new position when it is the same for every row (a scalar: one in-place write per step
    instead of one per row).
    Returns (x, the updated cache or None).
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    params = self._stacked()
    layer_ids = jnp.arange(cfg.num_layers)

    impl = attention_impl(cfg.attention, dt, cfg.head_dim, cached=cache is not None)

    def block(x, p, layer, ck, cv):
      key = None if rng is None else jax.random.fold_in(rng, layer)
      h = layer_norm(x, p['ln1_scale'], p.get('ln1_bias'), cfg.ln_eps) if cfg.block_norm else x
      qkv = jnp.einsum('btd,cdhk->cbthk', h, p['qkv_kernel'].astype(dt))
      if 'qkv_bias' in p:
        qkv = qkv + p['qkv_bias'].astype(dt)[:, None, None]
      q, k, v = qkv[0], qkv[1], qkv[2]
      if cfg.position == 'rope':
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
      if ck is None:
        k_pos = jnp.arange(x.shape[1])
        a = attend_causal(q, k, v) if impl == 'einsum' else attend_fast(q, k, v, positions, k_pos, impl)
      else:
        a = attend_cached(q, k, v, ck, cv, positions) if impl == 'einsum' else attend_cached_fast(q, k, v, ck, cv,
                                                                                                   positions)
      a = jnp.einsum('bthk,hkd->btd', a, p['out_kernel'].astype(dt))
      if 'out_bias' in p:
        a = a + p['out_bias'].astype(dt)
      x = x + dropout(a, cfg.dropout, None if key is None else jax.random.fold_in(key, 0))
      h = layer_norm(x, p['ln2_scale'], p.get('ln2_bias'), cfg.ln_eps) if cfg.block_norm else x
      h = jnp.einsum('btd,df->btf', h, p['mlp_in_kernel'].astype(dt))
      if 'mlp_in_bias' in p:
        h = h + p['mlp_in_bias'].astype(dt)
      h = jax.nn.gelu(h, approximate=False)
      h = jnp.einsum('btf,fd->btd', h, p['mlp_out_kernel'].astype(dt))
      if 'mlp_out_bias' in p:
        h = h + p['mlp_out_bias'].astype(dt)
      x = x + dropout(h, cfg.dropout, None if key is None else jax.random.fold_in(key, 1))
      return x, k, v

    if cache is None:
      def body(x, xs):
        p, layer = xs
        x, _, _ = block(x, p, layer, None, None)
        return x, None
      # Shallow stacks are unrolled (one straight-line program: no loop carrying the residual stream and
      # the stacked gradients, ~10% of the quick GPT's step); deeper ones stay one scanned block, so
      # compile time does not grow with depth. Decoding (below) stays scanned at every depth: unrolled,
      # the quick preset's sample stage ran 1.6x slower on CPU (benchmarks/RESULTS.md).
      x, _ = jax.lax.scan(body, x, (params, layer_ids), unroll=cfg.num_layers <= UNROLL_MAX_LAYERS)
      return x, None

    # The cache is read inside the layer scan; the new keys/values come out of it ([L, B, T, H, K])
    # and are written once, after it.
    def body_cached(x, xs):
      p, layer, ck, cv = xs
      x, k, v = block(x, p, layer, ck, cv)
      return x, (k, v)
    x, (k, v) = jax.lax.scan(body_cached, x, (params, layer_ids, cache.k, cache.v))
    k = k.transpose(0, 1, 3, 2, 4).astype(cache.k.dtype)       # [L, B, H, T, K]
    v = v.transpose(0, 1, 3, 2, 4).astype(cache.v.dtype)
    if start is not None:
      at = (0, 0, 0, jnp.asarray(start, jnp.int32), 0)
      return x, cache._replace(k=jax.lax.dynamic_update_slice(cache.k, k, at), v=jax.lax.dynamic_update_slice(cache.v, v, at))
    write = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new, (0, 0, s, 0)), in_axes=(1, 1, 0),
                     out_axes=1)
    return x, cache._replace(k=write(cache.k, k, positions[:, 0]), v=write(cache.v, v, positions[:, 0]))


def empty_cache(cfg: TransformerConfig, batch: int, max_len: int, dtype) -> KVCache:
  shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# ------------------------------------------------------------------------------------------------
# The GPT

@dataclasses.dataclass(frozen=True)
class GPTConfig(TransformerConfig):
  vocab_size: int = 256
  tie_embeddings: bool = False
  # Conditioning everywhere: the token at this position (1 = the class token of [SOS, class, ...])
  # is looked up in its own table `wce` and added to the input of every position from there on, so
  # the class reaches each weight directly instead of only through attention. -1 = off (NeF-GPT).
  cond_position: int = -1
  # Class-and-position output bias: a table [cond_classes, block_size, vocab] added to the logits,
  # indexed by (conditioning token - cond_first_token, position), so each class's per-slot token
  # histogram is learned directly rather than through the blocks. 0 = off (needs cond_position).
  cond_classes: int = 0
  cond_first_token: int = 0
  # Classifier-free guidance: the token id of the "null class" that replaces the class token of a
  # train.class_dropout share of the training sequences (the unconditional model). It is one more
  # class token (= cond_first_token + number of classes, the first id after the data's vocabulary),
  # with its own rows in wte / wce and, with class_bias, its own row of wcb. -1 = none (not trained
  # unconditionally; models.to_dict leaves it out, so older model.json / checkpoints load unchanged).
  null_class: int = -1

  @property
  def kind(self) -> str:
    return 'gpt'


class GPT(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v = cfg.embed_dim, cfg.vocab_size
    self.wte = param(normal(rngs.params(), (v, d), cfg.init_std), 'vocab', 'embed')
    if cfg.position == 'learned':
      self.wpe = param(normal(rngs.params(), (cfg.block_size, d), cfg.init_std), None, 'embed')
    if cfg.cond_position >= 0:
      self.wce = param(jnp.zeros((v, d), jnp.float32), 'vocab', 'embed')   # starts as no-op
      if cfg.cond_classes > 0:
        self.wcb = param(jnp.zeros((cfg.cond_classes, cfg.block_size, v), jnp.float32), None, None, 'vocab')
    self.blocks = Blocks(cfg, rngs=rngs)
    self.ln_f_scale = param(jnp.ones((d,), jnp.float32), 'norm')
    self.ln_f_bias = param(jnp.zeros((d,), jnp.float32), 'norm') if cfg.bias else None
    if not cfg.tie_embeddings:
      self.lm_head = param(normal(rngs.params(), (d, v), cfg.init_std), 'embed', 'vocab')

  def _embed(self, tokens: jax.Array, positions: jax.Array, rng, cond: jax.Array | None = None) -> jax.Array:
    """cond int [B]: the conditioning token of each row (cond_position >= 0), added from cond_position on."""
    cfg = self.cfg
    x = jnp.take(self.wte[...], tokens, axis=0)
    if cfg.position == 'learned':
      x = x + jnp.take(self.wpe[...], positions, axis=0)
    if cond is not None:
      c = jnp.take(self.wce[...], cond, axis=0)[:, None, :]
      x = x + jnp.where((positions >= cfg.cond_position)[..., None], c, 0.0)
    x = x.astype(cfg.compute_dtype)
    return dropout(x, cfg.dropout, None if rng is None else jax.random.fold_in(rng, 1 << 20))

  def _logits(self, x: jax.Array, positions: jax.Array, cond: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    x = layer_norm(x, self.ln_f_scale[...], None if self.ln_f_bias is None else self.ln_f_bias[...], cfg.ln_eps)
    dt = cfg.compute_dtype
    if cfg.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x, self.wte[...].astype(dt), preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum('btd,dv->btv', x, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
    if cond is not None and cfg.cond_classes > 0:
      c = jnp.clip(cond - cfg.cond_first_token, 0, cfg.cond_classes - 1)
      bias = self.wcb[...][c[:, None], positions]                        # [B, T, V]
      logits = logits + jnp.where((positions >= cfg.cond_position)[..., None], bias, 0.0)
    return logits

  def __call__(self, tokens: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """tokens int [B, T] (T <= block_size) -> float32 logits [B, T, vocab_size].

    rng: a PRNG key enables dropout (training); None = deterministic.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cp = self.cfg.cond_position
    cond = tokens[:, cp] if 0 <= cp < t else None
    x = self._embed(tokens, positions, rng, cond)
    x, _ = self.blocks(x, positions, rng=rng)
    return self._logits(x, positions, cond)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
    """An empty KVCache for `batch` rows and `max_len` positions (default block_size).

    dtype defaults to the compute dtype. Memory: 2 * num_layers * batch * max_len * embed_dim values.
    """
    max_len = self.cfg.block_size if max_len is None else int(max_len)
    if max_len > self.cfg.block_size:
      raise ValueError(f"max_len={max_len} exceeds the model's block_size={self.cfg.block_size}")
    cache = empty_cache(self.cfg, batch, max_len, dtype or self.cfg.compute_dtype)
    if self.cfg.cond_position >= 0:
      cache = cache._replace(cond=jnp.zeros((1, batch), jnp.int32))   # set when its position is decoded
    return cache

  def decode(self, tokens: jax.Array, cache: KVCache, positions) -> tuple[jax.Array, KVCache]:
    """tokens int [B, T] starting at `positions` (int, int32 [] or [B]) -> (logits [B, T, V] f32, cache).

    Deterministic (no dropout). See the module docstring for the contract.
    """
    b, t = tokens.shape
    shared = jnp.ndim(positions) == 0
    start = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b,))
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cond = None
    if self.cfg.cond_position >= 0:
      hit = pos == self.cfg.cond_position
      cond = jnp.where(hit.any(1), jnp.sum(jnp.where(hit, tokens, 0), 1), cache.cond[0]).astype(jnp.int32)
      cache = cache._replace(cond=cond[None])
    x = self._embed(tokens, pos, None, cond)
    x, cache = self.blocks(x, pos, cache=cache, start=positions if shared else None)
    return self._logits(x, pos, cond), cache


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position cross-entropy (float32) of integer targets."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked
