"""The sample stage: trained GPT + tokenizer -> WORKDIR/samples (new fields, shown by the modality).

For every setting of the grid `sample.settings` ((top_k, temperature, top_p) triples; NeF-GPT's
grid is top-k {3, 5} x T {0.8, 1.0}) it generates `sample.num_samples` sequences conditioned on
[SOS, class] (classes cycle 0, 1, 2, ...; with tokenize.condition='prototype' the prompt names one of the
class's prototypes, drawn seeded with its share of the training fields: `TokenDataset.conditions_for`;
a beam search runs once per prototype), with the jitted KV-cache sampler of nfjax/sampling.py:
all settings share one compiled program (settings are per-row arrays), per-sample keys make a
sample independent of its batch, and special tokens are masked wherever a weight comes next.

Classifier-free guidance: a setting's optional 4th element is its guidance scale g (default 1).
Settings with g != 1 (named with a suffix, topk3_t0.8_g2) run through a second compiled program, the
guided one, shared by all of them: each batch's conditional rows and their [SOS, null class] twins
in one KV cache (nfjax/sampling.py). They need a model trained with train.class_dropout > 0 (its
null class); settings with g = 1 are sampled exactly as without guidance.

Tokens and weights are the same for every modality; how samples are shown is the modality's
(`Modality.sample_output`: image grids and a generation GIF, or meshes, grids and a turntable).

WORKDIR/samples/ (nfjax/io/samples.py):
  settings.json                 {"settings": [{name, top_k, temperature, top_p[, guidance]}, ...]}
                                (guidance only where it is not 1)
  <name>/tokens.npy             int32 [S, L]   full sequences (prompt + generated)
  <name>/weights.npy            float32 [S, P] decoded weight vectors (layout of fields/meta.json)
  <name>/labels.npy             int32 [S]      the class of each sample (conditioning class)
  <name>/...                    the modality's pictures (grid.png, meshes)
  summary.json                  written last: num_samples, tokens_per_sec, seconds, settings, device_kind and
                                device (where the sampler ran: `run(device=)`, default jax.local_devices()[0])
Finished settings are written atomically and skipped on resume; new tokens, tokenizer or
transformer (another digest of their summaries) clear samples/ and sample again.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import modalities, processes, sampling
from nfjax.configs import checks
from nfjax.errors import ConfigError, NfjaxError
from nfjax.fields import mlp
from nfjax.io import fields as field_io
from nfjax.io import samples as sample_io
from nfjax.io import workdir as wd
from nfjax.utils import preemption
from nfjax.utils.logging import Progress, log

STAGE = 'sample'
KEYS = ('seed', 'sample')


def setting_name(top_k: int, temperature: float, top_p: float, guidance: float = 1.0) -> str:
  name = f"topk{int(top_k)}_t{float(temperature):g}"
  name += f"_p{float(top_p):g}" if float(top_p) < 1.0 else ''
  return name + (f"_g{float(guidance):g}" if float(guidance) != 1.0 else '')


def setting_entry(t) -> dict:
  """A sample.settings element (top_k, temperature, top_p[, guidance]) -> its settings.json entry."""
  st = dict(name=setting_name(*t), top_k=int(t[0]), temperature=float(t[1]), top_p=float(t[2]))
  if len(t) > 3 and float(t[3]) != 1.0:
    st['guidance'] = float(t[3])
  return st


def run(config, workdir: str, *, device: jax.Device | None = None) -> dict:
  """The sample stage, computing on `device` (default: the default backend's first device)."""
  t_start = time.perf_counter()
  checks.validate(config, (STAGE,))
  for d in wd.STAGES[STAGE][1]:
    wd.require(workdir, d, STAGE)
  stage = wd.StageDir(workdir, wd.SAMPLES, config, KEYS, consumes=wd.STAGES[STAGE][1], stage=STAGE)
  done = stage.finished()
  if done is not None:
    log(STAGE, f"already finished in {stage.path} ({done['num_samples']} samples); skipping")
    return done

  device = device or jax.local_devices()[0]
  model, tokens, tokenizer, _ = sampling.load_generator(workdir, device=device,
                                                        attention=str(config.model.get('attention', 'auto')))
  fields = field_io.load(wd.path(workdir, wd.FIELDS), mmap=True)
  spec = mlp.FieldSpec.from_dict(fields.meta['field'])
  output = modalities.for_fields(fields, config).sample_output(config, fields, spec)
  vocab = tokens.vocab
  prefix, seq_len = tokens.prefix_len, tokens.seq_len
  num_new = seq_len - prefix
  block = model.cfg.block_size
  if seq_len - 1 > block:
    raise NfjaxError(f"the model's context ({block}) is shorter than the token sequences need ({seq_len - 1})")
  num_classes = tokens.num_label_classes   # with prototype conditions: their classes
  s = config.sample
  settings = [setting_entry(t) for t in s.settings]
  null_class = int(getattr(model.cfg, 'null_class', -1))
  guided = [st['name'] for st in settings if 'guidance' in st]
  if guided and null_class < 0:
    raise ConfigError(f"config key sample.settings: {', '.join(guided)} use classifier-free guidance (a 4th element "
                      f"!= 1), but the model in {workdir}/transformer was trained without a null class: train it "
                      f"with train.class_dropout > 0 (e.g. 0.1), or drop the guidance scales")
  beam = int(s.beam_width)
  if beam > 0:
    settings.append(dict(name=f'beam{beam}', top_k=0, temperature=0.0, top_p=1.0, beam_width=beam))
  if len({x['name'] for x in settings}) != len(settings):
    raise ConfigError("config key sample.settings has duplicate settings")
  n = int(s.num_samples)
  # Every setting's row i asks for the same class (they cycle through the classes with prototypes) and
  # the same conditioning: the class, or one of its prototypes drawn seeded by its training share.
  classes = tokens.label_classes()
  labels = classes[np.arange(n) % len(classes)]
  conditions = tokens.conditions_for(labels, int(config.seed))
  num_conditions = max(1, vocab.num_classes)   # class (or prototype) tokens: one beam-search field each
  batch = int(s.batch_size)
  allowed = sampling.code_mask(vocab, num_new, model.cfg.vocab_size)
  mask, mask_rows = allowed, None   # the code mask, or (support 'training') every row's own table
  support = str(s.support)
  if support == 'training':   # the codes its condition's training sequences hold at each slot
    mask = jnp.asarray(sampling.training_support(tokens, num_new, model.cfg.vocab_size))
    mask_rows = sampling.support_rows(mask, conditions)
    for st in settings:
      if 'beam_width' not in st:   # beam search keeps the code mask alone
        st['support'] = support
  sample_io.write_settings(workdir, settings)
  gen = sampling.make_generate(model, num_new, use_cache=bool(s.use_cache))   # plain and guided programs

  def finish_setting(st, out, labels):   # process 0 alone in a multi-process run (nfjax/processes.py)
    def write():
      weights = tokenizer.decode(out[:, prefix:], vocab)
      output.write(stage.file(st['name']), weights, labels, num_classes, setting=st)
      sample_io.write_setting(workdir, st['name'], out, weights, labels)   # weights last: the setting is done
    processes.on_main(f"sample {st['name']}", write)

  log(STAGE, f"{len(settings)} setting(s) x {n} samples, {num_new} tokens each, batch {batch}, "
             f"{'KV cache' if s.use_cache else 'no cache'}, on {device.device_kind} ({device})"
             + (f" on each of {processes.count()} processes, which share every setting's batches"
                if processes.spread() else ''))
  todo = processes.agree('settings to draw', lambda: [
      (i, st) for i, st in enumerate(settings) if not sample_io.setting_done(workdir, st['name'])])
  if beam > 0 and todo and 'beam_width' in todo[-1][1]:   # the most likely field of each class
    st = todo.pop()[1]
    t0 = time.perf_counter()
    each = np.arange(num_conditions, dtype=np.int32)
    prompt = sampling.prompts(vocab, each, prefix)
    toks, logp = sampling.make_beam_search(model, beam, num_new)(jnp.asarray(prompt), allowed)
    finish_setting(st, np.concatenate([prompt, np.asarray(toks)], 1), tokens.class_of(each))
    log(STAGE, f"beam search (width {beam}): {num_conditions} fields in {time.perf_counter() - t0:.1f}s, "
               f"mean log-prob {float(np.mean(np.asarray(logp))):.1f}")
  progress = Progress(STAGE, len(todo) * n, 'samples')
  gen_tokens, gen_seconds = 0, 0.0
  compiled = {}   # False: the plain program, True: the guided one (settings with guidance != 1)
  for k, (si, st) in enumerate(todo):
    kept = len(settings) - len(todo) + k   # settings finished before this one
    g = st.get('guidance')
    out = np.zeros((n, seq_len), np.int32)
    batches = processes.mine(-(-n // batch))   # round robin over the processes
    rows = np.zeros(n, bool)
    for b, lo in enumerate(range(0, n, batch)):
      if not batches[b]:
        continue
      hi = min(n, lo + batch)
      rows[lo:hi] = True
      ids = np.arange(lo, lo + batch)
      prompt = sampling.prompts(vocab, conditions[np.minimum(ids, n - 1)], prefix)
      args = (jnp.asarray(prompt), sampling.sample_keys(int(config.seed), si, ids),
              jnp.full((batch,), st['temperature'], jnp.float32), jnp.full((batch,), st['top_k'], jnp.int32),
              jnp.full((batch,), st['top_p'], jnp.float32), mask)
      if g is not None:
        args += (jnp.full((batch,), g, jnp.float32), jnp.asarray(sampling.unconditional(prompt, null_class)))
      rows_of = {} if mask_rows is None else {'allowed_rows': jnp.asarray(mask_rows[np.minimum(ids, n - 1)])}
      if (g is not None) not in compiled:
        t0 = time.perf_counter()
        compiled[g is not None] = gen.compile(*args, **rows_of)   # one executable for every setting and batch
        log(STAGE, f"compiled the {'guided ' if g is not None else ''}sampler in {time.perf_counter() - t0:.1f}s")
        if len(compiled) == 1:
          progress.start()
      t0 = time.perf_counter()
      new = np.asarray(compiled[g is not None](*args, **rows_of))
      gen_seconds += time.perf_counter() - t0
      gen_tokens += (hi - lo) * num_new
      out[lo:hi, :prefix] = prompt[:hi - lo]
      out[lo:hi, prefix:] = new[:hi - lo]
      progress.update(min(k * n + hi, progress.done + (hi - lo) * processes.count()), st['name'])
      if hi < n:
        preemption.check(STAGE, f"{kept}/{len(settings)} settings "
                                f"finished and kept; {st['name']} (in progress) is drawn again, identically, on resume")
    finish_setting(st, processes.gather_rows(out, rows), labels)
    if k + 1 < len(todo):
      preemption.check(STAGE, f"{kept + 1}/{len(settings)} settings finished and kept")
  counts = processes.every('sampled', (gen_tokens, gen_seconds))   # every process's share
  gen_tokens, gen_seconds = sum(c[0] for c in counts), max(c[1] for c in counts)

  def finish():
    if output.picture and not stage.exists(output.picture) and settings:
      output.animate(stage, settings, tokenizer.decode, fields, prefix)
    summary = {
        'num_samples': n * (len(settings) - (beam > 0)) + (num_conditions if beam > 0 else 0),
        'samples_per_setting': n,
        'tokens_per_sec': gen_tokens / gen_seconds if gen_seconds else float('nan'),
        'seconds': time.perf_counter() - t_start, 'settings': settings, 'use_cache': bool(s.use_cache),
        'tokens_per_sample': num_new, 'device_kind': device.device_kind, 'device': str(device),
        'num_processes': len(counts), **output.summary(stage, settings),
    }
    stage.write_summary(summary)
    log(STAGE, f"done: {summary['num_samples']} samples, {summary['tokens_per_sec']:.0f} tokens/s -> {stage.path}")
    return summary
  return processes.on_main(STAGE, finish)
