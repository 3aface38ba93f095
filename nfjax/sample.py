"""The sample stage: trained GPT + tokenizer -> WORKDIR/samples (new fields, rendered).

For every setting of the grid `sample.settings` ((top_k, temperature, top_p) triples; NeF-GPT's
grid is top-k {3, 5} x T {0.8, 1.0}) it generates `sample.num_samples` sequences conditioned on
[SOS, class] (classes cycle 0, 1, 2, ...), with the jitted KV-cache sampler of nfjax/sampling.py:
all settings share one compiled program (settings are per-row arrays), per-sample keys make a
sample independent of its batch, and special tokens are masked wherever a weight comes next.

Tokens and weights are the same for every kind of field; how samples are shown depends on
fields/meta.json's `kind` (`_ImageOutput`, `_ShapeOutput`).

WORKDIR/samples/:
  settings.json                 {"settings": [{name, top_k, temperature, top_p}, ...]}
  <name>/tokens.npy             int32 [S, L]   full sequences (prompt + generated)
  <name>/weights.npy            float32 [S, P] decoded weight vectors (layout of fields/meta.json)
  <name>/labels.npy             int32 [S]      conditioning class
  <name>/grid.png               rendered samples, one row per class
  generation.gif                images: one field being generated weight by weight
  summary.json                  num_samples, tokens_per_sec, seconds, settings (written last)
shape fields (kind 'shape') also write, per setting, at `sample.mesh_resolution` and the fields'
surface level (fields/meta.json `surface`):
  <name>/meshes.npz             every sample's marching-cubes mesh (nfjax.evaluate.samples.pack_meshes
                                layout; sample.meshes_npz), reused by the evaluate stage
  <name>/meshes/sample_XXXXX.ply  the first sample.mesh_files meshes
  <name>/meshes.json            num_empty (meshes that do not cross the level), faces, seconds
  turntable.gif                 the first non-empty sample (settings in order), turning
and summary.json holds `num_empty` {setting: count}.
Finished settings are written atomically and skipped on resume.
"""

from __future__ import annotations

import io as _io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from nfjax import sampling
from nfjax.data import tokens as tok_data
from nfjax.data import weights as wds
from nfjax.errors import ConfigError, NfjaxError
from nfjax.fields import mlp
from nfjax.utils import config as cfg_utils
from nfjax.utils import images as img_utils
from nfjax.utils import io
from nfjax.utils.logging import Progress, log
from nfjax.utils.stage import StageDir

STAGE = 'sample'
DIRNAME = 'samples'
FINGERPRINT_KEYS = ('seed', 'sample')


def validate(config) -> None:
  cfg_utils.check_positive(config, 'sample.num_samples')
  cfg_utils.check_positive(config, 'sample.batch_size')
  if config.data.get('kind', 'image') == 'shape':
    if int(cfg_utils.check_positive(config, 'sample.mesh_resolution')) < 2:
      raise ConfigError(f"config key sample.mesh_resolution={config.sample.mesh_resolution} must be >= 2")
    cfg_utils.check_positive(config, 'sample.mesh_files', allow_zero=True)
    cfg_utils.get(config, 'sample.meshes_npz')
  settings = cfg_utils.get(config, 'sample.settings')
  if not settings:
    raise ConfigError("config key sample.settings is empty: give (top_k, temperature, top_p) triples")
  for s in settings:
    if len(s) != 3:
      raise ConfigError(f"config key sample.settings: {s!r} is not a (top_k, temperature, top_p) triple")
    k, t, p = s
    if int(k) < 0 or float(t) < 0 or not 0 < float(p) <= 1:
      raise ConfigError(f"config key sample.settings: {s!r} needs top_k >= 0, temperature >= 0, 0 < top_p <= 1")


def setting_name(top_k: int, temperature: float, top_p: float) -> str:
  name = f"topk{int(top_k)}_t{float(temperature):g}"
  return name + (f"_p{float(top_p):g}" if float(top_p) < 1.0 else '')


def _inputs_digest(workdir: str) -> dict:
  out = {}
  for d in ('tokenizer', 'transformer'):
    p = os.path.join(workdir, d, 'summary.json')
    if not os.path.exists(p):
      raise NfjaxError(f"{os.path.join(workdir, d)} is not finished: run the "
                       f"{'tokenize' if d == 'tokenizer' else 'train'} stage first")
    with open(p) as f:
      out[d] = f.read()
  import hashlib
  return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in out.items()}


def load_generator(workdir: str):
  """(model, vocab, token meta, tokenizer, field dataset meta/spec) for a finished workdir."""
  from nfjax import checkpoint, tokenizers
  tokens = tok_data.load(os.path.join(workdir, 'tokens'))
  mdef, params, meta = checkpoint.load_model(os.path.join(workdir, 'transformer', 'checkpoints'))
  model = mdef.bind(params)
  tokenizer = tokenizers.restore(os.path.join(workdir, 'tokenizer'))
  if tokenizer.tokens_per_field != tokens.tokens_per_field:
    raise NfjaxError(f"the tokenizer in {workdir}/tokenizer makes {tokenizer.tokens_per_field} tokens per field but "
                     f"{workdir}/tokens has {tokens.tokens_per_field}: re-run the tokenize stage")
  return model, tokens, tokenizer, meta


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  validate(config)
  stage = StageDir(workdir, DIRNAME, config, FINGERPRINT_KEYS)
  digest = _inputs_digest(workdir)
  done = stage.finished()
  inputs_path = stage.file('inputs.json')
  if os.path.exists(inputs_path) and io.read_json(inputs_path) != digest:
    log(STAGE, "the tokenizer or transformer changed since these samples were drawn: sampling again")
    for name in os.listdir(stage.path):
      if name not in ('fingerprint.json',):
        p = stage.file(name)
        if os.path.isdir(p):
          import shutil
          shutil.rmtree(p)
        else:
          os.unlink(p)
    done = None
  io.write_json(inputs_path, digest)
  if done is not None:
    log(STAGE, f"already finished in {stage.path} ({done['num_samples']} samples); skipping")
    return done

  model, tokens, tokenizer, _ = load_generator(workdir)
  fields = wds.load(os.path.join(workdir, 'fields'), mmap=True)
  spec = mlp.FieldSpec.from_dict(fields.meta['field'])
  output = _output(config, fields, spec)
  vocab = tokens.vocab
  prefix, seq_len = tokens.prefix_len, tokens.seq_len
  num_new = seq_len - prefix
  block = model.cfg.block_size
  if seq_len - 1 > block:
    raise NfjaxError(f"the model's context ({block}) is shorter than the token sequences need ({seq_len - 1})")
  num_classes = max(1, vocab.num_classes)
  s = config.sample
  settings = [dict(name=setting_name(*t), top_k=int(t[0]), temperature=float(t[1]), top_p=float(t[2]))
              for t in s.settings]
  beam = int(s.beam_width)
  if beam > 0:
    settings.append(dict(name=f'beam{beam}', top_k=0, temperature=0.0, top_p=1.0, beam_width=beam))
  if len({x['name'] for x in settings}) != len(settings):
    raise ConfigError("config key sample.settings has duplicate settings")
  io.write_json(stage.file('settings.json'), {'settings': settings})
  n = int(s.num_samples)
  batch = int(s.batch_size)
  allowed = np.zeros((num_new, vocab.vocab_size), bool)
  allowed[:, :vocab.num_codes] = True
  allowed = jnp.asarray(allowed)
  gen = sampling.make_generate(model, num_new, use_cache=bool(s.use_cache))

  log(STAGE, f"{len(settings)} setting(s) x {n} samples, {num_new} tokens each, batch {batch}, "
             f"{'KV cache' if s.use_cache else 'no cache'}")
  todo = [(i, st) for i, st in enumerate(settings) if not os.path.exists(stage.file(st['name'], 'weights.npy'))]
  if beam > 0 and todo and 'beam_width' in todo[-1][1]:
    _beam_setting(stage, todo.pop()[1], model, vocab, prefix, num_new, num_classes, allowed, tokenizer, output)
  progress = Progress(STAGE, len(todo) * n, 'samples')
  gen_tokens, gen_seconds = 0, 0.0
  compiled = None
  for si, st in todo:
    labels = (np.arange(n) % num_classes).astype(np.int32)
    out = np.zeros((n, seq_len), np.int32)
    for lo in range(0, n, batch):
      hi = min(n, lo + batch)
      ids = np.arange(lo, lo + batch)
      lab = labels[np.minimum(ids, n - 1)]
      prompt = _prompt(vocab, lab, prefix)
      args = (jnp.asarray(prompt), sampling.sample_keys(int(config.seed), si, ids),
              jnp.full((batch,), st['temperature'], jnp.float32), jnp.full((batch,), st['top_k'], jnp.int32),
              jnp.full((batch,), st['top_p'], jnp.float32), allowed)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = gen.compile(*args)   # one executable for every setting and batch
        log(STAGE, f"compiled the sampler in {time.perf_counter() - t0:.1f}s")
        progress.start()
      t0 = time.perf_counter()
      new = np.asarray(compiled(*args))
      gen_seconds += time.perf_counter() - t0
      gen_tokens += (hi - lo) * num_new
      out[lo:hi, :prefix] = prompt[:hi - lo]
      out[lo:hi, prefix:] = new[:hi - lo]
      progress.update(progress.done + hi - lo, st['name'])
    weights = tokenizer.decode(out[:, prefix:], vocab)
    _write_setting(stage, st, out, weights, labels, output, num_classes)
  if not os.path.exists(stage.file(output.picture)) and settings:
    output.animate(stage, settings, tokenizer, fields, prefix)
  summary = {
      'num_samples': n * (len(settings) - (beam > 0)) + (num_classes if beam > 0 else 0),
      'samples_per_setting': n,
      'tokens_per_sec': gen_tokens / gen_seconds if gen_seconds else float('nan'),
      'seconds': time.perf_counter() - t_start, 'settings': settings, 'use_cache': bool(s.use_cache),
      'tokens_per_sample': num_new, 'device_kind': jax.devices()[0].device_kind,
      **output.summary(stage, settings),
  }
  stage.write_summary(summary)
  log(STAGE, f"done: {summary['num_samples']} samples, {summary['tokens_per_sec']:.0f} tokens/s -> {stage.path}")
  return summary


def _beam_setting(stage, st, model, vocab, prefix, num_new, num_classes, allowed, tokenizer, output):
  """Beam search: the most likely field of each class (deterministic: one sample per class)."""
  t0 = time.perf_counter()
  labels = np.arange(num_classes, dtype=np.int32)
  prompt = _prompt(vocab, labels, prefix)
  toks, logp = sampling.make_beam_search(model, int(st['beam_width']), num_new)(jnp.asarray(prompt), allowed)
  out = np.concatenate([prompt, np.asarray(toks)], 1)
  _write_setting(stage, st, out, tokenizer.decode(out[:, prefix:], vocab), labels, output, num_classes)
  log(STAGE, f"beam search (width {st['beam_width']}): {num_classes} fields in {time.perf_counter() - t0:.1f}s, "
             f"mean log-prob {float(np.mean(np.asarray(logp))):.1f}")


def _prompt(vocab: tok_data.Vocab, labels: np.ndarray, prefix: int) -> np.ndarray:
  cols = [np.full(len(labels), vocab.sos)]
  if prefix >= 2:
    cols.append(vocab.class_token(labels) if vocab.num_classes else np.full(len(labels), vocab.sos))
  if prefix > 2:
    raise NfjaxError(f"prompts of {prefix} tokens are not supported (expected [SOS] or [SOS, class])")
  return np.stack(cols[:prefix], 1).astype(np.int32)


def _write_setting(stage, st, tokens, weights, labels, output, num_classes) -> None:
  d = stage.file(st['name'])
  os.makedirs(d, exist_ok=True)
  io.write_npy(os.path.join(d, 'tokens.npy'), tokens)
  io.write_npy(os.path.join(d, 'labels.npy'), labels)
  output.write(d, weights, labels, num_classes)
  io.write_npy(os.path.join(d, 'weights.npy'), weights.astype(np.float32))  # last: marks the setting done


def _output(config, fields, spec):
  """How samples of this field dataset are shown (dispatch on fields/meta.json's `kind`)."""
  kind = fields.meta.get('kind', 'image')
  if kind == 'shape':
    return _ShapeOutput(config, fields, spec)
  if kind != 'image':
    raise NfjaxError(f"fields/meta.json has kind={kind!r}; the sample stage knows 'image' and 'shape'")
  return _ImageOutput(fields, spec)


def _class_rows(labels: np.ndarray, num_classes: int, per_class: int) -> list[tuple[int, np.ndarray]]:
  """(class, the first per_class sample indices of that class) for every class that has samples."""
  rows = []
  for c in range(num_classes):
    idx = np.nonzero(labels == c)[0][:per_class]
    if len(idx):
      rows.append((c, idx))
  return rows


class _ImageOutput:
  """Image fields: a PNG grid of renders per setting; a GIF of one field being generated."""

  picture = 'generation.gif'

  def __init__(self, fields, spec):
    self.spec, self.shape = spec, tuple(fields.meta['image_shape'])

  def write(self, d, weights, labels, num_classes) -> None:
    imgs = mlp.render_weights(self.spec, np.nan_to_num(weights), *self.shape)
    rows = _class_rows(labels, num_classes, per_class=10)
    img_utils.save_png(img_utils.grid([imgs[idx] for _, idx in rows], row_labels=[f"class {c}" for c, _ in rows]),
                       os.path.join(d, 'grid.png'))

  def summary(self, stage, settings) -> dict:
    return {}

  def animate(self, stage, settings, tokenizer, fields, prefix, frames: int = 40) -> None:
    """The first sample of the first setting appearing weight by weight (not-yet-generated weights
    = the shared init, or the mean field when there is none)."""
    st = settings[0]
    toks = np.load(stage.file(st['name'], 'tokens.npy'))[0, prefix:]
    full = tokenizer.decode(toks[None])[0]
    start = fields.shared_init if fields.shared_init is not None else np.asarray(fields.weights).mean(0)
    p = len(full)
    cuts = np.unique(np.linspace(0, p, frames).astype(int))
    partial = np.stack([np.concatenate([full[:k], start[k:]]) for k in cuts])
    imgs = img_utils.to_uint8(mlp.render_weights(self.spec, partial, *self.shape))
    pil = [Image.fromarray(im).resize((168, 168), Image.NEAREST) for im in imgs]
    pil += [pil[-1]] * 10  # hold the finished field
    buf = _io.BytesIO()
    pil[0].save(buf, format='GIF', save_all=True, append_images=pil[1:], duration=80, loop=0)
    io.write_bytes(stage.file(self.picture), buf.getvalue())


class _ShapeOutput:
  """Shape fields: every sample meshed at sample.mesh_resolution at the fields' surface level;
  meshes.npz (all), PLY files (the first sample.mesh_files), a grid PNG (rows = classes),
  meshes.json (empty meshes counted); a turntable GIF of one sample."""

  picture = 'turntable.gif'
  PER_CLASS = 8

  def __init__(self, config, fields, spec):
    surface = fields.meta.get('surface')
    if not surface or surface.get('inside') not in ('above', 'below'):
      raise NfjaxError("fields/meta.json of a shape dataset has no valid 'surface' {level, inside}: "
                       "re-run the fit stage")
    self.spec = spec
    self.level, self.inside = float(surface['level']), str(surface['inside'])
    self.resolution = int(config.sample.mesh_resolution)
    self.num_files = int(config.sample.mesh_files)
    self.npz = bool(config.sample.meshes_npz)
    self.class_names = list(fields.meta.get('class_names') or [])

  def _mesh(self, weights):
    from nfjax.fields import meshing
    w = np.asarray(weights, np.float32)
    # Non-finite weights (a failed decode) mesh as empty: marching cubes counts NaN as outside.
    return meshing.mesh_fields(self.spec, w, self.resolution, self.level, self.inside)

  def _name(self, c: int) -> str:
    return str(self.class_names[c]) if c < len(self.class_names) else f"class {c}"

  def write(self, d, weights, labels, num_classes) -> None:
    from nfjax.evaluate import samples as samples_lib
    from nfjax.fields import meshing
    from nfjax.utils import render3d
    t0 = time.perf_counter()
    meshes = self._mesh(weights)
    seconds = time.perf_counter() - t0
    empty = [len(f) == 0 for _, f in meshes]
    if self.npz:
      io.write_npz(os.path.join(d, 'meshes.npz'), **samples_lib.pack_meshes(
          meshes, resolution=self.resolution, level=self.level, inside=self.inside))
    for i, (v, f) in enumerate(meshes[:self.num_files]):
      meshing.write_ply(os.path.join(d, 'meshes', f'sample_{i:05d}.ply'), v, f)
    rows = _class_rows(labels, num_classes, self.PER_CLASS)
    render3d.mesh_grid_png(os.path.join(d, 'grid.png'), [[meshes[i] for i in idx] for _, idx in rows],
                           row_labels=[self._name(c) for c, _ in rows], size=96)
    faces = np.array([len(f) for _, f in meshes if len(f)], np.float64)
    io.write_json(os.path.join(d, 'meshes.json'), {
        'num_meshes': len(meshes), 'num_empty': int(sum(empty)), 'resolution': self.resolution,
        'level': self.level, 'inside': self.inside, 'faces_mean': float(faces.mean()) if len(faces) else 0.0,
        'meshing_seconds': seconds, 'ply_files': min(self.num_files, len(meshes)), 'npz': self.npz})
    log(STAGE, f"{os.path.basename(d)}: meshed {len(meshes)} samples at {self.resolution}^3 in {seconds:.1f}s, "
               f"{sum(empty)} empty")

  def summary(self, stage, settings) -> dict:
    stats = {st['name']: io.read_json(stage.file(st['name'], 'meshes.json')) for st in settings}
    return {'num_empty': {k: v['num_empty'] for k, v in stats.items()}, 'mesh_resolution': self.resolution,
            'meshing_seconds': float(sum(v['meshing_seconds'] for v in stats.values())),
            'surface': {'level': self.level, 'inside': self.inside}}

  def animate(self, stage, settings, tokenizer, fields, prefix, tries: int = 16) -> None:
    """The first non-empty sample turning once (from meshes.npz, else the first `tries` samples of
    each setting meshed again)."""
    from nfjax.evaluate import samples as samples_lib
    from nfjax.utils import render3d
    del tokenizer, fields, prefix
    for st in settings:
      stored = samples_lib.load_meshes(os.path.dirname(stage.path), st['name'])
      if stored is not None:
        meshes = stored[0]
      else:
        meshes = self._mesh(np.load(stage.file(st['name'], 'weights.npy'))[:tries])
      for i, (v, f) in enumerate(meshes):
        if len(f):
          render3d.turntable_gif(stage.file(self.picture), v, f, frames=24, size=128)
          log(STAGE, f"{self.picture}: sample {i} of {st['name']}")
          return
    log(STAGE, f"{self.picture} not written: no sample of any setting has a non-empty mesh")
