"""The tokenize stage end to end on the smoke fields: files, summary, sequences, skip, refusals."""

import os
import shutil

import numpy as np
import pytest

from conftest import load_config
from nfjax import main as launcher
from nfjax import tokenizers
from nfjax.configs import checks
from nfjax.stages import tokenize
from nfjax.io import tokens as token_data
from nfjax.io import fields as wds
from nfjax.errors import ConfigError, DataError, NfjaxError

SUMMARY_KEYS = ('vocab_size', 'codebook_size', 'weight_rmse', 'psnr_fields_mean', 'psnr_tokenized_mean',
                'psnr_drop_db', 'codebook_usage', 'perplexity', 'seconds', 'uniform_psnr_tokenized_mean',
                'uniform_psnr_drop_db', 'num_train', 'num_val', 'split_seed')


def _workdir(tmp_path, smoke_fields, name='w'):
  d = tmp_path / name
  d.mkdir()
  shutil.copytree(os.path.join(smoke_fields, 'fields'), d / 'fields')
  return str(d)


@pytest.fixture(scope='module')
def tokenized(tmp_path_factory, smoke_fields):
  workdir = _workdir(tmp_path_factory.mktemp('tok'), smoke_fields)
  out = launcher.run(load_config('smoke'), workdir, 'tokenize')
  return workdir, out['tokenize']


def test_stage_writes_tokenizer_tokens_and_summary(tokenized):
  workdir, summary = tokenized
  for f in ('tokenizer.npz', 'uniform.npz', 'summary.json', 'histogram.png', 'reconstructions.png',
            'fingerprint.json'):
    assert os.path.exists(os.path.join(workdir, 'tokenizer', f)), f
  for key in SUMMARY_KEYS:
    assert key in summary and np.isfinite(summary[key]), key
  assert summary['vocab_size'] == 245 + 2 + 10 and summary['codebook_size'] == 245
  assert summary['psnr_drop_db'] == pytest.approx(summary['psnr_fields_mean'] - summary['psnr_tokenized_mean'])
  # 245 learned codes cost less than 245 uniform bins (the smoke fields barely leave their init, so
  # both PSNR drops are small here; the quick-preset figures are in docs/tokenize.md).
  assert summary['weight_rmse'] < summary['uniform_weight_rmse']
  assert summary['psnr_drop_db'] <= summary['uniform_psnr_drop_db'] + 1e-3
  assert summary['psnr_tokenized_vs_fields_mean'] > 35.0
  assert 0 < summary['codebook_usage'] <= 1 and 1 < summary['perplexity'] <= 245


def test_token_dataset_layout(tokenized):
  workdir, summary = tokenized
  ds = token_data.load(os.path.join(workdir, 'tokens'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  good = fields.good()
  p = fields.params_per_field
  assert ds.tokens.shape == (len(good), 2 + p) and ds.prefix_len == 2
  assert ds.vocab.vocab_size == summary['vocab_size'] == ds.meta['vocab_size']
  assert ds.meta['tokens_per_weight'] == 1.0 and ds.meta['tokens_per_field'] == p
  np.testing.assert_array_equal(ds.field_index, good)
  np.testing.assert_array_equal(ds.labels, fields.labels[good])
  assert (ds.tokens[:, 0] == ds.vocab.sos).all()
  np.testing.assert_array_equal(ds.tokens[:, 1], ds.vocab.class_token(ds.labels))
  assert ds.vocab.is_code(ds.tokens[:, 2:]).all()
  # Seeded, disjoint, complete split with every class in val.
  assert len(np.intersect1d(ds.train_idx, ds.val_idx)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([ds.train_idx, ds.val_idx])), np.arange(len(good)))
  assert set(ds.labels[ds.val_idx]) == set(ds.labels)
  tr, va = tokenize.split(ds.labels, 0.1, 0)
  np.testing.assert_array_equal(tr, ds.train_idx)
  np.testing.assert_array_equal(va, ds.val_idx)
  # The saved tokenizer decodes the sequences to the weights the summary measured.
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer'))
  wq = tok.decode_sequences(ds.tokens, ds.vocab, ds.prefix_len)
  rmse = np.sqrt(np.mean((wq.astype(np.float64) - fields.weights[good]) ** 2))
  assert rmse == pytest.approx(summary['weight_rmse'], rel=1e-5)
  bad = ds.tokens.copy()
  bad[0, 5] = ds.vocab.special('pad')
  with pytest.raises(token_data.TokenError, match='PAD'):
    tok.decode_sequences(bad, ds.vocab, ds.prefix_len)


def test_rerun_skips_and_other_config_is_refused(tokenized):
  workdir, summary = tokenized
  path = os.path.join(workdir, 'tokens', 'tokens.npy')
  before = os.stat(path).st_mtime_ns
  again = tokenize.run(load_config('smoke'), workdir)
  assert again == summary and os.stat(path).st_mtime_ns == before
  with pytest.raises(NfjaxError, match='tokenize.num_codes: 245 -> 100'):
    tokenize.run(load_config('smoke', **{'tokenize.num_codes': 100}), workdir)


def test_parity_vocabulary_and_nearest_encoder(tmp_path, smoke_fields):
  workdir = _workdir(tmp_path, smoke_fields)
  # NeF-GPT's tokenizer (absolute weights, nearest codes, SOS only) on the smoke fields.
  config = load_config('smoke', **{'tokenize.residual': False, 'tokenize.normalize': 'none',
                                   'tokenize.encoder': 'nearest', 'tokenize.specials': ('sos',),
                                   'tokenize.val_fraction': 0.0})
  summary = tokenize.run(config, workdir)
  ds = token_data.load(os.path.join(workdir, 'tokens'))
  assert summary['vocab_size'] == 256 and ds.vocab.sos == 245 and ds.vocab.class_token(9) == 255
  assert len(ds.val_idx) == 0 and summary['num_val'] == 0
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer', 'tokenizer.npz'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  np.testing.assert_array_equal(ds.tokens[:, 2:], tok.encode(fields.weights[fields.good()]))


def test_tokenizer_for_other_fields_is_rejected(tokenized):
  workdir, _ = tokenized
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  other = [dict(e) for e in fields.layout[:-1]]  # a field without the output bias
  with pytest.raises(tokenizers.TokenizerMismatch, match=r'561 parameters.*has 560 parameters'):
    tok.check_layout(other, 560, where='the other fields')


def test_bad_inputs(tmp_path):
  with pytest.raises(DataError, match='run the fit stage first'):
    tokenize.run(load_config('smoke'), str(tmp_path))
  with pytest.raises(ConfigError, match="tokenize.specials.*'sos'"):
    checks.validate(load_config('smoke', **{'tokenize.specials': ('pad',)}), ('tokenize',))
  with pytest.raises(ConfigError, match='tokenize.val_fraction'):
    checks.validate(load_config('smoke', **{'tokenize.val_fraction': 1.0}), ('tokenize',))


def test_without_class_token_nefgpt_shapenet_layout(tmp_path, smoke_fields):
  """tokenize.class_token='no' (and 'auto' with one class): [SOS, w...], NeF-GPT ShapeNet's vocab
  of 127 codes + SOS = 128; the GPT then has no class conditioning."""
  from nfjax.training import tasks
  workdir = _workdir(tmp_path, smoke_fields)
  config = load_config('smoke', **{'tokenize.num_codes': 127, 'tokenize.specials': ('sos',), 'tokenize.encoder': 'nearest',
                                   'tokenize.class_token': 'no'})
  summary = tokenize.run(config, workdir)
  ds = token_data.load(os.path.join(workdir, 'tokens'))
  assert summary['vocab_size'] == 128 and ds.vocab.num_classes == 0 and ds.vocab.sos == 127
  assert ds.prefix_len == 1 and ds.meta['prefix'] == ['sos'] and (ds.tokens[:, 0] == 127).all()
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer', 'tokenizer.npz'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  np.testing.assert_array_equal(ds.tokens[:, 1:], tok.encode(fields.weights[fields.good()]))
  assert ds.tokens.max() < 128
  cfg = tasks.model_config(load_config('smoke', **{'model.class_embedding': True}), vocab_size=128,
                           seq_len=ds.tokens.shape[1], num_classes=0, prefix=('sos',))
  assert cfg.cond_position == -1 and cfg.vocab_size == 128
  # 'auto': a class token exactly when there is more than one class; the shapes parity preset has one.
  assert tokenize.use_class_token(load_config('smoke'), 10) and not tokenize.use_class_token(load_config('smoke'), 1)
  parity = load_config('parity', 'configs/shapes.py')
  assert not tokenize.use_class_token(parity, 1)
  assert token_data.Vocab(parity.tokenize.num_codes, 0, tuple(parity.tokenize.specials)).vocab_size == 128
  with pytest.raises(ConfigError, match='class_token'):
    checks.validate(load_config('smoke', **{'tokenize.class_token': 'maybe'}), ('tokenize',))


def test_drop_constant_shortens_sequences_end_to_end(tmp_path, tokenized):
  """tokenize.drop_constant=True: the positions constant over the training fields (of the default
  run's tokens) leave the sequences, every other token is unchanged, and the shorter sequences go
  through train, sample (decoded with the fixed tokens) and evaluate."""
  ref_dir, ref = tokenized
  workdir = tmp_path / 'w'
  workdir.mkdir()
  shutil.copytree(os.path.join(ref_dir, 'fields'), workdir / 'fields')
  workdir = str(workdir)
  config = load_config('smoke', **{'tokenize.drop_constant': True})
  out = launcher.run(config, workdir, 'tokenize,train,sample,evaluate')
  base = token_data.load(os.path.join(ref_dir, 'tokens'))
  ds = token_data.load(os.path.join(workdir, 'tokens'))
  body = base.tokens[:, base.prefix_len:]
  const = (body[base.train_idx] == body[base.train_idx][:1]).all(0)
  assert const.any(), "the smoke fields have dead neurons in their shared init"
  assert out['tokenize']['dropped_constant'] == int(const.sum()) == ds.meta['dropped_constant']
  np.testing.assert_array_equal(ds.tokens, np.concatenate([base.tokens[:, :base.prefix_len], body[:, ~const]], 1))
  assert ds.meta['dropped_positions'] == np.nonzero(const)[0].tolist()
  assert out['tokenize']['weight_rmse'] <= ref['weight_rmse'] + 1e-6
  assert out['train']['block_size'] == ds.tokens.shape[1] - 1
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer'))
  for name in ('topk3_t0.8', 'topk0_t1'):
    sampled = np.load(os.path.join(workdir, 'samples', name, 'tokens.npy'))
    weights = np.load(os.path.join(workdir, 'samples', name, 'weights.npy'))
    assert sampled.shape[1] == ds.tokens.shape[1]
    full = tok.expand(sampled[:, ds.prefix_len:])
    np.testing.assert_array_equal(full[:, const], np.broadcast_to(body[0, const], (len(full), int(const.sum()))))
    np.testing.assert_array_equal(weights, tok.decode(sampled[:, ds.prefix_len:]))
  assert np.isfinite(out['evaluate']['class_accuracy'])
  # The default (False) leaves the fingerprint as it was: the reference workdir is still finished.
  assert tokenize.run(load_config('smoke'), ref_dir) == ref
