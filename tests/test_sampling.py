"""The jitted sampler: KV cache == no cache, masking, filters, per-sample seeds, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nfjax import sampling
from nfjax.models.gpt import GPT, GPTConfig

V, CODES, T0, NEW = 24, 16, 2, 14


@pytest.fixture(scope='module')
def model():
  # block_size = T0 + NEW - 1, as the train stage sizes it: the last token is a target, never an input.
  cfg = GPTConfig(num_layers=2, num_heads=2, embed_dim=32, block_size=T0 + NEW - 1, vocab_size=V)
  m = GPT(cfg, rngs=nnx.Rngs(0))
  # Make the special tokens attractive so masking has something to do.
  head = np.array(m.lm_head[...])
  head[:, CODES:] += 0.5
  m.lm_head[...] = jnp.asarray(head)
  return m


def _run(model, use_cache, temperature, top_k, top_p, b=6, ids=None, seed=0, num_new=NEW, max_len=None):
  prompt = jnp.stack([jnp.full((b,), 17), 18 + jnp.arange(b) % 4], 1).astype(jnp.int32)
  ids = np.arange(b) if ids is None else ids
  keys = sampling.sample_keys(seed, 0, ids)
  allowed = jnp.arange(V) < CODES
  gen = sampling.make_generate(model, num_new, use_cache=use_cache, max_len=max_len)
  full = lambda x: jnp.full((b,), x)
  return np.asarray(gen(prompt, keys, full(temperature).astype(jnp.float32), full(top_k).astype(jnp.int32),
                        full(top_p).astype(jnp.float32), allowed))


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 3, 1.0), (1.0, 0, 0.9)])
def test_cache_and_no_cache_give_identical_tokens(model, temperature, top_k, top_p):
  a = _run(model, True, temperature, top_k, top_p)
  b = _run(model, False, temperature, top_k, top_p)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('use_cache', [True, False])
def test_a_longer_max_len_gives_the_same_first_tokens(model, use_cache):
  """max_len (what benchmarks time a few tokens of a long sequence with) changes the cost, not the tokens."""
  full = _run(model, True, 0.8, 3, 1.0)
  np.testing.assert_array_equal(_run(model, use_cache, 0.8, 3, 1.0, num_new=5, max_len=T0 + NEW - 1), full[:, :5])


def test_special_tokens_never_in_weight_slots(model):
  toks = _run(model, True, 1.5, 0, 1.0, b=32)
  assert toks.max() < CODES and toks.min() >= 0
  # Unmasked, the model does produce special tokens: the mask is doing the work.
  logits = model(jnp.array([[17, 18]]))
  assert int(jnp.argmax(logits[0, -1])) >= CODES or float(jax.nn.softmax(logits[0, -1])[CODES:].sum()) > 0.2


def test_top_k_1_equals_greedy(model):
  np.testing.assert_array_equal(_run(model, True, 1.0, 1, 1.0), _run(model, True, 0.0, 0, 1.0))


def test_sample_does_not_depend_on_batch(model):
  big = _run(model, True, 1.0, 5, 1.0, b=8, ids=np.arange(8))
  # Samples 4..7 alone in a batch of 4 (their prompts are the same: class 18 + row % 4).
  small = _run(model, True, 1.0, 5, 1.0, b=4, ids=np.arange(4, 8))
  np.testing.assert_array_equal(big[4:], small)
  other_seed = _run(model, True, 1.0, 5, 1.0, b=8, seed=1)
  assert not np.array_equal(big, other_seed)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = lambda f: np.asarray(f > -1e29)
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 1.0, 2, 1.0)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 1.0, 0, 0.79)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 1.0, 0, 0.81)), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(sampling.filter_logits(logits, 1.0, 0, 1.0)), [1, 1, 1, 1])


def test_grid_of_settings_compiles_once(model):
  gen = sampling.make_generate(model, NEW, use_cache=True)
  b = 4
  prompt = jnp.tile(jnp.array([[17, 18]], jnp.int32), (b, 1))
  allowed = jnp.arange(V) < CODES
  for t, k in [(0.8, 3), (1.0, 3), (0.8, 5), (1.0, 5)]:
    gen(prompt, sampling.sample_keys(0, 0, np.arange(b)), jnp.full((b,), t, jnp.float32),
        jnp.full((b,), k, jnp.int32), jnp.ones((b,), jnp.float32), allowed)
  assert gen.jitted._cache_size() == 1


def _logprob(model, prompt, toks, allowed):
  seq = jnp.concatenate([prompt, toks], 1)
  logits = model(seq[:, :-1])[:, prompt.shape[1] - 1:]
  logp = jax.nn.log_softmax(jnp.where(allowed[None, None], logits, sampling.NEG), -1)
  return np.asarray(jnp.take_along_axis(logp, toks[..., None], -1)[..., 0].sum(1))


def test_beam_search_width_1_is_greedy_and_wider_beams_score_higher(model):
  prompt = jnp.array([[17, 18], [17, 20]], jnp.int32)
  allowed = jnp.arange(V) < CODES
  greedy = sampling.make_generate(model, NEW)(prompt, sampling.sample_keys(0, 0, np.arange(2)),
                                              jnp.zeros((2,), jnp.float32), jnp.zeros((2,), jnp.int32),
                                              jnp.ones((2,), jnp.float32), allowed)
  b1, s1 = sampling.make_beam_search(model, 1, NEW)(prompt, allowed)
  np.testing.assert_array_equal(np.asarray(b1), np.asarray(greedy))
  b4, s4 = sampling.make_beam_search(model, 4, NEW)(prompt, allowed)
  assert np.asarray(b4).max() < CODES
  # The returned score is the sequence's real log-probability, and a wider beam never does worse.
  np.testing.assert_allclose(np.asarray(s4), _logprob(model, prompt, b4, allowed), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(s1), _logprob(model, prompt, b1, allowed), rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(s4) >= np.asarray(s1) - 1e-5)


# Classifier-free guidance. Token ids: 16 PAD, 17 SOS, 18..21 classes, 22 the null class; class
# embedding and class bias on (with the null class's own bias row), made non-zero so the class matters.
NULL = 22


@pytest.fixture(scope='module')
def cfg_model():
  cfg = GPTConfig(num_layers=2, num_heads=2, embed_dim=32, block_size=T0 + NEW - 1, vocab_size=V,
                  cond_position=1, cond_classes=5, cond_first_token=18, null_class=NULL)
  m = GPT(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  m.wce[...] = jnp.asarray(rng.normal(0, 0.5, m.wce[...].shape), jnp.float32)
  m.wcb[...] = jnp.asarray(rng.normal(0, 1.0, m.wcb[...].shape), jnp.float32)
  return m


_GENS = {}   # one sampler per (model, use_cache): its plain and guided programs compile once each


def _guided(model, use_cache, guidance, b=6, null=False, temperature=1.0, top_k=0, top_p=1.0):
  """Sample with guidance (a scalar or [b]); null=True: plain sampling from the null-class prompts."""
  prompt = np.stack([np.full((b,), 17), 18 + np.arange(b) % 4], 1).astype(np.int32)
  keys = sampling.sample_keys(0, 0, np.arange(b))
  allowed = jnp.arange(V) < CODES
  full = lambda x, dt: jnp.full((b,), x, dt)  # noqa: E731
  args = (keys, full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32), allowed)
  gen = _GENS.setdefault((id(model), use_cache), sampling.make_generate(model, NEW, use_cache=use_cache))
  if guidance is None:
    return np.asarray(gen(jnp.asarray(sampling.unconditional(prompt, NULL) if null else prompt), *args))
  g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
  return np.asarray(gen(jnp.asarray(prompt), *args, g, jnp.asarray(sampling.unconditional(prompt, NULL))))


@pytest.mark.parametrize('use_cache', [True, False])
def test_guidance_1_is_plain_conditional_and_0_is_unconditional_sampling(cfg_model, use_cache):
  plain = _guided(cfg_model, use_cache, None)
  np.testing.assert_array_equal(_guided(cfg_model, use_cache, 1.0), plain)
  uncond = _guided(cfg_model, use_cache, None, null=True)
  np.testing.assert_array_equal(_guided(cfg_model, use_cache, 0.0), uncond)
  assert not np.array_equal(plain, uncond)       # the class matters in this model ...
  strong = _guided(cfg_model, use_cache, 3.0)
  assert not np.array_equal(strong, plain)       # ... and so does the scale


def test_guided_kv_cache_equals_the_uncached_reference(cfg_model):
  g = [0.0, 1.0, 1.5, 3.0, 7.0, 0.5]              # per-row scales: a grid in one batch
  for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 3, 0.9)]:
    a = _guided(cfg_model, True, g, temperature=temperature, top_k=top_k, top_p=top_p)
    b = _guided(cfg_model, False, g, temperature=temperature, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(a, b)
  # Per-row scales are per row: each row equals its setting sampled on its own.
  for row in (0, 1, 4):
    np.testing.assert_array_equal(_guided(cfg_model, True, g[row])[row], _guided(cfg_model, True, g)[row])


def test_guide_combines_cond_and_uncond_logits():
  cond, uncond = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[3.0, 2.0, 0.0]])
  both = jnp.concatenate([cond, uncond])
  np.testing.assert_allclose(sampling.guide(both, jnp.array([2.0])), [[-1.0, 2.0, 6.0]])
  np.testing.assert_array_equal(sampling.guide(both, jnp.array([1.0])), cond)
  np.testing.assert_array_equal(sampling.guide(both, jnp.array([0.0])), uncond)


def test_per_row_masks_restrict_each_row_and_a_shared_table_changes_nothing(model):
  """allowed [C, NEW, V] with allowed_rows [B]: row b draws only what its table row allows at each slot;
  a table whose rows are all the shared mask draws exactly the plain tokens (cached and uncached)."""
  b = 8
  prompt = jnp.stack([jnp.full((b,), 17), 18 + jnp.arange(b) % 4], 1).astype(jnp.int32)
  keys = sampling.sample_keys(0, 0, np.arange(b))
  args = (prompt, keys, jnp.full((b,), 1.5, jnp.float32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32))
  shared = jnp.arange(V) < CODES
  rows = jnp.asarray(np.arange(b) % 3, jnp.int32)
  for use_cache in (True, False):
    gen = sampling.make_generate(model, NEW, use_cache=use_cache)
    plain = np.asarray(gen(*args, shared))
    same = np.asarray(gen(*args, jnp.broadcast_to(shared, (3, NEW, V)), allowed_rows=rows))
    np.testing.assert_array_equal(same, plain)
  rng = np.random.default_rng(0)
  table = np.zeros((3, NEW, V), bool)
  for c in range(3):
    for j in range(NEW):
      table[c, j, rng.choice(CODES, size=2, replace=False)] = True
  drawn = {}
  for use_cache in (True, False):
    gen = sampling.make_generate(model, NEW, use_cache=use_cache)
    drawn[use_cache] = np.asarray(gen(*args, jnp.asarray(table), allowed_rows=rows))
  np.testing.assert_array_equal(drawn[True], drawn[False])
  r = np.asarray(rows)
  assert table[r[:, None], np.arange(NEW)[None, :], drawn[True]].all()
  assert not table[r[:, None], np.arange(NEW)[None, :], plain].all()   # unrestricted, rows leave their tables


def test_training_support_is_each_conditions_codes_per_slot():
  from types import SimpleNamespace
  # 3 conditions, condition 2 without training sequences; codes 0..4, specials 5.., class tokens 7, 8, 9
  vocab = SimpleNamespace(vocab_size=10, num_codes=5, num_classes=3)
  seqs = np.array([[0, 1, 2], [3, 1, 2], [4, 4, 4], [2, 2, 2]])
  cond = np.array([0, 0, 1, 2])
  toks = np.concatenate([np.full((4, 1), 5), 7 + cond[:, None], seqs], 1)
  ds = SimpleNamespace(vocab=vocab, train_idx=np.array([0, 1, 2]), tokens=toks, prefix_len=2,
                       conditions=lambda: cond)
  t = sampling.training_support(ds, 3, model_vocab=11)
  assert t.shape == (3, 3, 11)
  assert [np.nonzero(t[0, j])[0].tolist() for j in range(3)] == [[0, 3], [1], [2]]
  assert [np.nonzero(t[1, j])[0].tolist() for j in range(3)] == [[4], [4], [4]]
  # condition 2 has only a validation sequence: it gets every condition's training codes, pooled
  assert [np.nonzero(t[2, j])[0].tolist() for j in range(3)] == [[0, 3, 4], [1, 4], [2, 4]]
  # without a class token: one pooled table
  one = sampling.training_support(SimpleNamespace(**{**vars(ds), 'prefix_len': 1, 'tokens': toks[:, 1:]}), 3)
  assert one.shape == (1, 3, 10) and one[0, 0].nonzero()[0].tolist() == [0, 3, 4]
  assert sampling.support_rows(t, [2, 0]).tolist() == [2, 0]       # each condition's own table
  assert sampling.support_rows(one, [2, 0]).tolist() == [0, 0]     # the pooled one
