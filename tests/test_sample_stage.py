"""The sample stage inside the whole pipeline: fit -> tokenize -> train -> sample -> evaluate on smoke data."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import load_config


def _config(**over):
  base = {'sample.num_samples': 12, 'sample.batch_size': 8, 'sample.settings': ((3, 0.8, 1.0), (0, 1.0, 0.9)),
          'evaluate.classifier.epochs': 1}
  base.update(over)
  return load_config('smoke', **base)


@pytest.fixture(scope='module')
def pipeline(smoke_fields, tmp_path_factory):
  """A smoke workdir with every stage finished (the fit stage is shared with the other tests)."""
  from nfjax import main
  workdir = str(tmp_path_factory.mktemp('pipeline'))
  shutil.copytree(os.path.join(smoke_fields, 'fields'), os.path.join(workdir, 'fields'))
  summaries = main.run(_config(), workdir, 'all')
  return workdir, summaries


def test_pipeline_writes_samples_that_decode_to_fields(pipeline):
  from nfjax.io import tokens as tok_data
  from nfjax.io import fields as wds
  workdir, summaries = pipeline
  assert list(summaries) == ['fit', 'tokenize', 'train', 'sample', 'evaluate']
  s = summaries['sample']
  assert s['num_samples'] == 24 and s['samples_per_setting'] == 12 and s['tokens_per_sec'] > 0
  assert [x['name'] for x in s['settings']] == ['topk3_t0.8', 'topk0_t1_p0.9']
  tokens = tok_data.load(os.path.join(workdir, 'tokens'))
  fields = wds.load(os.path.join(workdir, 'fields'))
  vocab, prefix = tokens.vocab, tokens.prefix_len
  for st in s['settings']:
    d = os.path.join(workdir, 'samples', st['name'])
    toks, w, lab = (np.load(os.path.join(d, f)) for f in ('tokens.npy', 'weights.npy', 'labels.npy'))
    assert toks.shape == (12, tokens.seq_len) and w.shape == (12, fields.params_per_field)
    assert w.dtype == np.float32 and np.isfinite(w).all()
    np.testing.assert_array_equal(lab, np.arange(12) % vocab.num_classes)
    # Prompts are [SOS, class]; every generated slot is a code (special tokens are masked).
    np.testing.assert_array_equal(toks[:, 0], vocab.sos)
    np.testing.assert_array_equal(toks[:, 1], vocab.class_token(lab))
    assert toks[:, prefix:].max() < vocab.num_codes and toks[:, prefix:].min() >= 0
    assert os.path.getsize(os.path.join(d, 'grid.png')) > 0
  assert os.path.getsize(os.path.join(workdir, 'samples', 'generation.gif')) > 0
  from nfjax import main   # the launcher's closing lines name every picture, per-setting grids included
  sample_line = next(ln for ln in main.closing_lines(workdir, summaries) if ln.startswith('sample: '))
  for pic in ['generation.gif'] + [f"{st['name']}/grid.png" for st in s['settings']]:
    assert pic in sample_line, (pic, sample_line)
  ev = json.load(open(os.path.join(workdir, 'eval', 'summary.json')))
  assert set(ev['settings']) >= {'topk3_t0.8', 'topk0_t1_p0.9'}


def test_decoded_weights_are_the_tokenizers_decoding(pipeline):
  from nfjax import tokenizers
  workdir, _ = pipeline
  tok = tokenizers.restore(os.path.join(workdir, 'tokenizer'))
  d = os.path.join(workdir, 'samples', 'topk3_t0.8')
  toks, w = np.load(os.path.join(d, 'tokens.npy')), np.load(os.path.join(d, 'weights.npy'))
  np.testing.assert_allclose(w, tok.decode(toks[:, 2:]), rtol=0, atol=0)


def test_rerun_skips_and_a_lost_setting_is_redrawn_identically(pipeline):
  from nfjax.stages import sample
  workdir, summaries = pipeline
  assert sample.run(_config(), workdir) == json.load(open(os.path.join(workdir, 'samples', 'summary.json')))
  samples = os.path.join(workdir, 'samples')
  d = os.path.join(samples, 'topk0_t1_p0.9')
  names = ('tokens.npy', 'weights.npy', 'labels.npy')
  before = {f: open(os.path.join(d, f), 'rb').read() for f in names}
  kept = os.path.join(samples, 'topk3_t0.8', 'tokens.npy')
  kept_stat, kept_bytes = os.stat(kept), open(kept, 'rb').read()
  # As if the job died while writing this setting: its outputs (weights.npy marks it done) are gone,
  # and so is the stage summary (which marks the stage finished).
  for f in names:
    os.unlink(os.path.join(d, f))
  os.unlink(os.path.join(samples, 'summary.json'))
  assert not any(os.path.exists(os.path.join(d, f)) for f in names)
  again = sample.run(_config(), workdir)
  # The lost setting was drawn again, byte for byte the same (per-sample seeds) ...
  for f in names:
    assert os.path.exists(os.path.join(d, f)), f
    assert open(os.path.join(d, f), 'rb').read() == before[f], f
  assert np.load(os.path.join(d, 'tokens.npy')).shape == (12, np.load(kept).shape[1])
  # ... the finished one was skipped (not rewritten), and the stage is finished again.
  st = os.stat(kept)
  assert (st.st_ino, st.st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)
  assert open(kept, 'rb').read() == kept_bytes
  assert again == json.load(open(os.path.join(samples, 'summary.json')))
  assert again['settings'] == summaries['sample']['settings'] and again['num_samples'] == 24


def test_samples_do_not_depend_on_the_batch_size(pipeline, tmp_path):
  from nfjax.stages import sample
  workdir, _ = pipeline
  other = str(tmp_path / 'w')
  for d in ('fields', 'tokenizer', 'tokens', 'transformer'):
    shutil.copytree(os.path.join(workdir, d), os.path.join(other, d))
  sample.run(_config(**{'sample.batch_size': 5}), other)
  for name in ('topk3_t0.8', 'topk0_t1_p0.9'):
    np.testing.assert_array_equal(np.load(os.path.join(other, 'samples', name, 'tokens.npy')),
                                  np.load(os.path.join(workdir, 'samples', name, 'tokens.npy')))


def test_support_all_leaves_the_sample_fingerprint_as_before_the_key():
  """A workdir sampled before sample.support existed is not sampled again ('all' is left out)."""
  from nfjax import config as config_lib
  from nfjax.stages import sample
  old = _config()
  with old.unlocked():
    del old.sample['support']
  assert config_lib.fingerprint(_config(), sample.KEYS) == config_lib.fingerprint(old, sample.KEYS)
  assert config_lib.fingerprint(_config(**{'sample.support': 'training'}), sample.KEYS)['sample']['support'] == 'training'


def test_bad_sample_configs_fail_clearly(pipeline, tmp_path):
  from nfjax.stages import sample
  from nfjax.errors import ConfigError, NfjaxError
  workdir, _ = pipeline
  with pytest.raises(ConfigError, match='top_k'):
    sample.run(_config(**{'sample.settings': ((3, -1.0, 1.0),)}), str(tmp_path / 'a'))
  with pytest.raises(ConfigError, match='triple'):
    sample.run(_config(**{'sample.settings': ((3, 1.0),)}), str(tmp_path / 'b'))
  with pytest.raises(ConfigError, match="sample.support"):
    sample.run(_config(**{'sample.support': 'seen'}), str(tmp_path / 'c'))
  with pytest.raises(NfjaxError, match=r'empty/fields does not exist; the sample stage reads it: run the fit stage'):
    sample.run(_config(), str(tmp_path / 'empty'))      # the first missing input, with the stage that makes it


def test_the_sampler_computes_on_the_device_it_is_given(pipeline, tmp_path, monkeypatch):
  """Parameters, sampled tokens and the summary's device are the requested device (one of the 8 fake
  CPU devices, not device 0), and the default is the default backend's first device."""
  import jax
  from nfjax import sampling
  from nfjax.stages import sample
  workdir, summaries = pipeline
  assert summaries['sample']['device'] == str(jax.devices()[0])
  target = jax.devices()[1]
  model, _, _, _ = sampling.load_generator(workdir)
  assert {d for leaf in jax.tree.leaves(nnx_state(model)) for d in leaf.devices()} == {jax.devices()[0]}
  seen = {}
  make_generate = sampling.make_generate

  def spy(model, *args, **kwargs):   # what the stage's sampler holds and returns
    seen['params'] = {d for leaf in jax.tree.leaves(nnx_state(model)) for d in leaf.devices()}
    gen = make_generate(model, *args, **kwargs)
    compile_for = gen.compile

    def compile(*a):
      exe = compile_for(*a)

      def call(*b):
        out = exe(*b)
        seen.setdefault('outputs', set()).update(out.devices())
        return out
      return call
    gen.compile = compile
    return gen
  monkeypatch.setattr(sampling, 'make_generate', spy)
  other = str(tmp_path / 'w')
  for d in ('fields', 'tokenizer', 'tokens', 'transformer'):
    shutil.copytree(os.path.join(workdir, d), os.path.join(other, d))
  s = sample.run(_config(), other, device=target)
  assert seen['params'] == {target} and seen['outputs'] == {target}
  assert s['device'] == str(target) and s['device_kind'] == target.device_kind
  for name in ('topk3_t0.8', 'topk0_t1_p0.9'):   # the same samples as on device 0
    np.testing.assert_array_equal(np.load(os.path.join(other, 'samples', name, 'tokens.npy')),
                                  np.load(os.path.join(workdir, 'samples', name, 'tokens.npy')))


def test_a_launch_that_trains_without_class_dropout_refuses_guided_settings_before_the_fit(tmp_path):
  """Training and sampling in one launch with a guided setting and train.class_dropout=0 is one
  ConfigError naming the setting and the key before any stage runs (not after the fit and the training);
  with class dropout, or without the train stage in the launch (the sample stage then checks the model
  it finds), the config passes."""
  from nfjax import main
  from nfjax.configs import checks
  from nfjax.errors import ConfigError
  grid = ((3, 0.8, 1.0), (3, 0.8, 1.0, 2.0), (0, 1.0, 1.0, 1.0))
  cfg = _config(**{'sample.settings': grid})
  with pytest.raises(ConfigError, match=r"\(3, 0\.8, 1\.0, 2\.0\) uses classifier-free guidance.*"
                                        r"--config\.train\.class_dropout=0\.1"):
    main.run(cfg, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'fields')
  checks.validate(_config(**{'sample.settings': grid, 'train.class_dropout': 0.1}), ('train', 'sample'))
  checks.validate(cfg, ('sample',))
  checks.validate(cfg, ('fit', 'tokenize', 'train'))
  checks.validate(_config(**{'sample.settings': ((3, 0.8, 1.0), (0, 1.0, 1.0, 1.0))}), ('train', 'sample'))


def test_guided_settings_need_a_null_class_and_are_named_with_their_scale(pipeline, tmp_path, monkeypatch):
  """Classifier-free guidance end to end: a guided setting on a model trained without class dropout is
  one ConfigError naming train.class_dropout before anything compiles; a model trained with it
  samples the guided setting into topk3_t0.8_g2 (its conditional prompts kept) with a second program,
  and the unguided setting beside it with the plain one."""
  from nfjax import main, sampling
  from nfjax.errors import ConfigError
  from nfjax.stages import sample
  workdir, _ = pipeline
  grid = ((3, 0.8, 1.0), (3, 0.8, 1.0, 2.0))
  other = str(tmp_path / 'w')
  for d in ('fields', 'tokenizer', 'tokens', 'transformer'):
    shutil.copytree(os.path.join(workdir, d), os.path.join(other, d))
  make_generate = sampling.make_generate

  def no_compile(*a, **k):
    raise AssertionError("refused configs must not reach the sampler")
  monkeypatch.setattr(sampling, 'make_generate', no_compile)
  with pytest.raises(ConfigError, match=r'topk3_t0.8_g2 use classifier-free guidance.*train.class_dropout > 0'):
    sample.run(_config(**{'sample.settings': grid}), other)
  monkeypatch.setattr(sampling, 'make_generate', make_generate)

  compiled = []   # the programs the stage compiles: by their number of arguments

  def spy(*a, **k):
    gen = make_generate(*a, **k)
    compile_for = gen.compile
    gen.compile = lambda *args: compiled.append(len(args)) or compile_for(*args)
    return gen
  monkeypatch.setattr(sampling, 'make_generate', spy)
  cfg = _config(**{'sample.settings': grid, 'train.class_dropout': 0.5, 'train.steps': 3})
  shutil.rmtree(os.path.join(other, 'transformer'))
  s = main.run(cfg, other, 'train,sample')['sample']
  # The unguided setting runs the plain program (prompt, keys, temperature, top_k, top_p, allowed) as in a
  # grid without guidance; the guided one a second program (+ guidance, null-class prompts).
  assert compiled == [6, 8]
  assert [x['name'] for x in s['settings']] == ['topk3_t0.8', 'topk3_t0.8_g2']
  assert s['settings'][1]['guidance'] == 2.0 and 'guidance' not in s['settings'][0]
  model = sampling.load_generator(other)[0]
  tokens = json.load(open(os.path.join(other, 'tokens', 'vocab.json')))
  assert model.cfg.null_class == tokens['vocab_size'] and model.cfg.vocab_size == tokens['vocab_size'] + 1
  d = lambda name, f='tokens.npy': os.path.join(other, 'samples', name, f)  # noqa: E731
  plain, guided = np.load(d('topk3_t0.8')), np.load(d('topk3_t0.8_g2'))
  np.testing.assert_array_equal(guided[:, :2], plain[:, :2])      # the conditional prompts [SOS, class]
  assert not np.array_equal(guided, plain) and guided[:, 2:].max() < tokens['num_codes']
  assert os.path.getsize(d('topk3_t0.8_g2', 'grid.png')) > 0


def nnx_state(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))
