"""What the Colab notebooks (colab/*.ipynb) call besides the pipeline itself.

The notebooks run the pipeline with `nfjax.main.run(config, workdir, stages)` (the launcher's own
function) and use this module for the rest, so no logic lives only in a notebook:

  get_config(preset, config_file, overrides)   a config file's preset, as `--config=FILE:PRESET`
  resolve_workdir(workdir, preset)             '' -> workdirs/<preset> (/content/workdirs on Colab)
  show(path) / show_images(images, labels)     PNG / GIF files and image arrays as notebook output
  show_figure(fig)                             a matplotlib figure (nfjax.analysis.plot_*) as PNG
  summaries_table(workdir) / eval_table(...)   headline figures as tables (HTML in notebooks)
  Sampler(workdir).sample(classes, ...)        new fields from a trained workdir with chosen
                                               class, temperature, top-k, top-p and seed
  sampler_widget(sampler)                      ipywidgets controls for it (only if installed)

Notebook parameters come from a cell tagged "parameters" that reads NFJAX_NOTEBOOK_PRESET and
NFJAX_NOTEBOOK_WORKDIR (how tests/test_notebooks.py runs every notebook on the smoke preset).
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import io as _io
import math
import os
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

import nfjax
from nfjax import configs, sampling
from nfjax.fields import mlp
from nfjax.io import files
from nfjax.io import workdir as wd
from nfjax.utils import images as img_utils

ENV_PRESET = 'NFJAX_NOTEBOOK_PRESET'
ENV_WORKDIR = 'NFJAX_NOTEBOOK_WORKDIR'


def in_colab() -> bool:
  return 'google.colab' in sys.modules


# ---------------------------------------------------------------------------------------------
# Configs and workdirs.


def repo_root() -> str | None:
  """The checkout nfjax was imported from (the directory holding configs/), if there is one."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(nfjax.__file__)))
  for cand in (here, os.getcwd(), os.path.dirname(os.getcwd())):
    if os.path.isdir(os.path.join(cand, 'configs')) and os.path.isdir(os.path.join(cand, 'nfjax')):
      return cand
  return None


def find_config_file(config_file: str) -> str:
  """An existing path for `config_file`: a packaged config by name ('mnist', 'shapes'), else the path
  as given, else relative to the checkout (repo_root)."""
  config_file = configs.config_path(config_file)
  if os.path.exists(config_file):
    return os.path.abspath(config_file)
  root = repo_root()
  if root and os.path.exists(os.path.join(root, config_file)):
    return os.path.join(root, config_file)
  raise FileNotFoundError(f"config file {config_file!r} not found in {os.getcwd()} or the nfjax checkout "
                          f"({root or 'none: nfjax was not imported from a checkout'}); pass its full path")


def get_config(preset: str = 'quick', config_file: str = 'mnist', overrides: dict | None = None):
  """`get_config(preset)` of a config file with dotted-key overrides, exactly what
  `--config=FILE:PRESET --config.KEY=VALUE` gives the launcher (locked, type-checked).

  `config_file`: a packaged config by name ('mnist', 'shapes') or a file. `preset` may also be
  'FILE:PRESET' (e.g. 'shapes:quick').
  """
  if ':' in preset:
    config_file, preset = preset.rsplit(':', 1)
  path = find_config_file(config_file)
  spec = importlib.util.spec_from_file_location(f'nfjax_config_{os.path.basename(path)[:-3]}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(preset)
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config key {key!r} does not exist in {config_file}")
    node[leaf] = _tuples(value)
  return config


def _tuples(value):
  """Lists -> tuples, recursively (configs hold tuples for anything a user may override)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_workdir(workdir: str, preset: str) -> str:
  """'' -> a default per preset: /content/workdirs/<preset> on Colab, ./workdirs/<preset> else."""
  if workdir:
    return files.absolute(workdir)   # '~' expanded; a URL as it is
  base = '/content/workdirs' if in_colab() else os.path.join(repo_root() or os.getcwd(), 'workdirs')
  return os.path.join(base, preset.rsplit(':', 1)[-1])


def read_summary(workdir: str, dirname: str) -> dict | None:
  p = wd.path(workdir, dirname, 'summary.json')
  return files.read_json(p) if files.exists(p) else None


# ---------------------------------------------------------------------------------------------
# Pictures.


def _display(obj) -> None:
  from IPython.display import display
  display(obj)


def show(path: str, width: int | None = None) -> None:
  """Display a PNG/GIF file (IPython.display.Image: works headless and in Colab)."""
  from IPython.display import Image
  if not files.exists(path):
    raise FileNotFoundError(f"{path} does not exist: has the stage that writes it run?")
  fmt = os.path.splitext(path)[1].lower().lstrip('.')
  _display(Image(data=files.read_bytes(path), format='jpeg' if fmt == 'jpg' else fmt, width=width))


def show_figure(fig) -> None:
  """Display a matplotlib Figure as a PNG and close it (the same output with any backend, once)."""
  import matplotlib.pyplot as plt
  from IPython.display import Image
  buf = _io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  _display(Image(data=buf.getvalue(), format='png'))


def image_grid(images, labels=None, per_row: int = 10, scale: int = 3, row_prefix: str = 'class',
               col_labels: Sequence[str] | None = None):
  """Images [N, H, W] in [0, 1] -> a PIL grid; with labels, one row per label (up to per_row each)."""
  images = np.asarray(images, np.float32)
  if len(images) == 0:
    raise ValueError("no images to show")
  if labels is not None:
    labels = np.asarray(labels)
    rows, names = [], []
    for c in np.unique(labels):
      idx = np.nonzero(labels == c)[0]
      for lo in range(0, len(idx), per_row):
        rows.append(images[idx[lo:lo + per_row]])
        names.append(f'{row_prefix} {c}' if lo == 0 else '')
    return img_utils.grid(rows, row_labels=names, col_labels=col_labels, scale=scale)
  rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
  return img_utils.grid(rows, col_labels=col_labels, scale=scale)


def show_images(images, labels=None, per_row: int = 10, scale: int = 3, row_prefix: str = 'class',
                col_labels: Sequence[str] | None = None) -> None:
  """Display images [N, H, W] as a PNG grid (one row per label when labels are given)."""
  from IPython.display import Image
  buf = _io.BytesIO()
  image_grid(images, labels, per_row, scale, row_prefix, col_labels).save(buf, format='PNG')
  _display(Image(data=buf.getvalue(), format='png'))


def sample_grids(workdir: str) -> list[tuple[str, str]]:
  """[(setting name, samples/<setting>/grid.png)] of a workdir's sample stage, in settings order."""
  path = wd.path(workdir, wd.SAMPLES, 'settings.json')
  if not files.exists(path):
    return []
  out = []
  for s in files.read_json(path)['settings']:
    png = wd.path(workdir, wd.SAMPLES, s['name'], 'grid.png')
    if files.exists(png):
      out.append((s['name'], png))
  return out


def plot_training(workdir: str):
  """Train and eval loss of WORKDIR/transformer/metrics.jsonl (matplotlib Figure)."""
  import matplotlib.pyplot as plt
  train, evals = [], []
  for r in files.read_jsonl(wd.path(workdir, wd.TRANSFORMER, 'metrics.jsonl')):
    if 'loss' in r:
      train.append((r['step'], r['loss']))
    if 'eval_loss' in r:
      evals.append((r['step'], r['eval_loss']))
  fig, ax = plt.subplots(figsize=(5, 3))
  if train:
    ax.plot(*zip(*train), label='train loss')
  if evals:
    ax.plot(*zip(*evals), 'o-', label='eval loss')
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats/token)')
  ax.legend()
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------------------------
# Tables.


def _fmt(v: Any) -> str:
  if v is None:
    return ''
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    if math.isnan(v):
      return 'nan'
    return f'{v:.4g}' if abs(v) < 1e5 else f'{v:,.0f}'
  if isinstance(v, int):
    return f'{v:,}' if abs(v) >= 10_000 else str(v)
  if isinstance(v, (list, tuple)):
    return 'x'.join(map(str, v)) if all(isinstance(x, int) for x in v) else ', '.join(map(_fmt, v))
  return str(v)


@dataclasses.dataclass
class Table:
  """Rows of dicts shown as an HTML table in notebooks and as aligned text elsewhere."""
  rows: list[dict]
  columns: list[str] | None = None
  title: str = ''

  def __post_init__(self):
    if self.columns is None:
      cols: list[str] = []
      for r in self.rows:
        cols += [k for k in r if k not in cols]
      self.columns = cols

  def cells(self) -> list[list[str]]:
    return [[_fmt(r.get(c)) for c in self.columns] for r in self.rows]

  def _repr_html_(self) -> str:
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in self.columns)
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(x)}</td>' for x in row) + '</tr>' for row in self.cells())
    cap = f'<caption>{html.escape(self.title)}</caption>' if self.title else ''
    return f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

  def __str__(self) -> str:
    cells = self.cells()
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
    line = lambda xs: '  '.join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()
    out = ([self.title] if self.title else []) + [line(self.columns), line(['-' * w for w in widths])]
    return '\n'.join(out + [line(r) for r in cells])

  __repr__ = __str__


# Headline figures per stage (nfjax DESIGN: the pipeline table), in this order.
HEADLINES = {
    ('fit', wd.FIELDS): ('num_fields', 'params_per_field', 'psnr_mean', 'psnr_p10', 'psnr_min', 'num_flagged',
                        'fields_per_sec', 'seconds'),
    ('tokenize', wd.TOKENIZER): ('method', 'vocab_size', 'weight_rmse', 'psnr_fields_mean', 'psnr_tokenized_mean',
                                'psnr_drop_db', 'codebook_usage', 'seconds'),
    ('train', wd.TRANSFORMER): ('steps', 'params', 'train_loss', 'eval_loss', 'eval_accuracy', 'tokens_per_sec',
                               'seconds'),
    ('sample', wd.SAMPLES): ('num_samples', 'tokens_per_sec', 'seconds'),
    ('evaluate', wd.EVAL): ('headline_setting', 'class_accuracy', 'frechet_distance', 'ssim_mmd', 'ssim_cov',
                           'ssim_1nna', 'seconds'),
}


def summaries_table(workdir: str) -> Table:
  """The headline figures of every finished stage of a workdir (one row per figure)."""
  rows = []
  for (stage, dirname), keys in HEADLINES.items():
    s = read_summary(workdir, dirname)
    if s is None:
      continue
    for k in keys:
      if k in s:
        rows.append({'stage': stage, 'figure': k, 'value': s[k]})
  return Table(rows, ['stage', 'figure', 'value'], title=f'{workdir}/<stage>/summary.json')


EVAL_COLUMNS = ('num_evaluated', 'class_accuracy', 'frechet_distance', 'ssim_mmd', 'ssim_cov', 'ssim_1nna',
                'copy_fraction', 'nn_image_l2_median')


def eval_table(workdir_or_summary) -> Table:
  """eval/summary.json as one row per evaluated set: the reference reconstructions (ceiling), the
  noisy-copy baseline, every sample setting, and NeF-GPT's reported numbers."""
  e = workdir_or_summary if isinstance(workdir_or_summary, dict) else read_summary(workdir_or_summary, wd.EVAL)
  if e is None:
    raise FileNotFoundError(f"no eval/summary.json in {workdir_or_summary}: run the evaluate stage first")

  def row(name, d):
    nov = d.get('novelty') or {}
    r = {'set': name, **{k: d.get(k) for k in EVAL_COLUMNS if k in d}}
    if 'copy_fraction' in nov:
      r['copy_fraction'] = nov['copy_fraction']
    if 'nn_image_l2' in nov:
      r['nn_image_l2_median'] = nov['nn_image_l2'].get('median')
    return r

  rows = []
  if 'reference' in e:
    rows.append(row('reference (ceiling)', e['reference']))
  if 'baseline' in e:
    rows.append(row('baseline (noisy copies)', e['baseline']))
  for name, d in (e.get('settings') or {}).items():
    rows.append(row(name + (' *' if name == e.get('headline_setting') else ''), d))
  if e.get('nefgpt_reported'):
    rows.append(row('NeF-GPT (reported)', e['nefgpt_reported']))
  return Table(rows, ['set'] + list(EVAL_COLUMNS),
               title='eval/summary.json (* = headline setting; docs/evaluate.md explains the metrics)')


def layout_table(layout: Sequence[dict]) -> Table:
  return Table([{'name': e['name'], 'shape': list(e['shape']), 'offset': e['offset'], 'size': e['size']}
                for e in layout], ['name', 'shape', 'offset', 'size'], title='fields/meta.json layout')


# ---------------------------------------------------------------------------------------------
# Sampling with chosen controls.


@dataclasses.dataclass
class Samples:
  tokens: np.ndarray    # int32 [N, tokens_per_field] generated weight tokens
  weights: np.ndarray   # float32 [N, P] decoded weights (layout of fields/meta.json)
  images: np.ndarray    # float32 [N, H, W] rendered
  labels: np.ndarray    # int32 [N] conditioning class
  settings: dict        # temperature, top_k, top_p, seed


class Sampler:
  """New fields from a trained workdir (transformer checkpoint + tokenizer), any class and setting.

  Loads with the sample stage's loader (`nfjax.sampling.load_generator`: the params-only Orbax loader
  and the saved tokenizer) and draws with its jitted KV-cache sampler (`nfjax.sampling`).
  Temperature, top-k and top-p are per-row inputs of the compiled function, so changing them
  does not recompile; a new number of samples does (once).
  """

  def __init__(self, workdir: str, step: int | None = None, use_cache: bool = True, device=None):
    """device: where the model lives and samples (default: the default backend's first device;
    `jax.devices('cpu')[0]` keeps it on the host, e.g. beside a busy GPU)."""
    self.workdir = workdir
    self.model, self.tokens, self.tokenizer, self.meta = sampling.load_generator(workdir, step, device=device)
    fmeta = files.read_json(wd.path(workdir, wd.FIELDS, 'meta.json'))
    self.spec = mlp.FieldSpec.from_dict(fmeta['field'])
    self.shape = tuple(fmeta['image_shape'])
    self.vocab = self.tokens.vocab
    self.prefix = self.tokens.prefix_len
    self.num_new = self.tokens.seq_len - self.prefix
    self.num_classes = self.tokens.num_label_classes
    # only codes in weight slots (the model's vocabulary: + the null class of classifier-free guidance)
    self._allowed = sampling.code_mask(self.vocab, self.num_new, self.model.cfg.vocab_size)
    self._generate = sampling.make_generate(self.model, self.num_new, use_cache=use_cache)
    self._support = None   # sampling.training_support, made on the first sample(support='training')

  @property
  def step(self) -> int | None:
    return self.meta.get('step')

  def prompt(self, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Prompts for classes `labels` (with prototype conditions: one of each class's prototypes, seeded)."""
    return sampling.prompts(self.vocab, self.tokens.conditions_for(labels, seed), self.prefix)

  def sample(self, classes: int | Sequence[int] | None = 0, num: int = 10, temperature: float = 0.8,
             top_k: int = 3, top_p: float = 1.0, seed: int = 0, support: str = 'all') -> Samples:
    """`num` samples of each class in `classes` (an int, a list, or None = every class).

    temperature 0 = greedy; top_k 0 = off; top_p 1 = off (as sample.settings); support 'training'
    limits every slot to the codes its class's (prototype's) training sequences use there (sample.support).
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or num < 1:
      raise ValueError("need num >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    if support not in ('all', 'training'):
      raise ValueError(f"support must be 'all' or 'training', not {support!r}")
    if classes is None:
      classes = self.tokens.label_classes().tolist()
    classes = [int(c) for c in np.atleast_1d(classes)]
    bad = [c for c in classes if not 0 <= c < self.num_classes]
    if bad:
      raise ValueError(f"classes {bad} out of range: the model knows {self.num_classes} classes")
    labels = np.repeat(np.asarray(classes, np.int32), num)
    b = len(labels)
    conditions = self.tokens.conditions_for(labels, seed)
    allowed, rows = self._allowed, {}
    if support == 'training':
      if self._support is None:
        self._support = jnp.asarray(sampling.training_support(self.tokens, self.num_new, self.model.cfg.vocab_size))
      allowed = self._support
      rows = {'allowed_rows': jnp.asarray(sampling.support_rows(allowed, conditions))}
    toks = np.asarray(self._generate(
        jnp.asarray(sampling.prompts(self.vocab, conditions, self.prefix)), sampling.sample_keys(int(seed), 0, np.arange(b)),
        jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32),
        jnp.full((b,), top_p, jnp.float32), allowed, **rows))
    weights = self.tokenizer.decode(toks, self.vocab).astype(np.float32)
    images = mlp.render_weights(self.spec, np.nan_to_num(weights), *self.shape)
    return Samples(tokens=toks, weights=weights, images=images, labels=labels,
                   settings=dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                                 support=support))


def has_widgets() -> bool:
  return importlib.util.find_spec('ipywidgets') is not None


def sampler_widget(sampler: Sampler, num: int = 10):
  """Sliders for class, temperature, top-k, top-p and seed and a Sample button (ipywidgets).

  Returns the widget box, or None (with a note) when ipywidgets is not installed: it is never
  required; set the parameters of `Sampler.sample` in a cell instead.
  """
  if not has_widgets():
    print("ipywidgets is not installed: change CLASS / TEMPERATURE / TOP_K / TOP_P in the cell above instead.")
    return None
  import ipywidgets as w
  cls = w.Dropdown(options=[('all', -1)] + [(str(c), c) for c in range(sampler.num_classes)], value=-1,
                   description='class')
  temp = w.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.05, description='temperature')
  top_k = w.IntSlider(value=3, min=0, max=min(64, sampler.vocab.num_codes), description='top-k (0 off)')
  top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description='top-p')
  seed = w.IntText(value=0, description='seed')
  button = w.Button(description='Sample')
  out = w.Output()

  def go(_=None):
    with out:
      out.clear_output(wait=True)
      s = sampler.sample(None if cls.value < 0 else cls.value, num, temp.value, top_k.value, top_p.value, seed.value)
      show_images(s.images, s.labels)

  button.on_click(go)
  box = w.VBox([w.HBox([cls, seed]), temp, top_k, top_p, button, out])
  _display(box)
  return box
