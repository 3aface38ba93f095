"""The tokenize stage: WORKDIR/fields -> WORKDIR/tokenizer (the fitted tokenizer) + WORKDIR/tokens.

1. Reads the weight dataset (good fields only: flagged fields never enter the token data).
2. Splits the good fields into train / val per class, seeded by `config.seed` (recorded).
3. Fits the tokenizer (`config.tokenize`, see nfjax/tokenizers/) on the train fields of all classes.
4. Tokenizes every good field once: sequences [SOS, class, t_0 ... t_{T-1}], T = tokens_per_field
   (= P for scalar tokenizers; chunks x quantizers for vector / residual VQ, described in
   tokens/vocab.json).
5. Measures what tokenization costs: weight RMSE, codebook usage and perplexity, and the
   modality's quality of the fields as fitted vs after decode(encode(w)) vs uniform bins with the
   same vocabulary (images: PSNR against the source images and tokenizer/reconstructions.png;
   shapes: held-out IoU); draws tokenizer/histogram.png.

Files (docs/tokenize.md):
  tokenizer/tokenizer.npz   the tokenizer (numpy-readable, nfjax.tokenizers.restore)
  tokenizer/uniform.npz     the uniform-bins baseline with the same vocabulary
  tokenizer/summary.json    headline figures (written after tokens/ is complete except its summary)
  tokens/...                nfjax.io.tokens format; tokens/summary.json is written last
A finished stage (both summaries) with the same config and fields is skipped; a workdir made with
another config is refused and one made from other fields is redone (nfjax/io/workdir.py). The
stage takes seconds, so an interrupted run simply redoes the missing part (a saved tokenizer.npz
is reused).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from nfjax import modalities, tokenizers
from nfjax.configs import checks
from nfjax.errors import ConfigError, DataError
from nfjax.io import fields as field_io
from nfjax.io import files
from nfjax.io import tokens as token_data
from nfjax.io import workdir as wd
from nfjax.utils.logging import log

STAGE = 'tokenize'
# The tokenize.* keys the tokens depend on (num_examples only changes a picture); what they are
# made from is tracked by the fields/ digest (nfjax/io/workdir.py).
KEYS = ('seed',) + tuple(f'tokenize.{k}' for k in (
    'method', 'num_codes', 'residual', 'normalize', 'per_layer', 'chunk', 'chunk_size', 'num_quantizers',
    'kmeans_restarts', 'kmeans_iters', 'kmeans_sample', 'pin_atoms', 'refine_steps', 'refine_lr', 'refine_batch',
    'dead_code_threshold', 'encoder', 'compensate_damp', 'specials', 'class_token', 'val_fraction', 'drop_constant',
    'condition'))
SPLIT_STREAM = 0x70CE
# Headline figures (../DESIGN.md) every tokenize summary has; NaN where the modality measures no PSNR.
HEADLINE_NAN = ('psnr_fields_mean', 'psnr_tokenized_mean', 'psnr_drop_db', 'uniform_psnr_tokenized_mean',
                'uniform_psnr_drop_db')


def use_class_token(config, num_classes: int) -> bool:
  """Whether sequences carry a class token: tokenize.class_token 'yes', 'no', or 'auto' (when the
  fields have more than one class; one class = NeF-GPT's ShapeNet layout [SOS, w...])."""
  mode = str(config.tokenize.get('class_token', 'auto'))
  return mode == 'yes' or (mode == 'auto' and num_classes > 1)


def conditioning(config, fields_dir: str, good: np.ndarray, labels: np.ndarray, num_classes: int
                 ) -> tuple[np.ndarray, int, dict]:
  """What each sequence's conditioning token names (tokenize.condition): its class, or the prototype its
  field started from (fields/prototypes.npz; fit.prototypes). Returns (the index of every good field [n],
  how many, what vocab.json records: nothing for classes, `condition_class` for prototypes)."""
  if condition_of(config) == 'class':
    return labels, num_classes, {}
  proto = field_io.prototypes(fields_dir)
  if proto is None:
    raise ConfigError(f"config key tokenize.condition='prototype' conditions on the prototypes the fields started "
                      f"from, but {fields_dir} has no prototypes.npz (fitted with fit.prototypes=0): re-run the fit "
                      f"stage with fit.prototypes > 0, or set tokenize.condition='class'")
  of_field = np.asarray(proto['of_field'], np.int32)[good]
  condition_class = np.asarray(proto['labels'], np.int32)
  if np.any(condition_class[of_field] != labels):
    raise DataError(f"{fields_dir}/prototypes.npz does not match the fields' classes: re-run the fit stage")
  return of_field, len(condition_class), {'condition': 'prototype',
                                          'condition_class': [int(c) for c in condition_class]}


def condition_of(config) -> str:
  """tokenize.condition ('class'; configs from before the key have none)."""
  return str(config.tokenize.get('condition', 'class'))


def split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-class seeded split of rows 0..N-1 -> (train rows, val rows), each sorted.

  Every class with at least 2 fields puts round(val_fraction * n_c) (at least 1 when
  val_fraction > 0) of them in val, so each class is in both splits."""
  rng = np.random.default_rng([int(seed), SPLIT_STREAM])
  val = []
  for c in np.unique(labels):
    rows = np.nonzero(labels == c)[0]
    if val_fraction <= 0 or len(rows) < 2:
      continue
    k = min(len(rows) - 1, max(1, int(round(val_fraction * len(rows)))))
    val.append(rng.permutation(rows)[:k])
  val = np.sort(np.concatenate(val)) if val else np.zeros((0,), np.int64)
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train.astype(np.int64), val.astype(np.int64)


def _usage(tok: tokenizers.Tokenizer, tokens: np.ndarray) -> tuple[float, float, np.ndarray]:
  """(fraction of codebook entries used, perplexity of the token ids, counts per (group, q, code)) of
  the sequences' weight tokens [N, tokens_per_field]."""
  g = np.broadcast_to(tok.token_groups()[None], tokens.shape)
  q = np.broadcast_to(tok.token_quantizers()[None], tokens.shape)
  counts = np.zeros((tok.num_groups, tok.num_quantizers, tok.num_codes), np.int64)
  np.add.at(counts, (g.ravel(), q.ravel(), tokens.ravel()), 1)
  ids = np.bincount(tokens.ravel(), minlength=tok.num_codes).astype(np.float64)
  p = ids[ids > 0] / ids.sum()
  return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum())), counts


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  checks.validate(config, (STAGE,))
  settings = tokenizers.Settings.from_config(config.tokenize)
  stage = wd.StageDir(workdir, wd.TOKENIZER, config, KEYS, consumes=(wd.FIELDS,), stage=STAGE)
  tstage = wd.StageDir(workdir, wd.TOKENS, config, KEYS, consumes=(wd.FIELDS,), stage=STAGE)
  wd.require(workdir, wd.FIELDS, STAGE)
  done, tdone = stage.finished(), tstage.finished()
  if done is not None and tdone is not None:
    log(STAGE, f"already finished in {stage.path} (vocab {done['vocab_size']}); skipping")
    return done

  fields_dir = wd.path(workdir, wd.FIELDS)
  fields = field_io.load(fields_dir)
  modality = modalities.for_fields(fields, config)
  good = fields.good()
  if len(good) == 0:
    raise DataError(f"every field in {fields_dir} is flagged: nothing to tokenize")
  w = np.asarray(fields.weights[good], np.float32)
  labels = np.asarray(fields.labels[good], np.int32)
  num_classes = int(fields.meta.get('num_classes', int(labels.max()) + 1))
  conditions, num_conditions, condition_meta = conditioning(config, fields_dir, good, labels, num_classes)
  seed = int(config.seed)
  train_rows, val_rows = split(labels, float(config.tokenize.val_fraction), seed)
  log(STAGE, f"{len(good)} good fields ({len(fields) - len(good)} flagged left out), {fields.params_per_field} "
             f"params each; split {len(train_rows)} train / {len(val_rows)} val (seed {seed}); tokenizer "
             f"{settings.method}, {settings.num_codes} codes, residual={settings.residual}, "
             f"normalize={settings.normalize}, per_layer={settings.per_layer}, encoder={settings.encoder}")

  # Fit (or reuse the tokenizer of an interrupted run with the same fingerprint).
  tok_path = stage.file('tokenizer.npz')
  t0 = time.perf_counter()
  fresh = not files.exists(tok_path)
  if fresh:
    tok = tokenizers.fit(settings, w[train_rows], fields.layout, fields.shared_init, seed=seed,
                         field=fields.meta.get('field'), grid=modality.compensation_grid(fields.meta))
  else:
    tok = tokenizers.restore(tok_path)
    log(STAGE, f"reusing {tok_path}")
  fit_seconds = time.perf_counter() - t0
  tok.check_layout(fields.layout, fields.params_per_field, where=fields_dir)

  t0 = time.perf_counter()
  codes = tokenizers.encode_full(tok, w)
  if fresh:
    if bool(config.tokenize.get('drop_constant', False)):
      # Positions with one token in every training field leave the sequences (decoded as that token).
      tok = tok.drop_constant(codes[train_rows])
    tok.save(tok_path)
  codes = tok.select(codes)
  encode_seconds = time.perf_counter() - t0
  dropped = (f"; {tok.num_dropped} of {tok.full_tokens_per_field} positions hold one token in every training "
             f"field and are left out of the sequences (tokenize.drop_constant)" if tok.num_dropped else '')
  log(STAGE, f"fitted the tokenizer in {fit_seconds:.2f}s, tokenized {len(w)} fields in {encode_seconds:.2f}s "
             f"({tok.tokens_per_field} tokens each{dropped})")

  with_class = use_class_token(config, num_classes)
  vocab = tok.vocab(num_conditions if with_class else 0, tuple(config.tokenize.specials))
  prefix = ['sos', 'class'] if with_class else ['sos']
  cols = [np.full((len(w), 1), vocab.sos, np.int32)]
  if with_class:
    cols.append(vocab.class_token(conditions)[:, None].astype(np.int32))
  seqs = np.concatenate([*cols, codes], axis=1)
  wq = tok.decode(codes)

  uni_settings = dataclasses.replace(settings, method='uniform', chunk='scalar', num_quantizers=1,
                                     encoder='nearest', refine_steps=0)
  uniform = tokenizers.fit(uni_settings, w[train_rows], fields.layout, fields.shared_init, seed=seed)
  uniform.save(stage.file('uniform.npz'))
  wu = uniform.quantize(w)

  usage, perplexity, counts = _usage(tok, codes)
  rmse = lambda a, rows=slice(None): float(np.sqrt(np.mean((a[rows].astype(np.float64) - w[rows]) ** 2)))
  summary = {
      'method': settings.method, 'vocab_size': vocab.vocab_size, 'codebook_size': tok.num_codes,
      'num_codes': tok.num_codes, 'num_codebooks': tok.num_groups * tok.num_quantizers,
      'specials': list(vocab.specials), 'num_classes': num_classes, 'tokens_per_field': tok.tokens_per_field,
      **({'dropped_constant': tok.num_dropped} if tok.keep is not None else {}),
      **({'condition': 'prototype', 'num_conditions': num_conditions} if condition_meta else {}),
      'seq_len': int(seqs.shape[1]), 'residual': settings.residual, 'normalize': settings.normalize,
      'per_layer': settings.per_layer, 'encoder': settings.encoder,
      'num_fields': int(len(w)), 'num_flagged_excluded': int(len(fields) - len(good)),
      'num_train': int(len(train_rows)), 'num_val': int(len(val_rows)), 'split_seed': seed,
      'weight_rmse': rmse(wq), 'weight_rmse_val': rmse(wq, val_rows) if len(val_rows) else float('nan'),
      'uniform_weight_rmse': rmse(wu), 'codebook_usage': usage, 'perplexity': perplexity,
      'fit_seconds': fit_seconds, 'encode_seconds': encode_seconds,
      'tokenize_seconds': fit_seconds + encode_seconds,
      **{k: float('nan') for k in HEADLINE_NAN},
  }
  measured, quality_text = modality.tokenize_quality(config, workdir, fields, good,
                                                     {'fitted': w, 'tokenized': wq, 'uniform': wu}, labels, val_rows,
                                                     stage)
  summary.update(measured)
  _histogram_png(stage, tok, w[train_rows], counts)

  token_data.write(tstage.path, seqs, field_index=good, labels=labels, train_idx=train_rows, val_idx=val_rows,
                   vocab=vocab, prefix_len=len(prefix),
                   extra_meta={**tok.sequence_meta(), **condition_meta, 'prefix': prefix, 'split_seed': seed,
                               'val_fraction': float(config.tokenize.val_fraction),
                               'tokenizer': f'../{wd.TOKENIZER}/tokenizer.npz'})
  summary['seconds'] = time.perf_counter() - t_start
  summary['info'] = {'fit': tok.meta.get('fit_info', {}).get('refine', {}), 'kmeans_seconds':
                     tok.meta.get('fit_info', {}).get('kmeans_seconds')}
  stage.write_summary(summary)
  tstage.write_summary({'num_sequences': int(len(seqs)), 'seq_len': int(seqs.shape[1]), 'prefix_len': len(prefix),
                        'vocab_size': vocab.vocab_size, 'num_train': int(len(train_rows)),
                        'num_val': int(len(val_rows)), 'split_seed': seed, 'tokenizer': settings.method})
  log(STAGE, f"done: vocab {vocab.vocab_size} ({tok.num_codes} codes + {len(vocab.specials)} specials + "
             f"{vocab.num_classes} {'prototype' if condition_meta else 'class'} tokens), weight RMSE {summary['weight_rmse']:.4f}"
             + (f", {quality_text}" if quality_text else '') + f", usage {usage:.0%}, perplexity {perplexity:.1f}, "
             f"{summary['seconds']:.1f}s -> {stage.path}, {tstage.path}")
  return summary


def _histogram_png(stage, tok: tokenizers.Tokenizer, w_train: np.ndarray, counts: np.ndarray) -> None:
  """Histogram of the coded values (coding space) of each codebook with its codes marked."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  groups = list(range(min(tok.num_groups, 4)))
  fig, axes = plt.subplots(len(groups) + 1, 1, figsize=(10, 2.6 * (len(groups) + 1)))
  z = tok.chunking.gather(tok.to_code_space(w_train))
  space = {'none': 'w' if not tok.meta.get('residual') else 'w - w_init',
           'slot': '(w - mean) / std per slot'}[tok.meta.get('normalize', 'none')]
  for ax, g in zip(axes, groups):
    sel = tok.chunking.group == g
    width = int((tok.chunking.index[np.nonzero(sel)[0][0]] >= 0).sum())
    vals = z[:, sel, :width].ravel()
    code_vals = tok.codebooks[g, 0, :, :width].ravel()
    lo, hi = np.percentile(vals, [0.05, 99.95]) if len(vals) else (0.0, 1.0)
    lo, hi = min(lo, np.percentile(code_vals, 1)), max(hi, np.percentile(code_vals, 99))
    ax.hist(np.clip(vals, lo, hi), bins=400, range=(lo, hi), color='0.35', log=True)
    for c in code_vals:
      if lo <= c <= hi:
        ax.axvline(c, color='tab:red', lw=0.4, alpha=0.6)
    ax.set_title(f"codebook {tok.chunking.group_names[g]!r}: {len(vals):,} coded values ({space}; "
                 f"{'stage-1 code coordinates' if width > 1 or tok.num_quantizers > 1 else 'codes'} in red)",
                 fontsize=9)
    ax.tick_params(labelsize=8)
  ax = axes[-1]
  c = np.sort(counts.reshape(-1))[::-1]
  ax.bar(np.arange(len(c)), c, width=1.0, color='tab:blue')
  ax.set_yscale('log')
  ax.set_title(f"code usage over all fields, sorted ({int((c > 0).sum())}/{len(c)} codebook entries used)", fontsize=9)
  ax.tick_params(labelsize=8)
  fig.tight_layout()
  files.write_figure(stage.file('histogram.png'), fig)
