"""A decoder-only GPT over token sequences, with a KV cache for decoding.

Architecture (nanoGPT family): token embedding + learned absolute position embedding (or RoPE),
`num_layers` blocks (`nfjax.models.layers.Blocks`), final LayerNorm `ln_f`, output projection
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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import layers
from nfjax.models.layers import KVCache, TransformerConfig, layer_norm, param


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

  @property
  def kind(self) -> str:
    return 'gpt'


class GPT(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v = cfg.embed_dim, cfg.vocab_size
    self.wte = param(layers.normal(rngs.params(), (v, d), cfg.init_std), 'vocab', 'embed')
    if cfg.position == 'learned':
      self.wpe = param(layers.normal(rngs.params(), (cfg.block_size, d), cfg.init_std), None, 'embed')
    if cfg.cond_position >= 0:
      self.wce = param(jnp.zeros((v, d), jnp.float32), 'vocab', 'embed')   # starts as no-op
      if cfg.cond_classes > 0:
        self.wcb = param(jnp.zeros((cfg.cond_classes, cfg.block_size, v), jnp.float32), None, None, 'vocab')
    self.blocks = layers.Blocks(cfg, rngs=rngs)
    self.ln_f_scale = param(jnp.ones((d,), jnp.float32), 'norm')
    self.ln_f_bias = param(jnp.zeros((d,), jnp.float32), 'norm') if cfg.bias else None
    if not cfg.tie_embeddings:
      self.lm_head = param(layers.normal(rngs.params(), (d, v), cfg.init_std), 'embed', 'vocab')

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
    return layers.dropout(x, cfg.dropout, None if rng is None else jax.random.fold_in(rng, 1 << 20))

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
    cache = layers.empty_cache(self.cfg, batch, max_len, dtype or self.cfg.compute_dtype)
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
