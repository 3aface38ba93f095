"""Jitted autoregressive sampling with a KV cache (and a no-cache reference), batched over samples
and over a grid of settings in one compiled call.

* Static shapes: the prompt length T0 and the number of new tokens are fixed per compile; the loop
  is one `lax.scan` whose carry is the model's KV cache (`model.init_cache` / `model.decode`, see
  nfjax/models/gpt.py).
* Settings are per row: temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] (1 = off). A
  grid of settings is one batch, so the whole grid compiles once.
* Weight slots can only receive codes: logits outside `allowed` (default: ids < num_codes) are
  masked before filtering, so special tokens never appear where a weight comes next. A table of
  masks [C, num_new, V] with `allowed_rows` [B] gives every row its own (`training_support`: each
  slot limited to the codes the training sequences of the row's class or prototype use there).
* Per-sample randomness: row b at step i draws with fold_in(keys[b], i); a sample does not depend
  on the batch it is in or on its position in the batch.
* Classifier-free guidance (`guidance` [B], `null_prompt` [B, T0]): the B conditional rows and
  their B unconditional twins (the prompt with the null class, `unconditional`) go through one
  forward / one KV cache of 2B rows; row b samples from uncond + g_b * (cond - uncond) (exactly
  cond where g_b = 1), computed before the mask, temperature and filters, and feeds the token it
  drew to both of its rows. Without `guidance` the program is the plain one (B rows).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfjax import checkpoint, models, tokenizers
from nfjax.errors import NfjaxError
from nfjax.io import tokens as token_io
from nfjax.io import workdir as wd

NEG = -1e30


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """One row: logits [V] (already masked) -> logits to sample from, scaled by 1/temperature.

  top_k <= 0 and top_p >= 1 switch the filters off; ties at the threshold are kept.
  """
  v = logits.shape[-1]
  t = jnp.maximum(temperature, 1e-6)
  scaled = logits / t
  srt = jnp.sort(scaled)[::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = srt[k - 1]
  scaled = jnp.where(scaled < kth, NEG, scaled)
  # top-p (nucleus) over what top-k kept: smallest prefix of the sorted distribution with mass >= p.
  srt = jnp.where(jnp.arange(v) < k, srt, NEG)
  probs = jax.nn.softmax(srt)
  cum = jnp.cumsum(probs)
  cutoff = jnp.minimum(jnp.sum(cum < top_p), v - 1)
  pth = jnp.where(top_p < 1.0, srt[cutoff], NEG)
  return jnp.where(scaled < pth, NEG, scaled)


def pick(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """One row: sample a token id (argmax when temperature == 0)."""
  filtered = filter_logits(logits, temperature, top_k, top_p)
  sampled = jax.random.categorical(key, filtered)
  return jnp.where(temperature <= 0.0, jnp.argmax(logits), sampled).astype(jnp.int32)


def _pick_rows(logits, keys, step, temperature, top_k, top_p, allowed):
  """allowed: bool [V] (every row) or [B, V] (one mask per row)."""
  logits = jnp.where(allowed if allowed.ndim == 2 else allowed[None, :], logits.astype(jnp.float32), NEG)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(pick)(logits, step_keys, temperature, top_k, top_p)


def guide(logits: jax.Array, guidance: jax.Array | None) -> jax.Array:
  """logits [2B, V] (B conditional rows, then their B unconditional twins) -> the guided logits [B, V]:
  uncond + g * (cond - uncond), and exactly cond where g == 1. guidance None: logits unchanged."""
  if guidance is None:
    return logits
  b = guidance.shape[0]
  cond, uncond = logits[:b].astype(jnp.float32), logits[b:].astype(jnp.float32)
  g = guidance.astype(jnp.float32)[:, None]
  return jnp.where(g == 1.0, cond, uncond + g * (cond - uncond))


def generate(model, prompt: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
             top_p: jax.Array, num_new: int, allowed: jax.Array, use_cache: bool = True,
             on_step: Callable | None = None, max_len: int | None = None, guidance: jax.Array | None = None,
             null_prompt: jax.Array | None = None, allowed_rows: jax.Array | None = None) -> jax.Array:
  """prompt int [B, T0] -> new tokens int [B, num_new]. Call inside jit (see `make_generate`).

  allowed: bool [V] or [num_new, V] — which ids may be generated at each new position; with
  allowed_rows int [B], a table [C, num_new, V] of which row b uses allowed[allowed_rows[b]].
  guidance float [B] with null_prompt int [B, T0]: classifier-free guidance (module docstring).
  use_cache=False recomputes the whole prefix every step (NeF-GPT's way): the reference.
  max_len: the positions the model works over (the cache length; the no-cache forward's length),
  default T0 + num_new - 1 (what is needed). A longer one gives the same tokens at the cost per
  token of longer sequences: benchmarks time a few tokens of a long sequence with it.
  """
  b, t0 = prompt.shape
  if allowed_rows is None:
    allowed = jnp.broadcast_to(allowed, (num_new, allowed.shape[-1]))
    at = lambda i: allowed[i]                                             # noqa: E731  [V]
  else:
    if allowed.ndim != 3 or allowed.shape[1] != num_new:
      raise ValueError(f"allowed_rows needs a table allowed [C, {num_new}, V], got {allowed.shape}")
    at = lambda i: jnp.take(allowed[:, i], allowed_rows, axis=0)           # noqa: E731  [B, V]
  total = t0 + num_new
  length = total - 1 if max_len is None else max(int(max_len), total - 1)
  if (guidance is None) != (null_prompt is None):
    raise ValueError("classifier-free guidance needs both guidance and null_prompt")
  rows = prompt if guidance is None else jnp.concatenate([prompt, null_prompt.astype(prompt.dtype)], 0)
  twice = (lambda tok: tok) if guidance is None else (lambda tok: jnp.concatenate([tok, tok], 0))

  if use_cache:
    # The last token is never fed back, so the cache (and the model's context) needs total - 1.
    cache = model.init_cache(rows.shape[0], length)
    logits, cache = model.decode(rows, cache, 0)

    def step(carry, i):
      cache, last = carry
      tok = _pick_rows(guide(last, guidance), keys, i, temperature, top_k, top_p, at(i))
      logits, cache = model.decode(twice(tok)[:, None], cache, t0 + i)
      return (cache, logits[:, 0]), tok

    (_, last), toks = jax.lax.scan(step, (cache, logits[:, -1]), jnp.arange(num_new - 1))
    final = _pick_rows(guide(last, guidance), keys, num_new - 1, temperature, top_k, top_p, at(num_new - 1))
    return jnp.concatenate([toks.T, final[:, None]], axis=1)

  buf = jnp.zeros((rows.shape[0], length + 1), jnp.int32).at[:, :t0].set(rows)

  def step_nc(buf, i):
    logits = model(buf[:, :length] if length > 0 else buf)
    last = jax.lax.dynamic_index_in_dim(logits, t0 + i - 1, axis=1, keepdims=False)
    tok = _pick_rows(guide(last, guidance), keys, i, temperature, top_k, top_p, at(i))
    return jax.lax.dynamic_update_index_in_dim(buf, twice(tok), t0 + i, axis=1), tok

  _, toks = jax.lax.scan(step_nc, buf, jnp.arange(num_new))
  return toks.T


def make_generate(model, num_new: int, use_cache: bool = True, max_len: int | None = None):
  """A jitted fn(prompt, keys, temperature, top_k, top_p, allowed[, guidance, null_prompt], allowed_rows=None)
  -> tokens [B, num_new] (`max_len`, classifier-free `guidance` / `null_prompt`, per-row masks
  `allowed_rows`: see `generate`; a call with guidance is a second program, of 2B rows).

  The model is split into (graphdef, state) once; the compiled function takes the state as an
  argument so it is not baked into the executable as constants.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, prompt, keys, temperature, top_k, top_p, allowed, guidance=None, null_prompt=None,
         allowed_rows=None):
    m = nnx.merge(graphdef, state)
    return generate(m, prompt, keys, temperature, top_k, top_p, num_new, allowed, use_cache=use_cache,
                    max_len=max_len, guidance=guidance, null_prompt=null_prompt, allowed_rows=allowed_rows)

  full = lambda args: tuple(args) + (None,) * (8 - len(args))  # noqa: E731  (no guidance: None, None)

  def call(*args, allowed_rows=None):
    return fn(state, *full(args), allowed_rows)

  def compile(*args, allowed_rows=None):
    """Compile for these shapes without running; returns a callable with `call`'s signature."""
    exe = fn.lower(state, *full(args), allowed_rows).compile()
    return lambda *a, allowed_rows=None: exe(state, *full(a), allowed_rows)

  call.jitted = fn
  call.compile = compile
  return call


def sample_keys(seed: int, setting_index: int, sample_ids) -> jax.Array:
  """Per-sample keys: fold_in(fold_in(key(seed), setting), sample_id)."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), setting_index)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_ids, jnp.uint32))


def beam_search(model, prompt: jax.Array, beam_width: int, num_new: int, allowed: jax.Array):
  """Highest-likelihood continuations by beam search with the KV cache. Call inside jit.

  prompt int [B, T0] -> (tokens int [B, num_new] of the best beam, its log-probability [B]).
  Beams live on the batch axis of the cache ([B * W] rows) and are reordered every step.
  beam_width = 1 is greedy decoding.
  """
  b, t0 = prompt.shape
  w = beam_width
  allowed = jnp.broadcast_to(allowed, (num_new, allowed.shape[-1]))
  rows = jnp.repeat(prompt, w, axis=0)                              # [B*W, T0]
  cache = model.init_cache(b * w, t0 + num_new - 1)   # the last token is never fed back
  logits, cache = model.decode(rows, cache, 0)
  # Only beam 0 is live at the start (all beams share the prompt).
  scores = jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), (b, 1))   # [B, W]
  hist = jnp.zeros((b, w, num_new), jnp.int32)

  def select(last, scores, hist, i):
    logp = jax.nn.log_softmax(jnp.where(allowed[i][None, :], last.astype(jnp.float32), NEG), axis=-1)
    v = logp.shape[-1]
    cand = (scores[:, :, None] + logp.reshape(b, w, v)).reshape(b, w * v)
    top, idx = jax.lax.top_k(cand, w)                                # [B, W]
    parent, tok = idx // v, (idx % v).astype(jnp.int32)
    flat_parent = (jnp.arange(b)[:, None] * w + parent).reshape(-1)
    hist = jnp.take_along_axis(hist, parent[:, :, None], axis=1).at[:, :, i].set(tok)
    return top, tok, flat_parent, hist

  def step(carry, i):
    cache, last, scores, hist = carry
    scores, tok, flat_parent, hist = select(last, scores, hist, i)
    cache = jax.tree.map(lambda a: jnp.take(a, flat_parent, axis=1), cache)
    logits, cache = model.decode(tok.reshape(-1, 1), cache, t0 + i)
    return (cache, logits[:, 0], scores, hist), None

  (_, last, scores, hist), _ = jax.lax.scan(step, (cache, logits[:, -1], scores, hist), jnp.arange(num_new - 1))
  scores, _, _, hist = select(last, scores, hist, num_new - 1)
  best = jnp.argmax(scores, axis=1)
  return jnp.take_along_axis(hist, best[:, None, None], axis=1)[:, 0], jnp.max(scores, axis=1)


def make_beam_search(model, beam_width: int, num_new: int):
  """A jitted fn(prompt, allowed) -> (tokens [B, num_new], log-prob [B])."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, prompt, allowed):
    return beam_search(nnx.merge(graphdef, state), prompt, beam_width, num_new, allowed)

  return lambda prompt, allowed: fn(state, prompt, allowed)


def prompts(vocab, labels: np.ndarray, prefix_len: int) -> np.ndarray:
  """The prompts [n, prefix_len] of a token dataset's layout: [SOS] or [SOS, class]."""
  if prefix_len > 2:
    raise NfjaxError(f"prompts of {prefix_len} tokens are not supported (expected [SOS] or [SOS, class])")
  cols = [np.full(len(labels), vocab.sos)]
  if prefix_len >= 2:
    cols.append(vocab.class_token(labels) if vocab.num_classes else np.full(len(labels), vocab.sos))
  return np.stack(cols[:prefix_len], 1).astype(np.int32)


def unconditional(prompt: np.ndarray, null_class: int) -> np.ndarray:
  """The null-class twins of prompts [n, 2] ([SOS, class] -> [SOS, null]): what the unconditional rows
  of classifier-free guidance start from (the model's GPTConfig.null_class)."""
  if prompt.shape[1] < 2 or null_class < 0:
    raise NfjaxError("classifier-free guidance needs [SOS, class] prompts and a model with a null class")
  out = np.array(prompt, np.int32, copy=True)
  out[:, 1] = null_class
  return out


def code_mask(vocab, num_new: int, model_vocab: int | None = None) -> jax.Array:
  """allowed [num_new, V]: only codes (never a special or class token) in weight slots. V: the model's
  vocabulary (`model_vocab`, e.g. + the null class of classifier-free guidance), default the data's."""
  allowed = np.zeros((num_new, max(vocab.vocab_size, int(model_vocab or 0))), bool)
  allowed[:, :vocab.num_codes] = True
  return jnp.asarray(allowed)


def training_support(tokens, num_new: int, model_vocab: int | None = None) -> np.ndarray:
  """sample.support='training': a table bool [C, num_new, V] over the C conditioning indices. Slot j
  of a sequence conditioned on c may take only the codes that the training sequences (`train_idx`)
  conditioned on c hold at slot j, so a sample never holds a code no training field of its class (or
  prototype) has there; the no-structure row (nfjax/evaluate/no_structure.py) draws from the same
  support. Without a class token, one pooled table (C = 1); a condition without training sequences
  gets every condition's codes. `tokens`: a TokenDataset."""
  vocab = tokens.vocab
  train = np.asarray(tokens.train_idx, np.int64)
  seqs = np.asarray(tokens.tokens)[train][:, tokens.prefix_len:tokens.prefix_len + num_new].astype(np.int64)
  if seqs.shape[1] != num_new:
    raise NfjaxError(f"training sequences have {seqs.shape[1]} weight tokens, the sampler makes {num_new}")
  classed = tokens.prefix_len >= 2 and vocab.num_classes > 0
  cond = tokens.conditions()[train].astype(np.int64) if classed else np.zeros(len(train), np.int64)
  c = max(1, vocab.num_classes) if classed else 1
  table = np.zeros((c, num_new, max(vocab.vocab_size, int(model_vocab or 0))), bool)
  table[cond[:, None], np.arange(num_new)[None, :], seqs] = True
  table[:, :, vocab.num_codes:] = False             # never a special or class token
  empty = ~table.any(axis=(1, 2))
  if empty.any():                                   # no training sequence: every condition's codes
    table[empty] = table[~empty].any(0) if (~empty).any() else np.asarray(code_mask(vocab, num_new, model_vocab))
  return table


def support_rows(table: np.ndarray, conditions: np.ndarray) -> np.ndarray:
  """`allowed_rows` int32 [n] of samples conditioned on `conditions` [n] for a `training_support` table:
  each condition's own table, or the pooled one where the table has one (no class token)."""
  conditions = np.asarray(conditions, np.int32)
  return conditions if len(table) > 1 else np.zeros_like(conditions)


def load_generator(workdir: str, step: int | None = None, device: jax.Device | None = None,
                   attention: str | None = None):
  """(model, token dataset, tokenizer, checkpoint meta) of a workdir with finished tokenize and train
  stages; `step` picks a checkpoint (default: the latest). The parameters live on `device` (default:
  `jax.local_devices()[0]`), and the jitted sampler of `make_generate` computes there. `attention`: how the
  model computes attention (nfjax.models.gpt.ATTENTION; default 'auto')."""
  tokens = token_io.load(wd.path(workdir, wd.TOKENS))
  mdef, params, meta = checkpoint.load_model(wd.path(workdir, wd.TRANSFORMER, 'checkpoints'), step, device)
  if attention is not None and attention != mdef.cfg.attention:
    mdef = models.build(dataclasses.replace(mdef.cfg, attention=attention))
  tokenizer = tokenizers.restore(wd.path(workdir, wd.TOKENIZER))
  if tokenizer.tokens_per_field != tokens.tokens_per_field:
    raise NfjaxError(f"the tokenizer in {workdir}/tokenizer makes {tokenizer.tokens_per_field} tokens per field but "
                     f"{workdir}/tokens has {tokens.tokens_per_field}: re-run the tokenize stage")
  return mdef.bind(params), tokens, tokenizer, meta
