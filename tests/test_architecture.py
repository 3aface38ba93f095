"""The house: a modality is a plug-in, stages never import each other, one I/O layer.

* A toy third modality (tests/toy_signals.py: 1-D sums of sines) registers itself and runs the
  whole smoke pipeline, fit -> evaluate, with no stage module changed.
* The import graph of nfjax (imports inside functions included) has no cycle; no stage module
  imports another stage module; stages never name a modality.
* Only nfjax/io opens, writes, renames or deletes files (a few modules read user inputs).
"""

import ast
import os
import re

import numpy as np
import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'nfjax')
STAGES = ('nfjax.stages.fit', 'nfjax.stages.tokenize', 'nfjax.stages.train', 'nfjax.stages.sample',
          'nfjax.stages.evaluate')


def _modules() -> dict[str, str]:
  out = {}
  for dp, _, fs in os.walk(PACKAGE):
    for f in fs:
      if f.endswith('.py'):
        p = os.path.join(dp, f)
        m = os.path.relpath(p[:-3], ROOT).replace(os.sep, '.')
        out[m[:-len('.__init__')] if m.endswith('.__init__') else m] = p
  return out


def _imports(path: str, modules: dict) -> set[str]:
  """Every nfjax module `path` imports, at any depth of the file (function bodies too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('nfjax'):
      for a in node.names:
        cand = f'{node.module}.{a.name}'
        out.add(cand if cand in modules else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('nfjax')}
  return out


def _graph():
  modules = _modules()
  return modules, {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_cycles():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_import_graph_has_no_cycle_and_no_stage_imports_another():
  modules, graph = _graph()
  assert set(STAGES) <= set(modules)
  assert _cycles(graph) == []
  for stage in STAGES:
    others = graph[stage] & (set(STAGES) - {stage})
    assert not others, f"{stage} imports the stage module(s) {sorted(others)}"


def test_stages_are_modality_free():
  """No stage module imports a modality plug-in or names one: they ask the registry."""
  modules, graph = _graph()
  for stage in STAGES:
    plugins = {m for m in graph[stage] if m.startswith('nfjax.modalities.') and m != 'nfjax.modalities.base'}
    assert not plugins, f"{stage} imports {sorted(plugins)}"
    text = open(modules[stage]).read()
    for word in ("'image'", "'shape'", "'images'", "'shapes'", 'image_shape', 'data.kind', "meta['kind']"):
      assert word not in text, f"{stage} mentions {word}"


# Modules that read the user's own input files (meshes, a PointNet++ checkpoint), never a workdir.
READS_USER_FILES = {'nfjax.data.meshes', 'nfjax.utils.torch_checkpoint', 'nfjax.evaluate.pointnet2'}
FILE_CALLS = re.compile(r"(?<![\w.])open\(|\bnp\.(save|savez|savez_compressed|load)\((?!buf)|\bos\.(replace|rename|"
                        r"remove|unlink|makedirs|mkdir)\(|\bshutil\.|\btempfile\.")


def test_only_the_io_layer_touches_files():
  modules = _modules()
  offenders = []
  for m, p in modules.items():
    if m.startswith('nfjax.io') or m in READS_USER_FILES:
      continue
    for i, line in enumerate(open(p), 1):
      if FILE_CALLS.search(line.split('#')[0]):
        offenders.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
  assert not offenders, "file operations outside nfjax/io:\n" + '\n'.join(offenders)
  # The pattern catches what it is meant to.
  assert FILE_CALLS.search("with open(path) as f:") and FILE_CALLS.search("np.save(path, x)")
  assert FILE_CALLS.search("os.replace(tmp, path)") and not FILE_CALLS.search("np.savez(buf, **arrays)")


@pytest.mark.slow
def test_a_toy_modality_runs_the_whole_pipeline(tmp_path):
  import toy_signals
  from nfjax import main, modalities
  from nfjax.io import fields as field_io
  from nfjax.io import samples as sample_io

  config = toy_signals.get_config()
  assert modalities.for_config(config) is toy_signals.SIGNALS
  workdir = str(tmp_path)
  calls = []
  real_validate = toy_signals.SIGNALS.validate
  toy_signals.SIGNALS.validate = lambda config, stages: (calls.append(set(stages)), real_validate(config, stages))[1]
  try:
    out = main.run(config, workdir, 'all')
  finally:
    del toy_signals.SIGNALS.validate
  assert list(out) == ['fit', 'tokenize', 'train', 'sample', 'evaluate']
  # Validated once per launch, for every stage at once (the stages' own checks find it done).
  assert calls == [{'fit', 'tokenize', 'train', 'sample', 'evaluate'}]

  fit = out['fit']
  fields = field_io.load(os.path.join(workdir, 'fields'))
  assert fields.modality == 'signals' and fields.meta['num_points'] == toy_signals.NUM_POINTS
  assert fit['num_fields'] == 48 and fit['quality_metric'] == 'snr_db'
  # The fields really fit their signals: the modality's quality matches a re-render.
  x, _ = toy_signals.make_signals(48, 0)
  spec = __import__('nfjax.fields.mlp', fromlist=['FieldSpec']).FieldSpec.from_dict(fields.meta['field'])
  again = toy_signals.snr(toy_signals.render(spec, fields.weights), x)
  np.testing.assert_allclose(again, fields.quality, atol=1e-3)
  assert fit['snr_mean'] > 15.0, fit
  assert os.path.exists(os.path.join(workdir, 'fields', 'signals.png'))

  tok = out['tokenize']
  assert tok['snr_tokenized_mean'] < tok['snr_fields_mean'] and np.isnan(tok['psnr_drop_db'])
  assert out['train']['steps'] == config.train.steps
  settings = sample_io.load_settings(workdir)
  for s in settings:
    w, lab = sample_io.load_setting(workdir, s['name'], fields.params_per_field)
    assert w.shape == (8, fields.params_per_field) and set(lab.tolist()) == {0, 1}
    assert os.path.exists(os.path.join(workdir, 'samples', s['name'], 'grid.png'))

  ev = out['evaluate']
  assert ev['modality'] == 'signals' and set(ev['settings']) == {s['name'] for s in settings}
  # The frame's rows: the baseline copies training fields (+ noise), so its nearest training weights
  # are much closer than those of the held-out fields, which the frame keeps out of their own pool.
  assert ev['baseline']['nn_weight_l2_median'] < 0.5 * ev['reference']['nn_weight_l2_median']
  assert ev['num_reference'] + ev['num_heldout_fields'] <= ev['num_fields'] == 48
  assert ev['mmd'] == ev['settings'][ev['headline_setting']]['mmd']
  assert os.path.exists(os.path.join(workdir, 'eval', 'per_sample', f"{settings[0]['name']}.npz"))

  # Re-running skips every stage (same summaries).
  again = main.run(config, workdir, 'all')
  assert again['fit'] == fit and again['evaluate']['mmd'] == ev['mmd']


def test_an_unknown_modality_is_one_clear_error(tmp_path):
  from conftest import load_config
  from nfjax import main
  from nfjax.errors import ConfigError
  config = load_config('smoke', **{'data.modality': 'audio'})
  with pytest.raises(ConfigError, match=r"data.modality='audio' is not a registered modality; registered: .*images"):
    main.run(config, str(tmp_path), 'fit')
  assert not os.path.exists(os.path.join(str(tmp_path), 'fields'))
  # A bad key of a later stage is refused before the first stage reads any data.
  with pytest.raises(ConfigError, match=r'evaluate.num_neighbours=-1'):
    main.run(load_config('smoke', **{'evaluate.num_neighbours': -1}), str(tmp_path), 'all')
  with pytest.raises(ConfigError, match=r'evaluate.ssim_tile=0'):
    main.run(load_config('smoke', **{'evaluate.ssim_tile': 0}), str(tmp_path), 'fit,evaluate')
  assert os.listdir(str(tmp_path)) == []


def test_the_readme_layout_names_every_module():
  """README's layout section lists every module of the package (by its file's stem) and every package."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  layout = text[text.index('## Layout'):text.index('## ', text.index('## Layout') + 3)]
  missing = []
  for m, p in _modules().items():
    stem = os.path.basename(p)[:-3]
    name = m.rsplit('.', 1)[-1] + '/' if stem == '__init__' else stem
    if name not in layout and m != 'nfjax':
      missing.append(m)
  assert not missing, f"README layout does not mention {missing}"
  assert 'docs/architecture.md' in layout
