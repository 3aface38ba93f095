"""Tokenizers on tiny arrays: round trips, vocabulary, residual exactness, save/restore, mismatches."""

import numpy as np
import pytest

from nfjax import tokenizers
from nfjax.io.tokens import TokenError, Vocab
from nfjax.errors import ConfigError, DataError, NfjaxError
from nfjax.fields import mlp
from nfjax.tokenizers import chunking, kmeans1d, refine

SPEC = mlp.FieldSpec(freqs=(1.0, 2.0), hidden=(4, 4))   # 8 features -> 4 -> 4 -> 1: 36 + 20 + 5 = 61 params


def _weights(n=64, seed=0, spec=SPEC):
  rng = np.random.default_rng(seed)
  init = rng.normal(size=spec.num_params).astype(np.float32)
  w = init + 0.3 * rng.standard_t(4, size=(n, spec.num_params)).astype(np.float32)
  return w.astype(np.float32), init


def _fit(w, init=None, spec=SPEC, **kw):
  kw.setdefault('num_codes', 16)
  kw.setdefault('kmeans_restarts', 2)
  return tokenizers.fit(tokenizers.Settings(**kw), w, spec.layout, init, seed=0, field=spec.to_dict(),
                        grid=(8, 8))


def test_scalar_round_trip_and_idempotence():
  w, init = _weights()
  tok = _fit(w, init, residual=True)
  t = tok.encode(w)
  assert t.shape == (len(w), SPEC.num_params) and t.dtype == np.int32
  assert t.min() >= 0 and t.max() < 16
  wq = tok.decode(t)
  # Every decoded weight is init + one of the 16 codes, and re-encoding gives the same tokens.
  codes = np.sort(tok.codebooks[0, 0, :, 0])
  resid = wq - init
  assert np.abs(resid[..., None] - codes).min(-1).max() < 1e-5
  np.testing.assert_array_equal(tok.encode(wq), t)
  # Nearest code: no other code is closer than the chosen one.
  r = w - init
  chosen = np.abs(r - resid)
  assert (chosen <= np.abs(r[..., None] - codes).min(-1) + 1e-5).all()


def test_kmeans_beats_baselines_and_matches_brute_force():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(-3, 0.2, 3000), rng.normal(0, 0.5, 6000), rng.normal(4, 0.1, 1000)])
  res = kmeans1d.kmeans(x, 3, restarts=4, iters=100, seed=0)
  np.testing.assert_allclose(res.codes, [-3, 0, 4], atol=0.05)
  # The sorted-prefix-sum Lloyd step equals a direct Lloyd step.
  data = kmeans1d.Sorted1D.build(x)
  start = np.array([-1.0, 0.5, 2.0, 3.0])
  one, _, _ = kmeans1d.lloyd(data, start, iters=1)
  assign = np.argmin(np.abs(x[:, None] - start[None]), 1)
  np.testing.assert_allclose(one, [x[assign == j].mean() for j in range(4)], rtol=1e-9)
  sse = lambda c: ((x - c[np.argmin(np.abs(x[:, None] - c[None]), 1)]) ** 2).sum()
  km = kmeans1d.kmeans(x, 8, restarts=3, iters=100, seed=0).codes
  assert sse(km) < sse(kmeans1d.quantile_codes(x, 8)) < sse(kmeans1d.uniform_codes(x, 8))


def test_uniform_and_quantile_bins():
  x = np.random.default_rng(2).exponential(size=10000)
  u = kmeans1d.uniform_codes(x, 10)
  np.testing.assert_allclose(np.diff(u), (x.max() - x.min()) / 10, rtol=1e-9)
  q = kmeans1d.quantile_codes(x, 10)
  cells = kmeans1d.Sorted1D.build(x).cells(q)
  counts = np.diff(cells)
  assert counts.min() > 500 and counts.max() < 1500  # roughly equal mass (code = bin mean)


def test_pinned_atoms_are_exact_and_dead_codes_revived():
  rng = np.random.default_rng(3)
  x = np.concatenate([np.zeros(5000), rng.normal(size=5000)])
  assert kmeans1d.atoms(x, 0.01, 4) == (0.0,)
  res = kmeans1d.kmeans(x, 8, restarts=1, iters=50, seed=0, pinned=(0.0,))
  assert 0.0 in res.codes
  # A code far outside the data is dead; Lloyd moves it into the data.
  data = kmeans1d.Sorted1D.build(x)
  codes, _, revived = kmeans1d.lloyd(data, np.array([-1.0, 0.0, 1.0, 1e6]), iters=5)
  assert revived >= 1 and codes.max() < 10


def test_refine_revives_dead_codes_and_lowers_error():
  rng = np.random.default_rng(4)
  x = np.concatenate([rng.normal(size=(2000, 2)) + c for c in ((0, 0), (6, 0), (0, 6))]).astype(np.float32)
  init = np.array([[0, 0], [6, 0], [3, 3], [1e4, 1e4]], np.float32)[None, None]
  cb, info = refine.refine(init, x, np.zeros(len(x), np.int32), steps=150, lr=0.1, batch=512, seed=0,
                           check_every=50)
  assert info['revived'] >= 1 and np.abs(cb).max() < 100
  assert info['loss_last'] < info['loss_first']


def test_vocab_layout_and_special_tokens_in_weight_slots():
  v = Vocab(num_codes=245, num_classes=10, specials=('sos',))
  assert v.vocab_size == 256 and v.sos == 245 and v.class_token(0) == 246 and v.class_token(9) == 255
  w, init = _weights(8)
  tok = _fit(w, init)
  vocab = tok.vocab(10, ('pad', 'sos'))
  assert vocab.vocab_size == 16 + 2 + 10
  t = tok.encode(w)
  t[3, 7] = vocab.sos
  with pytest.raises(TokenError, match=r'SOS.*position \(3, 7\)'):
    tok.decode(t, vocab)
  with pytest.raises(TokenError, match=r'token 17 \(a special or class token.*position \(3, 7\)'):
    tok.decode(t)
  seqs = np.concatenate([np.full((8, 1), vocab.sos), vocab.class_token(np.arange(8) % 10)[:, None],
                         tok.encode(w)], 1)
  np.testing.assert_array_equal(tok.decode_sequences(seqs, vocab, 2), tok.quantize(w))
  seqs[2, 10] = vocab.class_token(4)
  with pytest.raises(TokenError, match=r'class 4.*sequence 2, position 10'):
    tok.decode_sequences(seqs, vocab, 2)


@pytest.mark.parametrize('encoder', ['nearest', 'compensated'])
def test_residual_mode_reproduces_exact_code_values(encoder):
  w, init = _weights(32)
  tok = _fit(w, init, residual=True, encoder=encoder)
  codes = tok.codebooks[0, 0, :, 0]
  ids = np.random.default_rng(5).integers(0, 16, size=(10, SPEC.num_params))
  exact = (init + codes[ids]).astype(np.float32)          # weights that are init + a code, in float32
  t = tokenizers.encode(tok, exact)
  np.testing.assert_array_equal(codes[t], codes[ids])    # same codes (ids may differ only for duplicate codes)
  np.testing.assert_array_equal(tok.decode(t), exact)     # bit-exact
  # Absolute mode cannot do this: the same weights are not code values there.
  tok_abs = _fit(w, None, residual=False)
  assert np.abs(tok_abs.quantize(exact) - exact).max() > 1e-3


def test_normalize_slot_codes_constant_slots_exactly():
  w, init = _weights(40)
  w[:, 5] = 0.123456  # a dead slot: the same value in every field
  tok = _fit(w, init, residual=True, normalize='slot')
  wq = tok.quantize(w)
  assert (wq[:, 5] == np.float32(0.123456)).all()
  assert np.sqrt(np.mean((wq - w) ** 2)) < np.sqrt(np.mean((_fit(w, init, residual=True).quantize(w) - w) ** 2))


def test_compensated_encoder_lowers_render_error():
  w, init = _weights(48, seed=6)
  tok = _fit(w, init, residual=True, num_codes=8)
  ref = mlp.render_weights(SPEC, w, 8, 8)
  err = {}
  for enc in ('nearest', 'compensated'):
    wq = tok.decode(tokenizers.encode(tok, w, encoder=enc))
    err[enc] = np.mean((mlp.render_weights(SPEC, wq, 8, 8) - ref) ** 2)
  assert err['compensated'] < 0.8 * err['nearest']


def test_neuron_chunks_cover_every_weight_once():
  ch = chunking.make(SPEC.layout, 'neuron')
  assert ch.num_chunks == 4 + 4 + 1 and ch.dim == 9
  idx = ch.index[ch.index >= 0]
  np.testing.assert_array_equal(np.sort(idx), np.arange(SPEC.num_params))
  # Neuron 0 of layer 0: weight row 0 then its bias.
  np.testing.assert_array_equal(ch.index[0], list(range(8)) + [32])
  assert ch.group_names == ('dim9', 'dim5')  # widths 8+1 (layer 0), 4+1 (layers 1, 2)
  per_layer = chunking.make(SPEC.layout, 'scalar', per_layer='tensor')
  assert per_layer.num_groups == len(SPEC.layout)
  with pytest.raises(ConfigError, match='per_layer'):
    chunking.make(SPEC.layout, 'neuron', per_layer='tensor')


def test_vector_and_residual_vq():
  w, init = _weights(64, seed=7)
  vq = _fit(w, init, method='vector_vq', chunk='neuron', residual=True, kmeans_iters=20, refine_steps=20,
            refine_batch=128)
  rvq = _fit(w, init, method='residual_vq', chunk='neuron', num_quantizers=3, residual=True, kmeans_iters=20)
  assert vq.tokens_per_field == 9 and rvq.tokens_per_field == 27
  t = rvq.encode(w)
  assert t.shape == (64, 27)
  # Each extra stage lowers the error; chunk-major layout: tokens c*Q+q.
  err = lambda wq: np.mean((wq - w) ** 2)
  assert err(rvq.quantize(w)) < err(vq.quantize(w))
  partial = t.copy().reshape(64, 9, 3)
  assert err(rvq.decode(t)) < err(_zero_stage(rvq, partial, 2))
  # Weights that are code vectors round-trip exactly.
  codes = vq.codebooks
  ids = np.random.default_rng(8).integers(0, 16, size=(5, 9))
  z = np.zeros((5, 9, 9), np.float32)
  for c in range(9):
    z[:, c] = codes[vq.chunking.group[c], 0][ids[:, c]]
  exact = vq.from_code_space(vq.chunking.scatter(z, SPEC.num_params))
  np.testing.assert_allclose(vq.decode(vq.encode(exact)), exact, atol=1e-6)
  meta = rvq.sequence_meta()
  assert meta['tokens_per_field'] == 27 and meta['num_quantizers'] == 3 and meta['chunk'] == 'neuron'


def _zero_stage(tok, t, q):
  """Decode with stage q replaced by the code closest to zero (i.e. without stage q)."""
  t = t.copy()
  norms = np.linalg.norm(tok.codebooks[:, q], axis=-1)   # [G, K]
  t[:, :, q] = np.argmin(norms, -1)[tok.chunking.group][None]
  return tok.decode(t.reshape(len(t), -1))


@pytest.mark.parametrize('kw', [dict(), dict(method='residual_vq', chunk='fixed', chunk_size=4, num_quantizers=2),
                                dict(per_layer='layer', normalize='slot', residual=True)])
def test_save_restore_identical_tokens(tmp_path, kw):
  w, init = _weights(40, seed=9)
  tok = _fit(w, init, **kw)
  path = str(tmp_path / 'tok.npz')
  tok.save(path)
  back = tokenizers.restore(path)
  np.testing.assert_array_equal(back.encode(w), tok.encode(w))
  np.testing.assert_array_equal(back.decode(tok.encode(w)), tok.decode(tok.encode(w)))
  assert back.sequence_meta() == tok.sequence_meta()
  # Readable with numpy alone.
  with np.load(path, allow_pickle=False) as z:
    assert set(z.files) == {'codebooks', 'index', 'group', 'center', 'scale', 'meta'}


def test_mismatching_tokenizer_fails_clearly():
  w, init = _weights(16)
  tok = _fit(w, init)
  other = mlp.FieldSpec(freqs=(1.0, 2.0), hidden=(5, 4))
  with pytest.raises(tokenizers.TokenizerMismatch, match=r'61 parameters.*layers\.0\.weight 4x8.*'
                                                          r'has 74 parameters.*layers\.0\.weight 5x8'):
    tok.check_layout(other.layout, other.num_params)
  # Same P, different layout: two tensors swapped shapes.
  swapped = [dict(e) for e in SPEC.layout]
  swapped[0]['shape'] = [8, 4]
  with pytest.raises(tokenizers.TokenizerMismatch, match='4x8.*8x4'):
    tok.check_layout(swapped, SPEC.num_params)
  with pytest.raises(tokenizers.TokenizerMismatch, match='61 parameters'):
    tok.encode(np.zeros((2, 74), np.float32))
  with pytest.raises(tokenizers.TokenizerMismatch, match='61 tokens'):
    tok.decode(np.zeros((2, 60), np.int32))
  with pytest.raises(NfjaxError, match='non-finite'):
    tok.encode(np.full((1, 61), np.nan, np.float32))


def test_settings_validation_names_the_key():
  with pytest.raises(ConfigError, match='tokenize.chunk'):
    tokenizers.Settings(method='uniform', chunk='neuron').validate()
  with pytest.raises(ConfigError, match='tokenize.num_quantizers'):
    tokenizers.Settings(method='scalar_vq', num_quantizers=2).validate()
  with pytest.raises(ConfigError, match='tokenize.method'):
    tokenizers.Settings(method='bpe').validate()
  w, _ = _weights(4)
  with pytest.raises(ConfigError, match='shared init'):
    tokenizers.fit(tokenizers.Settings(residual=True), w, SPEC.layout, None)


@pytest.mark.parametrize('kw', [dict(residual=True), dict(method='residual_vq', chunk='fixed', chunk_size=4,
                                                          num_quantizers=2)])
def test_drop_constant_positions(tmp_path, kw):
  """Positions with one token in every training field leave the sequences and decode to that token;
  the other positions keep their tokens, and a saved tokenizer drops the same ones."""
  w, init = _weights(48, seed=3)
  dead = np.arange(4, 12)              # a first-layer neuron's weights stay at the init in every field
  w[:, dead] = init[dead]
  tok = _fit(w, init, **kw)
  full = tok.encode(w)
  const = (full == full[:1]).all(0)
  assert const.any() and not const.all()
  short = tok.drop_constant(full[:40])  # fitted on "training" rows; rows 40+ play the val fields
  assert short.tokens_per_field == short.full_tokens_per_field - short.num_dropped == int((~const).sum())
  assert short.num_dropped == int(((full[:40] == full[:1]).all(0)).sum())
  t = short.encode(w)
  np.testing.assert_array_equal(t, full[:, short.keep])
  np.testing.assert_array_equal(short.decode(t), tok.decode(full))   # rows agree on every dropped position
  assert short.token_groups().shape == short.token_quantizers().shape == (short.tokens_per_field,)
  meta = short.sequence_meta()
  assert meta['tokens_per_field'] == short.tokens_per_field and meta['dropped_constant'] == short.num_dropped
  with pytest.raises(tokenizers.TokenizerMismatch, match=f'{short.tokens_per_field} tokens'):
    short.decode(full)
  path = str(tmp_path / 'tok.npz')
  short.save(path)
  back = tokenizers.restore(path)
  np.testing.assert_array_equal(back.encode(w), t)
  np.testing.assert_array_equal(back.decode(t), short.decode(t))
  with np.load(path, allow_pickle=False) as z:   # numpy alone: t_full = fixed; t_full[keep] = t
    t_full = np.broadcast_to(z['fixed'], full.shape).copy()
    t_full[:, z['keep']] = t
    np.testing.assert_array_equal(t_full, full)
  with pytest.raises(ValueError, match='once'):
    short.drop_constant(full)
  with pytest.raises(DataError, match='tokenize.drop_constant=False'):   # one training field: all constant
    tok.drop_constant(full[:1])
