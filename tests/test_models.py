"""Models: KV-cache decoding == full forward, causality, NeF-GPT parity structure, regression
transformer, sharding of parameters."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from nfjax import config as config_lib
from nfjax import models, sharding
from nfjax.configs import checks
from nfjax.errors import ConfigError
from nfjax.models import GPTConfig, RegressionConfig, gpt
from nfjax.stages import train

TINY = GPTConfig(num_layers=2, num_heads=4, embed_dim=32, block_size=24, vocab_size=19)


def _init(cfg, seed=0):
  mdef = models.build(cfg)
  return mdef, jax.jit(mdef.init)(jax.random.PRNGKey(seed))


def _fwd(mdef):
  """The jitted forward of a model (eager calls dispatch op by op: slow on 2 cores)."""
  return jax.jit(lambda p, *a, **kw: mdef.bind(p)(*a, **kw))


def _tokens(cfg, batch=3, length=None, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length or cfg.block_size), 0, cfg.vocab_size)


def _decode_all(mdef, params, tokens, prefill: int, cache_len: int):
  """Prefill `prefill` tokens, then decode the rest one token at a time in a jitted lax.scan."""
  def run(params, tokens):
    model = mdef.bind(params)
    cache = model.init_cache(tokens.shape[0], cache_len, jnp.float32)
    first, cache = model.decode(tokens[:, :prefill], cache, 0)

    def step(cache, i):
      logits, cache = model.decode(jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), cache, i)
      return cache, logits[:, 0]
    cache, rest = jax.lax.scan(step, cache, jnp.arange(prefill, tokens.shape[1]))
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)
  return jax.jit(run)(params, tokens)


def _with_random_cond(params, seed=3):
  """The class-embedding table starts at zero (a no-op): give it values so tests can see it."""
  if 'wce' in params:
    params = dict(params, wce=jax.random.normal(jax.random.PRNGKey(seed), params['wce'].shape))
  if 'wcb' in params:
    params = dict(params, wcb=jax.random.normal(jax.random.PRNGKey(seed + 1), params['wcb'].shape))
  return params


@pytest.mark.parametrize('variant', ['pre_ln', 'nef_gpt_parity_tied', 'rope_no_bias', 'class_embedding',
                                     'class_bias', 'scanned_deep'])
def test_kv_cache_decode_matches_full_forward(variant, monkeypatch):
  # The full forward's attention in query blocks of 5 (block_size 24: 5 blocks of 4-5 queries, the
  # last attending to all 24 keys), so block-causal attention is checked against cached decoding.
  monkeypatch.setattr(gpt, 'CAUSAL_QUERY_BLOCK', 5)
  if variant == 'scanned_deep':   # a stack deeper than UNROLL_MAX_LAYERS: the full forward scanned too
    monkeypatch.setattr(gpt, 'UNROLL_MAX_LAYERS', 1)
  cfg = {'pre_ln': TINY, 'scanned_deep': dataclasses.replace(TINY, num_layers=3),
         'nef_gpt_parity_tied': dataclasses.replace(TINY, block_norm=False, tie_embeddings=True),
         'rope_no_bias': dataclasses.replace(TINY, position='rope', bias=False),
         'class_embedding': dataclasses.replace(TINY, cond_position=1),
         'class_bias': dataclasses.replace(TINY, cond_position=1, cond_classes=3,
                                           cond_first_token=TINY.vocab_size - 3)}[variant]
  mdef, params = _init(cfg)
  params = _with_random_cond(params)
  tokens = _tokens(cfg)
  full = np.asarray(jax.jit(lambda p, t: mdef.bind(p)(t))(params, tokens))
  assert full.shape == (3, cfg.block_size, cfg.vocab_size) and full.dtype == np.float32
  # The cache is longer than needed (unwritten slots must be masked) and the prompt is 2 tokens.
  dec = np.asarray(_decode_all(mdef, params, tokens, prefill=2, cache_len=cfg.block_size))
  np.testing.assert_allclose(dec, full, atol=2e-5, rtol=1e-5)
  # Sanity: the comparison is not vacuous (logits differ across positions).
  assert np.abs(full[:, 1:] - full[:, :-1]).max() > 1e-2


def test_decode_with_per_row_start_positions():
  """positions may be an int32 [B] array: rows at different positions in one call."""
  mdef, params = _init(TINY)
  tokens = _tokens(TINY, batch=2, length=10)
  full = np.asarray(_fwd(mdef)(params, tokens))

  @jax.jit
  def run(params, tokens):
    model = mdef.bind(params)
    cache = model.init_cache(2, 12)
    # Row 0 has 4 tokens cached, row 1 has 6 (written with a scalar start, then a [B] start).
    _, cache = model.decode(tokens[:, :4], cache, 0)
    _, cache = model.decode(tokens[:, 4:6], cache, jnp.array([4, 4], jnp.int32))
    # Now row 0 decodes its tokens 4, 5 again while row 1 decodes its tokens 6, 7: different
    # start positions in one call.
    step = jnp.stack([tokens[0, 4:6], tokens[1, 6:8]])
    logits, _ = model.decode(step, cache, jnp.array([4, 6], jnp.int32))
    return logits
  logits = np.asarray(run(params, tokens))
  np.testing.assert_allclose(logits[0], full[0, 4:6], atol=2e-5)
  np.testing.assert_allclose(logits[1], full[1, 6:8], atol=2e-5)


def test_init_cache_shape_and_limits():
  mdef, params = _init(TINY)
  model = mdef.bind(params)
  cache = model.init_cache(5, 7, jnp.bfloat16)
  assert cache.k.shape == (2, 5, 4, 7, 8) and cache.k.dtype == jnp.bfloat16
  assert cache.max_len == 7 and cache.batch_size == 5
  assert model.init_cache(1).max_len == TINY.block_size
  with pytest.raises(ValueError, match='block_size'):
    model.init_cache(1, TINY.block_size + 1)


def test_forward_is_causal():
  mdef, params = _init(TINY)
  tokens = _tokens(TINY)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % TINY.vocab_size)
  fwd = _fwd(mdef)
  a, b = fwd(params, tokens), fwd(params, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-4


def test_nef_gpt_parity_architecture_matches_its_parameter_count():
  """NeF-GPT's MNIST GPT printed 5,616,480 non-position parameters; its unused ln_1/ln_2 (8 layers
  x 2 x (240 + 240)) were counted there but do not exist in the parity model."""
  cfg = GPTConfig(num_layers=8, num_heads=12, embed_dim=240, block_size=561, vocab_size=256,
                  block_norm=False, tie_embeddings=True)
  mdef = models.build(cfg)
  assert mdef.num_non_embedding_params + 8 * 2 * 480 == 5_616_480
  paths = {'/'.join(p) for p in mdef.paths()}
  assert 'lm_head' not in paths and not any('ln1' in p or 'ln2' in p for p in paths)
  assert {'ln_f_scale', 'ln_f_bias', 'wte', 'wpe'} <= paths
  default = models.build(dataclasses.replace(cfg, block_norm=True, tie_embeddings=False))
  assert default.num_params == mdef.num_params + 8 * 2 * 480 + 240 * 256


def test_bfloat16_compute_close_to_float32():
  mdef32, params = _init(TINY)
  mdef16 = models.build(dataclasses.replace(TINY, dtype='bfloat16'))
  tokens = _tokens(TINY)
  a = np.asarray(_fwd(mdef32)(params, tokens))
  b = _fwd(mdef16)(params, tokens)
  assert b.dtype == jnp.float32  # logits stay float32
  assert 0 < np.abs(a - np.asarray(b)).max() < 0.05


def test_dropout_only_with_a_key():
  mdef, params = _init(dataclasses.replace(TINY, dropout=0.3))
  tokens = _tokens(TINY)
  fwd = _fwd(mdef)
  np.testing.assert_array_equal(np.asarray(fwd(params, tokens)), np.asarray(fwd(params, tokens)))
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  np.testing.assert_array_equal(np.asarray(fwd(params, tokens, rng=k1)), np.asarray(fwd(params, tokens, rng=k1)))
  assert np.abs(np.asarray(fwd(params, tokens, rng=k1) - fwd(params, tokens, rng=k2))).max() > 1e-3
  assert np.abs(np.asarray(fwd(params, tokens, rng=k1) - fwd(params, tokens))).max() > 1e-3


def test_regression_transformer_uses_its_input_embedding_and_is_causal():
  cfg = RegressionConfig(num_layers=2, num_heads=2, embed_dim=16, block_size=12, num_classes=3)
  mdef, params = _init(cfg)
  values = jax.random.normal(jax.random.PRNGKey(3), (2, 11))
  labels = jnp.array([0, 2])
  model = _fwd(mdef)
  pred = np.asarray(model(params, values, labels))
  assert pred.shape == (2, 12) and pred.dtype == np.float32
  # Changing value 5 (input position 6) changes predictions from position 6 on, and nothing before.
  other = np.asarray(model(params, values.at[:, 5].add(1.0), labels))
  np.testing.assert_array_equal(other[:, :6], pred[:, :6])
  assert np.abs(other[:, 6:] - pred[:, 6:]).max() > 1e-4
  # The class conditions the first prediction (learned start embedding per class).
  assert np.abs(np.asarray(model(params, values, jnp.array([1, 1])))[:, 0] - pred[:, 0]).max() > 1e-6
  # Zeroing the value embedding removes the dependence on the values (it is the only path).
  params0 = {**params, 'value_kernel': jnp.zeros_like(params['value_kernel'])}
  np.testing.assert_allclose(np.asarray(model(params0, values, labels)),
                             np.asarray(model(params0, values * 3.0, labels)), atol=1e-6)


def test_model_config_round_trips_through_json():
  for cfg in (TINY, RegressionConfig(num_layers=1, num_heads=2, embed_dim=8, block_size=5, loss='mse')):
    d = json.loads(json.dumps(models.to_dict(cfg)))
    assert models.config_from_dict(d) == cfg


def test_fitted_sharding_falls_back_to_replication():
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  P = jax.sharding.PartitionSpec
  assert sharding.fitted_spec(mesh, ('vocab', 'embed'), (258, 32)) == P('model', 'fsdp')
  assert sharding.fitted_spec(mesh, ('vocab', 'embed'), (257, 31)) == P(None, None)
  assert sharding.fitted_spec(mesh, ('batch', None), (8, 5)) == P(('data', 'fsdp'), None)
  assert sharding.fitted_spec(mesh, ('batch', None), (6, 5)) == P('data', None)  # 6 % 4 != 0, 6 % 2 == 0
  assert sharding.fitted_spec(mesh, ('heads', 'mlp'), (4, 8)) == P('model', None)  # one mesh axis once


def test_param_shardings_follow_logical_axes():
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  mdef = models.build(dataclasses.replace(TINY, vocab_size=20))
  sh = mdef.shardings(mesh)
  P = jax.sharding.PartitionSpec
  assert sh['wte'].spec == P('model', 'fsdp')
  assert sh['blocks']['qkv_kernel'].spec == P(None, None, 'fsdp', 'model', None)
  assert sh['blocks']['mlp_out_kernel'].spec == P(None, 'model', 'fsdp')
  assert sh['ln_f_scale'].spec == P(None)
  params = jax.jit(mdef.init, out_shardings=sh)(jax.random.PRNGKey(0))
  assert params['blocks']['qkv_kernel'].sharding == sh['blocks']['qkv_kernel']
  # Sharded parameters give the same forward as unsharded ones.
  ref = jax.jit(mdef.init)(jax.random.PRNGKey(0))
  tokens = _tokens(TINY, batch=4)
  fwd = _fwd(mdef)
  np.testing.assert_allclose(np.asarray(fwd(params, tokens)), np.asarray(fwd(ref, tokens)), atol=1e-5)


def test_greedy_sampling_with_the_cache_matches_full_forwards():
  """The docs/train.md example: prompt [SOS, class], then one token at a time up to block_size."""
  cfg = dataclasses.replace(TINY, block_size=12)
  mdef, params = _init(cfg)
  L = cfg.block_size + 1  # sequence length: 2 prompt tokens + 11 generated

  @jax.jit
  def greedy(params, prompt):
    model = mdef.bind(params)
    cache = model.init_cache(prompt.shape[0], L - 1)
    logits, cache = model.decode(prompt, cache, 0)

    def step(carry, pos):
      tok, cache = carry
      logits, cache = model.decode(tok, cache, pos)
      nxt = jnp.argmax(logits[:, -1], -1)[:, None]
      return (nxt, cache), nxt[:, 0]
    first = jnp.argmax(logits[:, -1], -1)[:, None]
    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(2, L - 1))
    return jnp.concatenate([first, rest.T], 1)

  prompt = jnp.array([[16, 17], [16, 18]])
  got = np.asarray(greedy(params, prompt))
  assert got.shape == (2, L - 2)
  # Reference: a full (causal) forward over a fixed-length buffer for every new token.
  fwd = _fwd(mdef)
  buf = np.zeros((2, L - 1), np.int32)
  buf[:, :2] = prompt
  ref = []
  for i in range(2, L):
    tok = np.asarray(jnp.argmax(fwd(params, jnp.asarray(buf))[:, i - 1], -1))
    ref.append(tok)
    if i < L - 1:
      buf[:, i] = tok
  np.testing.assert_array_equal(got, np.stack(ref, 1))


def test_class_embedding_conditions_every_later_position_and_not_earlier():
  cfg = dataclasses.replace(TINY, cond_position=1)
  mdef, params = _init(cfg)
  params = _with_random_cond(params)
  tokens = _tokens(cfg, batch=1, length=12)
  other = tokens.at[0, 1].set((tokens[0, 1] + 1) % cfg.vocab_size)
  fwd = _fwd(mdef)
  a, b = np.asarray(fwd(params, tokens)), np.asarray(fwd(params, other))
  np.testing.assert_array_equal(a[0, 0], b[0, 0])           # position 0 predicts the class: no leak
  assert np.abs(a[0, 1:] - b[0, 1:]).min(axis=-1).max() > 0  # later positions see it
  # The same change through the embedding alone (attention blocked): with wce zero, only attention
  # carries the class; with wce set, the last position moves much more.
  zero = dict(params, wce=jnp.zeros_like(params['wce']))
  az, bz = np.asarray(fwd(zero, tokens)), np.asarray(fwd(zero, other))
  assert np.abs(a[0, -1] - b[0, -1]).mean() > np.abs(az[0, -1] - bz[0, -1]).mean()


def test_class_bias_adds_its_class_and_position_row_to_the_logits():
  v = TINY.vocab_size
  cfg = dataclasses.replace(TINY, cond_position=1, cond_classes=3, cond_first_token=v - 3)
  mdef, params = _init(cfg)
  tokens = _tokens(cfg, batch=2, length=10).at[:, 1].set(jnp.array([v - 3, v - 1]))
  fwd = _fwd(mdef)
  base = np.asarray(fwd(params, tokens))                       # wcb starts at zero: no effect
  bias = jax.random.normal(jax.random.PRNGKey(7), params['wcb'].shape)
  moved = np.asarray(fwd(dict(params, wcb=bias), tokens))
  np.testing.assert_array_equal(moved[:, 0], base[:, 0])       # before the class token: untouched
  for row, cls in ((0, 0), (1, 2)):
    np.testing.assert_allclose(moved[row, 1:] - base[row, 1:], np.asarray(bias)[cls, 1:10], atol=1e-5)


# -- attention through jax.nn.dot_product_attention vs the einsum reference (issue 16) -------------

ON_GPU = jax.default_backend() == 'gpu'


@pytest.mark.parametrize('attention,dtype,tol,embed_dim', [
    ('xla', 'float32', 2e-5, 32), ('xla', 'bfloat16', 5e-2, 32),
    pytest.param('cudnn', 'bfloat16', 5e-2, 40, marks=pytest.mark.skipif(not ON_GPU, reason='cuDNN needs a GPU'))])
def test_dot_product_attention_matches_the_einsum_path_forward_and_grad(attention, dtype, tol, embed_dim):
  """attention='xla' / 'cudnn' (jax.nn.dot_product_attention) gives the einsum path's logits and
  gradients; 'cudnn' (GPU only) at heads of 10, padded to 16 for cuDNN."""
  cfg = dataclasses.replace(TINY, dtype=dtype, cond_position=1, embed_dim=embed_dim)
  ref, params = _init(dataclasses.replace(cfg, attention='einsum'))
  fast = models.build(dataclasses.replace(cfg, attention=attention))
  params = _with_random_cond(params)
  tokens = _tokens(cfg)

  def loss(mdef):
    return jax.jit(jax.value_and_grad(
        lambda p: gpt.cross_entropy(mdef.bind(p)(tokens[:, :-1]), tokens[:, 1:]).mean()))
  (la, ga), (lb, gb) = loss(ref)(params), loss(fast)(params)
  assert abs(float(la) - float(lb)) < tol
  a, b = np.asarray(_fwd(ref)(params, tokens)), np.asarray(_fwd(fast)(params, tokens))
  np.testing.assert_allclose(b, a, atol=tol, rtol=tol)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    scale = max(float(np.abs(np.asarray(x)).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(y) / scale, np.asarray(x) / scale, atol=tol)


@pytest.mark.parametrize('dtype,tol', [('float32', 2e-5), ('bfloat16', 5e-2)])
def test_cached_decoding_with_dot_product_attention_matches_full_forward(dtype, tol):
  """attention='xla' in cached decoding (cache + new tokens under a mask from their positions):
  cached logits == uncached logits, and == the einsum path's cached logits. Float32 matmuls at full
  precision: on a GPU the default is TF32, whose rounding (~1e-4 here) is not what this test is about."""
  cfg = dataclasses.replace(TINY, dtype=dtype, attention='xla', position='rope')
  mdef, params = _init(cfg)
  ref = models.build(dataclasses.replace(cfg, attention='einsum'))
  tokens = _tokens(cfg)
  with jax.default_matmul_precision('highest'):
    full = np.asarray(_fwd(mdef)(params, tokens))
    dec = np.asarray(_decode_all(mdef, params, tokens, prefill=3, cache_len=cfg.block_size))
    dec_ref = np.asarray(_decode_all(ref, params, tokens, prefill=3, cache_len=cfg.block_size))
  np.testing.assert_allclose(dec, full, atol=tol, rtol=tol)
  np.testing.assert_allclose(dec, dec_ref, atol=tol, rtol=tol)


def test_attention_choice_is_not_part_of_the_saved_model():
  """to_dict leaves `attention` out; a saved dict without it (every checkpoint before it existed)
  loads with 'auto'; 'auto' is the einsum path on CPU; a bad value is one clear error."""
  d = models.to_dict(dataclasses.replace(TINY, attention='xla'))
  assert 'attention' not in d and models.config_from_dict(d).attention == 'auto'
  assert gpt.attention_impl('auto', jnp.bfloat16, 8, cached=False) == 'einsum'   # tests run on CPU
  assert gpt.attention_impl('cudnn', jnp.bfloat16, 8, cached=True) == 'einsum'
  with pytest.raises(ValueError, match='attention'):
    dataclasses.replace(TINY, attention='flash')


def test_model_attention_key_is_checked_and_left_out_of_the_train_fingerprint():
  a, b = load_config(**{'model.attention': 'xla'}), load_config(**{'model.attention': 'einsum'})
  assert config_lib.fingerprint(a, train.KEYS) == config_lib.fingerprint(b, train.KEYS)
  assert 'attention' not in config_lib.fingerprint(a, train.KEYS)['model']
  with pytest.raises(ConfigError, match='model.attention'):
    checks.validate(load_config(**{'model.attention': 'flash'}), ('train',))
  with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU"):
    checks.validate(load_config(**{'model.attention': 'cudnn'}), ('train',))


# -- the train step's formulation: block-causal attention, unrolled shallow stacks (issue 15) -------

@pytest.mark.parametrize('length,block,max_blocks', [(23, 5, 8), (23, 5, 3), (300, 128, 8), (100, 128, 8)])
def test_block_causal_attention_equals_the_masked_full_attention(length, block, max_blocks, monkeypatch):
  """attend_causal (queries in blocks, each over the keys up to its end) == attend over the full
  T x T scores under the causal mask: outputs and the gradients of q, k and v, for uneven blocks,
  the block cap and a sequence shorter than one block."""
  monkeypatch.setattr(gpt, 'CAUSAL_QUERY_BLOCK', block)
  monkeypatch.setattr(gpt, 'CAUSAL_MAX_BLOCKS', max_blocks)
  keys = jax.random.split(jax.random.PRNGKey(length), 4)
  q, k, v, g = (jax.random.normal(kk, (2, length, 2, 8)) for kk in keys)
  pos = jnp.arange(length)

  def full(q, k, v):
    return jnp.sum(gpt.attend(q, k, v, jnp.broadcast_to(pos, (2, length)), pos) * g)

  def blocked(q, k, v):
    return jnp.sum(gpt.attend_causal(q, k, v) * g)
  out_full = jax.jit(lambda q, k, v: gpt.attend(q, k, v, pos[None], pos))(q, k, v)
  out_blocked = jax.jit(gpt.attend_causal)(q, k, v)
  np.testing.assert_allclose(np.asarray(out_blocked), np.asarray(out_full), atol=2e-6, rtol=1e-5)
  for a, b in zip(jax.jit(jax.grad(full, (0, 1, 2)))(q, k, v), jax.jit(jax.grad(blocked, (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)
  # Not vacuous: the last query sees every key; a change to the last key moves only the last output.
  moved = jax.jit(gpt.attend_causal)(q, k.at[:, -1].add(3.0), v)
  assert np.abs(np.asarray(moved - out_blocked))[:, -1].max() > 1e-3
  np.testing.assert_array_equal(np.asarray(moved)[:, :-1], np.asarray(out_blocked)[:, :-1])


@pytest.mark.parametrize('head_dim', [20, 12, 8])
def test_head_dimension_padded_for_cudnn_gives_the_unpadded_attention(head_dim):
  """attend_padded (what 'cudnn' runs: heads zero-padded to a multiple of 8, the odd sequence of 37 to
  38, the true head dimension's scale, the padding sliced off), here through XLA's implementation on
  the CPU: the same outputs and q / k / v gradients as the einsum reference, at the unpadded shapes."""
  keys = jax.random.split(jax.random.PRNGKey(head_dim), 4)
  q, k, v, g = (jax.random.normal(kk, (2, 37, 3, head_dim)) for kk in keys)
  assert gpt.padded_head_dim(head_dim) == -(-head_dim // 8) * 8

  def ref(q, k, v):
    return jnp.sum(gpt.attend_causal(q, k, v) * g)

  def padded(q, k, v):
    return jnp.sum(gpt.attend_padded(q, k, v, implementation='xla') * g)
  out = jax.jit(lambda q, k, v: gpt.attend_padded(q, k, v, implementation='xla'))(q, k, v)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(gpt.attend_causal)(q, k, v)), atol=2e-6, rtol=1e-5)
  for a, b in zip(jax.jit(jax.grad(ref, (0, 1, 2)))(q, k, v), jax.jit(jax.grad(padded, (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason='cuDNN needs a GPU')
def test_cudnn_attention_at_the_parity_shape_is_as_close_to_float32_as_the_einsum_path():
  """The MNIST parity GPT's attention (562 tokens, 12 heads of 20, bfloat16) through cuDNN with the
  heads padded to 24: outputs and q / k / v gradients no further from a float32 einsum reference than
  the bfloat16 einsum path's own (at most 2x its error)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, g = (jax.random.normal(kk, (4, 562, 12, 20)) for kk in keys)

  def run(fn, dtype):
    def f(q, k, v):
      return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
    args = [x.astype(dtype) for x in (q, k, v)]
    out = jax.jit(fn)(*args).astype(jnp.float32)
    return [np.asarray(x, np.float32) for x in (out,) + tuple(jax.jit(jax.grad(f, (0, 1, 2)))(*args))]
  ref = run(gpt.attend_causal, jnp.float32)
  einsum = run(gpt.attend_causal, jnp.bfloat16)
  cudnn = run(lambda q, k, v: gpt.attend_padded(q, k, v, implementation='cudnn'), jnp.bfloat16)
  for r, e, c in zip(ref, einsum, cudnn):
    err_e, err_c = np.abs(e - r).max(), np.abs(c - r).max()
    assert err_c <= 2 * err_e + 1e-3, (err_c, err_e)


def test_auto_attention_on_a_gpu_takes_cudnn_only_at_head_dimensions_it_need_not_pad(monkeypatch):
  """'auto' on a GPU in bfloat16: cuDNN for the full forward at head dimensions 8..128 in steps of 8;
  the einsum path at 20 (the MNIST parity GPT's: padding is an explicit 'cudnn' only; the train log
  says how to ask for it), above 128, in float32 and for cached decoding. An explicit 'cudnn' that cuDNN cannot run is one config error
  naming the key (float32; heads over 128), before anything is traced."""
  monkeypatch.setattr(gpt.jax, 'default_backend', lambda: 'gpu')
  assert gpt.attention_impl('auto', jnp.bfloat16, 24, cached=False) == 'cudnn'
  assert gpt.attention_impl('auto', jnp.bfloat16, 128, cached=False) == 'cudnn'
  assert gpt.attention_impl('auto', jnp.bfloat16, 20, cached=False) == 'einsum'
  assert gpt.attention_impl('auto', jnp.bfloat16, 136, cached=False) == 'einsum'
  assert gpt.attention_impl('auto', jnp.float32, 24, cached=False) == 'einsum'
  assert gpt.attention_impl('auto', jnp.bfloat16, 24, cached=True) == 'einsum'
  assert gpt.attention_impl('cudnn', jnp.bfloat16, 20, cached=False) == 'cudnn'
  parity = GPTConfig(num_layers=1, num_heads=12, embed_dim=240, block_size=8, vocab_size=9, dtype='bfloat16')
  assert gpt.attention_summary(parity).startswith('einsum (heads of 20: --config.model.attention=cudnn pads them to 24')
  assert gpt.attention_summary(dataclasses.replace(parity, attention='cudnn')) == 'cudnn'
  assert gpt.attention_summary(dataclasses.replace(parity, num_heads=10)) == 'cudnn'   # heads of 24
  assert gpt.attention_summary(dataclasses.replace(parity, dtype='float32')) == 'einsum'
  ok = {'model.attention': 'cudnn', 'model.dtype': 'bfloat16', 'model.embed_dim': 240, 'model.num_heads': 12}
  checks.validate(load_config(**ok), ('train',))
  with pytest.raises(ConfigError, match="model.attention='cudnn' needs model.dtype='bfloat16'"):
    checks.validate(load_config(**dict(ok, **{'model.dtype': 'float32'})), ('train',))
  with pytest.raises(ConfigError, match="model.attention='cudnn' takes heads of at most 128"):
    checks.validate(load_config(**dict(ok, **{'model.num_heads': 1})), ('train',))


def test_unrolled_and_scanned_stacks_give_the_same_logits_and_gradients(monkeypatch):
  """A stack of at most UNROLL_MAX_LAYERS blocks runs unrolled in the full forward; the scanned program
  gives the same logits and parameter gradients (float rounding), so the choice is not part of the
  model. Decoding stays one scanned program (unrolled, it sampled 1.6x slower on CPU)."""
  cfg = dataclasses.replace(TINY, cond_position=1, cond_classes=3, cond_first_token=TINY.vocab_size - 3)
  mdef, params = _init(cfg)
  params = _with_random_cond(params)
  tokens = _tokens(cfg)

  def run():
    f = jax.jit(jax.value_and_grad(lambda p: gpt.cross_entropy(mdef.bind(p)(tokens[:, :-1]), tokens[:, 1:]).mean()))
    hlo = f.lower(params).as_text()
    return f(params), hlo
  (la, ga), unrolled_hlo = run()

  def decode(p, t):
    model = mdef.bind(p)
    return model.decode(t, model.init_cache(t.shape[0]), 0)[0]
  assert 'while' in jax.jit(decode).lower(params, tokens[:, :1]).as_text()   # at the default depth limit

  monkeypatch.setattr(gpt, 'UNROLL_MAX_LAYERS', 0)
  (lb, gb), scanned_hlo = run()
  assert 'while' in scanned_hlo and 'while' not in unrolled_hlo
  assert abs(float(la) - float(lb)) < 1e-6
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-5)
