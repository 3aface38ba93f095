"""tokenize.condition='prototype': sequences conditioned on the prototype a field started from, and a
class sampled through one of its prototypes (tokenize, sample, the notebook sampler, no_structure)."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import load_config
from nfjax import main
from nfjax.errors import ConfigError
from nfjax.io import files
from nfjax.io import tokens as token_io

SMALL = {'data.num_fields': 40, 'fit.steps': 40, 'fit.shared_init_steps': 60, 'fit.chunk_size': 20,
         'fit.shared_init_candidates': 2, 'fit.shared_init_probe': 4, 'fit.prototypes': 2,
         'train.steps': 6, 'train.eval_every': 6, 'train.checkpoint_every': 6,
         'sample.num_samples': 20, 'sample.batch_size': 8, 'sample.settings': ((3, 0.8, 1.0),)}


def _config(**kw):
  return load_config('smoke', **{**SMALL, **kw})


@pytest.fixture(scope='module')
def conditioned(tmp_path_factory):
  """One fit with 2 prototypes per class, tokenized by class and by prototype; the prototype one trained
  and sampled."""
  root = tmp_path_factory.mktemp('conditions')
  by_class, by_proto = str(root / 'class'), str(root / 'proto')
  main.run(_config(), by_class, 'fit,tokenize')
  shutil.copytree(os.path.join(by_class, 'fields'), os.path.join(by_proto, 'fields'))
  main.run(_config(**{'tokenize.condition': 'prototype'}), by_proto, 'tokenize,train,sample')
  return by_class, by_proto


def test_tokens_name_each_fields_prototype_and_keep_the_class_split(conditioned):
  by_class, by_proto = conditioned
  proto = files.read_npz(os.path.join(by_class, 'fields', 'prototypes.npz'))
  plain, ds = token_io.load(os.path.join(by_class, 'tokens')), token_io.load(os.path.join(by_proto, 'tokens'))
  assert ds.vocab.num_classes == len(proto['labels']) > plain.vocab.num_classes    # one token per prototype
  np.testing.assert_array_equal(ds.condition_class, proto['labels'])
  assert plain.condition_class is None
  np.testing.assert_array_equal(ds.conditions(), proto['of_field'][ds.field_index])  # the field's own start
  np.testing.assert_array_equal(ds.class_of(ds.conditions()), ds.labels)          # labels stay the classes
  np.testing.assert_array_equal(ds.labels, plain.labels)
  np.testing.assert_array_equal(ds.train_idx, plain.train_idx)                     # the same split
  np.testing.assert_array_equal(ds.tokens[:, 2:], plain.tokens[:, 2:])             # the same weight tokens
  assert ds.num_label_classes == plain.num_label_classes == 10
  summary = json.load(open(os.path.join(by_proto, 'tokenizer', 'summary.json')))
  assert summary['num_conditions'] == len(proto['labels']) and summary['num_classes'] == 10
  assert 'num_conditions' not in json.load(open(os.path.join(by_class, 'tokenizer', 'summary.json')))


def test_a_class_is_drawn_through_its_prototypes_with_their_training_shares(conditioned):
  ds = token_io.load(os.path.join(conditioned[1], 'tokens'))
  have = np.unique(ds.condition_class)
  assert len(have) < 10   # 40 smoke fields leave a class out: it has no prototype to be sampled through
  with pytest.raises(ValueError, match='has no prototype'):
    ds.conditions_for(np.setdiff1d(np.arange(10), have)[:1], seed=3)
  classes = np.repeat(have, 2000)
  cond = ds.conditions_for(classes, seed=3)
  np.testing.assert_array_equal(ds.class_of(cond), classes)
  counts = np.bincount(ds.conditions()[ds.train_idx], minlength=len(ds.condition_class))
  for c in have:
    mine = np.nonzero(ds.condition_class == c)[0]
    share = counts[mine] / counts[mine].sum()
    drawn = np.bincount(cond[classes == c], minlength=len(counts))[mine] / 2000
    np.testing.assert_allclose(drawn, share, atol=0.04)
  # seeded, and entry i depends on the seed, i and its class only
  np.testing.assert_array_equal(ds.conditions_for(classes[:500], seed=3), cond[:500])
  assert not np.array_equal(ds.conditions_for(classes, seed=4), cond)


def test_samples_are_labelled_with_the_class_of_the_prototype_they_were_prompted_with(conditioned):
  _, by_proto = conditioned
  ds = token_io.load(os.path.join(by_proto, 'tokens'))
  d = os.path.join(by_proto, 'samples', 'topk3_t0.8')
  toks, labels = np.load(os.path.join(d, 'tokens.npy')), np.load(os.path.join(d, 'labels.npy'))
  have = np.unique(ds.condition_class)                                            # classes with fields
  np.testing.assert_array_equal(labels, have[np.arange(20) % len(have)])          # they cycle, as before
  prompted = toks[:, 1] - ds.vocab.class_token(0)
  np.testing.assert_array_equal(ds.class_of(prompted), labels)
  np.testing.assert_array_equal(prompted, ds.conditions_for(labels, seed=0))
  assert json.load(open(os.path.join(by_proto, 'samples', 'summary.json')))['num_samples'] == 20


def test_the_notebook_sampler_and_no_structure_condition_the_same_way(conditioned, monkeypatch):
  from nfjax.evaluate import no_structure
  from nfjax.notebook import Sampler
  _, by_proto = conditioned
  ds = token_io.load(os.path.join(by_proto, 'tokens'))
  s = Sampler(by_proto)
  assert s.num_classes == 10
  a, b = np.unique(ds.condition_class)[[0, -1]]
  out = s.sample([a, b], num=4, seed=5)
  np.testing.assert_array_equal(out.labels, [a] * 4 + [b] * 4)
  np.testing.assert_array_equal(s.prompt(out.labels, 5)[:, 1] - ds.vocab.class_token(0),
                                ds.conditions_for(out.labels, 5))
  seen = {}
  real = no_structure.histogram_tokens

  def spy(tokens, labels, classes, seed):
    seen.update(labels=labels, classes=classes)
    return real(tokens, labels, classes, seed)
  monkeypatch.setattr(no_structure, 'histogram_tokens', spy)
  labels = np.unique(ds.condition_class)[np.arange(30) % len(np.unique(ds.condition_class))]
  w, info = no_structure.draw(by_proto, labels, 11, s.spec.num_params)
  assert w.shape == (30, s.spec.num_params) and 'prototype' in info['what']
  np.testing.assert_array_equal(seen['labels'], ds.conditions()[ds.train_idx])    # per-prototype histograms
  np.testing.assert_array_equal(ds.class_of(seen['classes']), labels)
  # The second row of such a workdir: the per-class histograms, the prototypes ignored.
  both = no_structure.draw_rows(by_proto, labels, 11, s.spec.num_params)
  assert list(both) == ['no_structure', 'no_structure_class']
  classes = np.unique(token_io.load(os.path.join(conditioned[0], 'tokens')).labels)[:3]
  assert list(no_structure.draw_rows(conditioned[0], classes, 11, s.spec.num_params)) == ['no_structure']
  wc, info = no_structure.draw(by_proto, labels, 11, s.spec.num_params, per_class=True)
  np.testing.assert_array_equal(both['no_structure'][0], w)                          # the same draws, read once
  np.testing.assert_array_equal(both['no_structure_class'][0], wc)
  assert wc.shape == w.shape and 'class' in info['what'] and 'prototypes' in info['conditioning']
  np.testing.assert_array_equal(seen['labels'], ds.labels[ds.train_idx])
  np.testing.assert_array_equal(seen['classes'], labels)


def test_evaluate_reads_the_samples_against_both_rows(conditioned, tmp_path):
  workdir = str(tmp_path / 'proto')
  shutil.copytree(conditioned[1], workdir)
  s = main.run(_config(**{'tokenize.condition': 'prototype'}), workdir, 'evaluate')['evaluate']
  ns, nc, h = s['no_structure'], s['no_structure_class'], s['settings']['topk3_t0.8']
  assert 'prototype' in ns['conditioning'] and 'prototypes' in nc['conditioning']
  assert ns['num_samples'] == nc['num_samples'] == h['num_samples'] == 20
  for name, row in (('no_structure', ns), ('no_structure_class', nc)):
    vs = s[f'vs_{name}']
    for key in ('class_accuracy', 'frechet_distance', 'ssim_cov'):
      assert vs[key] == pytest.approx(h[key] - row[key]), (name, key)
    assert os.path.getsize(os.path.join(workdir, 'eval', f'neighbours_{name}.png')) > 1000


def test_prototype_conditions_are_refused_without_prototypes(tmp_path):
  with pytest.raises(ConfigError, match=r"tokenize.condition='prototype'.*set fit.prototypes > 0"):
    main.run(_config(**{'fit.prototypes': 0, 'tokenize.condition': 'prototype'}), str(tmp_path / 'a'), 'tokenize')
  with pytest.raises(ConfigError, match=r"tokenize.condition"):
    main.run(_config(**{'tokenize.condition': 'cluster'}), str(tmp_path / 'b'), 'tokenize')
  with pytest.raises(ConfigError, match=r"tokenize.condition='prototype' needs the conditioning token"):
    main.run(_config(**{'tokenize.condition': 'prototype', 'tokenize.class_token': 'no'}), str(tmp_path / 'c'),
             'tokenize')
  assert not (tmp_path / 'a').exists() or not os.listdir(tmp_path / 'a')


def test_support_training_keeps_every_slot_to_its_prototypes_training_codes(conditioned, tmp_path):
  """sample.support='training': each weight slot takes only codes that the training sequences of the
  sample's prototype use there (the same draw unrestricted leaves them); the notebook sampler draws the
  same tokens."""
  from nfjax.notebook import Sampler
  _, by_proto = conditioned
  ds = token_io.load(os.path.join(by_proto, 'tokens'))
  seqs, cond = ds.tokens[ds.train_idx, 2:], ds.conditions()[ds.train_idx]
  hot = {'sample.settings': ((0, 2.0, 1.0),)}   # T 2, no filter: unrestricted draws stray
  drawn = {}
  for support in ('all', 'training'):
    w = str(tmp_path / support)
    for d in ('fields', 'tokenizer', 'tokens', 'transformer'):
      shutil.copytree(os.path.join(by_proto, d), os.path.join(w, d))
    main.run(_config(**hot, **{'sample.support': support}), w, 'sample')
    drawn[support] = np.load(os.path.join(w, 'samples', 'topk0_t2', 'tokens.npy'))
    settings = json.load(open(os.path.join(w, 'samples', 'settings.json')))['settings']
    assert [s.get('support', 'all') for s in settings] == [support]

  def inside(toks):
    prompted = toks[:, 1] - ds.vocab.class_token(0)
    return np.array([[np.isin(toks[i, 2 + j], seqs[cond == prompted[i], j]) for j in range(seqs.shape[1])]
                     for i in range(len(toks))])
  assert inside(drawn['training']).all()
  assert not inside(drawn['all']).all()
  np.testing.assert_array_equal(drawn['training'][:, :2], drawn['all'][:, :2])    # the same prompts
  labels = np.load(os.path.join(tmp_path, 'training', 'samples', 'topk0_t2', 'labels.npy'))
  nb = Sampler(by_proto).sample(labels.tolist(), num=1, temperature=2.0, top_k=0, support='training')
  np.testing.assert_array_equal(nb.tokens, drawn['training'][:, 2:])
