"""The sample stage: trained GPT + tokenizer -> WORKDIR/samples (new fields, rendered).

For every setting of the grid `sample.settings` ((top_k, temperature, top_p) triples; NeF-GPT's
grid is top-k {3, 5} x T {0.8, 1.0}) it generates `sample.num_samples` sequences conditioned on
[SOS, class] (classes cycle 0, 1, 2, ...), with the jitted KV-cache sampler of nfjax/sampling.py:
all settings share one compiled program (settings are per-row arrays), per-sample keys make a
sample independent of its batch, and special tokens are masked wherever a weight comes next.

WORKDIR/samples/:
  settings.json                 {"settings": [{name, top_k, temperature, top_p}, ...]}
  <name>/tokens.npy             int32 [S, L]   full sequences (prompt + generated)
  <name>/weights.npy            float32 [S, P] decoded weight vectors (layout of fields/meta.json)
  <name>/labels.npy             int32 [S]      conditioning class
  <name>/grid.png               rendered samples, one row per class
  generation.gif                one field being generated weight by weight
  summary.json                  num_samples, tokens_per_sec, seconds, settings (written last)
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
    _beam_setting(stage, todo.pop()[1], model, vocab, prefix, num_new, num_classes, allowed, tokenizer, spec,
                  fields.meta['image_shape'])
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
    _write_setting(stage, st, out, weights, labels, spec, fields.meta['image_shape'], num_classes)
  if not os.path.exists(stage.file('generation.gif')) and settings:
    _generation_gif(stage, settings[0], tokenizer, spec, fields, prefix)
  summary = {
      'num_samples': n * (len(settings) - (beam > 0)) + (num_classes if beam > 0 else 0),
      'samples_per_setting': n,
      'tokens_per_sec': gen_tokens / gen_seconds if gen_seconds else float('nan'),
      'seconds': time.perf_counter() - t_start, 'settings': settings, 'use_cache': bool(s.use_cache),
      'tokens_per_sample': num_new, 'device_kind': jax.devices()[0].device_kind,
  }
  stage.write_summary(summary)
  log(STAGE, f"done: {summary['num_samples']} samples, {summary['tokens_per_sec']:.0f} tokens/s -> {stage.path}")
  return summary


def _beam_setting(stage, st, model, vocab, prefix, num_new, num_classes, allowed, tokenizer, spec, shape):
  """Beam search: the most likely field of each class (deterministic: one sample per class)."""
  t0 = time.perf_counter()
  labels = np.arange(num_classes, dtype=np.int32)
  prompt = _prompt(vocab, labels, prefix)
  toks, logp = sampling.make_beam_search(model, int(st['beam_width']), num_new)(jnp.asarray(prompt), allowed)
  out = np.concatenate([prompt, np.asarray(toks)], 1)
  _write_setting(stage, st, out, tokenizer.decode(out[:, prefix:], vocab), labels, spec, shape, num_classes)
  log(STAGE, f"beam search (width {st['beam_width']}): {num_classes} fields in {time.perf_counter() - t0:.1f}s, "
             f"mean log-prob {float(np.mean(np.asarray(logp))):.1f}")


def _prompt(vocab: tok_data.Vocab, labels: np.ndarray, prefix: int) -> np.ndarray:
  cols = [np.full(len(labels), vocab.sos)]
  if prefix >= 2:
    cols.append(vocab.class_token(labels) if vocab.num_classes else np.full(len(labels), vocab.sos))
  if prefix > 2:
    raise NfjaxError(f"prompts of {prefix} tokens are not supported (expected [SOS] or [SOS, class])")
  return np.stack(cols[:prefix], 1).astype(np.int32)


def _write_setting(stage, st, tokens, weights, labels, spec, shape, num_classes) -> None:
  d = stage.file(st['name'])
  os.makedirs(d, exist_ok=True)
  io.write_npy(os.path.join(d, 'tokens.npy'), tokens)
  io.write_npy(os.path.join(d, 'labels.npy'), labels)
  per_class = 10
  rows, names = [], []
  imgs = mlp.render_weights(spec, np.nan_to_num(weights), *shape)
  for c in range(num_classes):
    idx = np.nonzero(labels == c)[0][:per_class]
    if len(idx):
      rows.append(imgs[idx])
      names.append(f"class {c}")
  img_utils.save_png(img_utils.grid(rows, row_labels=names), os.path.join(d, 'grid.png'))
  io.write_npy(os.path.join(d, 'weights.npy'), weights.astype(np.float32))  # last: marks the setting done


def _generation_gif(stage, st, tokenizer, spec, fields, prefix, frames: int = 40) -> None:
  """The first sample of a setting appearing weight by weight (not-yet-generated weights = the
  shared init, or the mean field when there is none)."""
  toks = np.load(stage.file(st['name'], 'tokens.npy'))[0, prefix:]
  full = tokenizer.decode(toks[None])[0]
  start = fields.shared_init if fields.shared_init is not None else np.asarray(fields.weights).mean(0)
  p = len(full)
  cuts = np.unique(np.linspace(0, p, frames).astype(int))
  partial = np.stack([np.concatenate([full[:k], start[k:]]) for k in cuts])
  imgs = img_utils.to_uint8(mlp.render_weights(spec, partial, *fields.meta['image_shape']))
  pil = [Image.fromarray(im).resize((168, 168), Image.NEAREST) for im in imgs]
  pil += [pil[-1]] * 10  # hold the finished field
  buf = _io.BytesIO()
  pil[0].save(buf, format='GIF', save_all=True, append_images=pil[1:], duration=80, loop=0)
  io.write_bytes(stage.file('generation.gif'), buf.getvalue())
