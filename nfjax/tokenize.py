"""The tokenize stage: WORKDIR/fields -> WORKDIR/tokenizer (the fitted tokenizer) + WORKDIR/tokens.

1. Reads the weight dataset (good fields only: flagged fields never enter the token data).
2. Splits the good fields into train / val per class, seeded by `config.seed` (recorded).
3. Fits the tokenizer (`config.tokenize`, see nfjax/tokenizers/) on the train fields of all classes.
4. Tokenizes every good field once: sequences [SOS, class, t_0 ... t_{T-1}], T = tokens_per_field
   (= P for scalar tokenizers; chunks x quantizers for vector / residual VQ, described in
   tokens/vocab.json).
5. Measures what tokenization costs: weight RMSE, PSNR of the fields as fitted vs after
   decode(encode(w)) against the source images, the same for uniform bins with the same
   vocabulary, codebook usage and perplexity; draws tokenizer/reconstructions.png and
   tokenizer/histogram.png.

Files (docs/tokenize.md):
  tokenizer/tokenizer.npz   the tokenizer (numpy-readable, nfjax.tokenizers.restore)
  tokenizer/uniform.npz     the uniform-bins baseline with the same vocabulary
  tokenizer/summary.json    headline figures (written after tokens/ is complete except its summary)
  tokens/...                nfjax.data.tokens format; tokens/summary.json is written last
A finished stage (both summaries) with the same config is skipped; a workdir made with another
config is refused (StageDir). The stage takes seconds, so an interrupted run simply redoes the
missing part (a saved tokenizer.npz is reused).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from nfjax import fit as fit_stage
from nfjax import tokenizers
from nfjax.data import images as image_data
from nfjax.data import tokens as token_data
from nfjax.data import weights as wds
from nfjax.errors import ConfigError, DataError
from nfjax.fields import mlp
from nfjax.utils import config as cfg_utils
from nfjax.utils import images as img_utils
from nfjax.utils.logging import log
from nfjax.utils.stage import StageDir

STAGE = 'tokenize'
CLASS_TOKEN = ('auto', 'yes', 'no')
DIRNAME = 'tokenizer'
TOKENS_DIRNAME = 'tokens'
TOKENIZE_KEYS = ('method', 'num_codes', 'residual', 'normalize', 'per_layer', 'chunk', 'chunk_size',
                 'num_quantizers', 'kmeans_restarts', 'kmeans_iters', 'kmeans_sample', 'pin_atoms', 'refine_steps',
                 'refine_lr', 'refine_batch', 'dead_code_threshold', 'encoder', 'compensate_damp', 'specials',
                 'val_fraction')
# The tokens depend on the fields they were made from: the fit stage's keys are part of the fingerprint.
FINGERPRINT_KEYS = tuple(fit_stage.FINGERPRINT_KEYS) + tuple(f'tokenize.{k}' for k in TOKENIZE_KEYS)


def fingerprint_keys(config) -> tuple[str, ...]:
  """The fit keys of this config's field kind (image or shape) + the tokenize keys."""
  return tuple(fit_stage.fingerprint_keys(config)) + tuple(f'tokenize.{k}' for k in TOKENIZE_KEYS)
SPLIT_STREAM = 0x70CE


def validate(config) -> tokenizers.Settings:
  if 'tokenize' not in config:
    raise ConfigError("the config has no 'tokenize' section (see configs/mnist.py)")
  settings = tokenizers.Settings.from_config(config.tokenize).validate()
  specials = tuple(config.tokenize.specials)
  if 'sos' not in specials:
    raise ConfigError(f"config key tokenize.specials={specials!r} must contain 'sos' (sequences start with it)")
  if len(set(specials)) != len(specials):
    raise ConfigError(f"config key tokenize.specials={specials!r} has duplicates")
  vf = float(config.tokenize.val_fraction)
  if not 0.0 <= vf < 1.0:
    raise ConfigError(f"config key tokenize.val_fraction={vf!r} must be in [0, 1)")
  cfg_utils.check_positive(config, 'tokenize.num_examples', allow_zero=True)
  cfg_utils.check_choice(config, 'tokenize.class_token', CLASS_TOKEN)
  return settings


def use_class_token(config, num_classes: int) -> bool:
  """Whether sequences carry a class token: tokenize.class_token 'yes', 'no', or 'auto' (when the
  fields have more than one class; one class = NeF-GPT's ShapeNet layout [SOS, w...])."""
  mode = str(config.tokenize.get('class_token', 'auto'))
  return mode == 'yes' or (mode == 'auto' and num_classes > 1)


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


def _load_fields(workdir: str) -> wds.FieldDataset:
  path = os.path.join(workdir, fit_stage.DIRNAME)
  try:
    return wds.load(path)
  except FileNotFoundError as e:
    raise DataError(f"{e} (the tokenize stage reads it: run --stages=fit,tokenize)") from e


def _source_images(config, fields: wds.FieldDataset, rows: np.ndarray) -> np.ndarray | None:
  """The images the fields at `rows` were fitted to, or None for non-image fields."""
  if fields.meta.get('kind') != 'image':
    return None
  data = image_data.load(config)
  if len(data.images) != len(fields) or not np.array_equal(data.source_index, fields.source_index):
    raise DataError(f"the images selected by the config ({len(data.images)} from {data.source}) are not the ones "
                    f"the fields in WORKDIR/fields were fitted to ({len(fields)} fields from "
                    f"{fields.meta.get('source')}); run tokenize with the config the fit stage used")
  return data.images[rows]


def _psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  mse = np.mean((pred.astype(np.float64) - target) ** 2, axis=(1, 2))
  return -10.0 * np.log10(np.maximum(mse, 1e-12))


def _usage(tok: tokenizers.Tokenizer, tokens: np.ndarray) -> tuple[float, float, np.ndarray]:
  """(fraction of codebook entries used, perplexity of the token ids, counts per (group, q, code))."""
  g = np.broadcast_to(tok.token_groups()[None], tokens.shape)
  q = np.broadcast_to(np.tile(np.arange(tok.num_quantizers), tok.chunking.num_chunks)[None], tokens.shape)
  counts = np.zeros((tok.num_groups, tok.num_quantizers, tok.num_codes), np.int64)
  np.add.at(counts, (g.ravel(), q.ravel(), tokens.ravel()), 1)
  ids = np.bincount(tokens.ravel(), minlength=tok.num_codes).astype(np.float64)
  p = ids[ids > 0] / ids.sum()
  return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum())), counts


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  settings = validate(config)
  keys = fingerprint_keys(config)
  stage = StageDir(workdir, DIRNAME, config, keys)
  tstage = StageDir(workdir, TOKENS_DIRNAME, config, keys)
  done, tdone = stage.finished(), tstage.finished()
  if done is not None and tdone is not None:
    log(STAGE, f"already finished in {stage.path} (vocab {done['vocab_size']}, PSNR drop "
               f"{done['psnr_drop_db']:.2f} dB); skipping")
    return done

  fields = _load_fields(workdir)
  good = fields.good()
  if len(good) == 0:
    raise DataError(f"every field in {os.path.join(workdir, fit_stage.DIRNAME)} is flagged: nothing to tokenize")
  w = np.asarray(fields.weights[good], np.float32)
  labels = np.asarray(fields.labels[good], np.int32)
  num_classes = int(fields.meta.get('num_classes', int(labels.max()) + 1))
  seed = int(config.seed)
  train_rows, val_rows = split(labels, float(config.tokenize.val_fraction), seed)
  image_shape = fields.meta.get('image_shape')
  log(STAGE, f"{len(good)} good fields ({len(fields) - len(good)} flagged left out), {fields.params_per_field} "
             f"params each; split {len(train_rows)} train / {len(val_rows)} val (seed {seed}); tokenizer "
             f"{settings.method}, {settings.num_codes} codes, residual={settings.residual}, "
             f"normalize={settings.normalize}, per_layer={settings.per_layer}, encoder={settings.encoder}")

  # Fit (or reuse the tokenizer of an interrupted run with the same fingerprint).
  tok_path = stage.file('tokenizer.npz')
  t0 = time.perf_counter()
  if os.path.exists(tok_path):
    tok = tokenizers.restore(tok_path)
    log(STAGE, f"reusing {tok_path}")
  else:
    tok = tokenizers.fit(settings, w[train_rows], fields.layout, fields.shared_init, seed=seed,
                         field=fields.meta.get('field'), image_shape=image_shape)
    tok.save(tok_path)
  fit_seconds = time.perf_counter() - t0
  tok.check_layout(fields.layout, fields.params_per_field, where=os.path.join(workdir, fit_stage.DIRNAME))

  t0 = time.perf_counter()
  codes = tokenizers.encode(tok, w)
  encode_seconds = time.perf_counter() - t0
  log(STAGE, f"fitted the tokenizer in {fit_seconds:.2f}s, tokenized {len(w)} fields in {encode_seconds:.2f}s "
             f"({tok.tokens_per_field} tokens each)")

  with_class = use_class_token(config, num_classes)
  vocab = tok.vocab(num_classes if with_class else 0, tuple(config.tokenize.specials))
  prefix = ['sos', 'class'] if with_class else ['sos']
  cols = [np.full((len(w), 1), vocab.sos, np.int32)]
  if with_class:
    cols.append(vocab.class_token(labels)[:, None].astype(np.int32))
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
      'seq_len': int(seqs.shape[1]), 'residual': settings.residual, 'normalize': settings.normalize,
      'per_layer': settings.per_layer, 'encoder': settings.encoder,
      'num_fields': int(len(w)), 'num_flagged_excluded': int(len(fields) - len(good)),
      'num_train': int(len(train_rows)), 'num_val': int(len(val_rows)), 'split_seed': seed,
      'weight_rmse': rmse(wq), 'weight_rmse_val': rmse(wq, val_rows) if len(val_rows) else float('nan'),
      'uniform_weight_rmse': rmse(wu), 'codebook_usage': usage, 'perplexity': perplexity,
      'fit_seconds': fit_seconds, 'encode_seconds': encode_seconds,
      'tokenize_seconds': fit_seconds + encode_seconds,
  }

  images = _source_images(config, fields, good)
  recon = {}
  if images is not None:
    spec = mlp.FieldSpec.from_dict(fields.meta['field'])
    h, wd = images.shape[1:]
    recon = {'fitted': mlp.render_weights(spec, w, h, wd), 'tokenized': mlp.render_weights(spec, wq, h, wd),
             'uniform': mlp.render_weights(spec, wu, h, wd)}
    psnr = {k: _psnr(v, images) for k, v in recon.items()}
    drop = psnr['fitted'] - psnr['tokenized']
    summary.update({
        'psnr_fields_mean': float(psnr['fitted'].mean()), 'psnr_tokenized_mean': float(psnr['tokenized'].mean()),
        'psnr_drop_db': float(drop.mean()), 'psnr_drop_db_p90': float(np.percentile(drop, 90)),
        'psnr_drop_db_max': float(drop.max()),
        'psnr_drop_db_val': float(drop[val_rows].mean()) if len(val_rows) else float('nan'),
        'psnr_tokenized_vs_fields_mean': float(_psnr(recon['tokenized'], recon['fitted']).mean()),
        'uniform_psnr_tokenized_mean': float(psnr['uniform'].mean()),
        'uniform_psnr_drop_db': float((psnr['fitted'] - psnr['uniform']).mean()),
    })
    _reconstructions_png(stage, config, images, recon, psnr, labels, val_rows if len(val_rows) else train_rows)
  elif fields.meta.get('kind') == 'shape':
    from nfjax import fit_shapes
    iou = fit_shapes.heldout_iou(config, workdir, fields.meta, {'fitted': w, 'tokenized': wq, 'uniform': wu}, good)
    summary.update({
        'iou_fields_mean': float(iou['fitted'].mean()), 'iou_tokenized_mean': float(iou['tokenized'].mean()),
        'iou_drop': float((iou['fitted'] - iou['tokenized']).mean()),
        'uniform_iou_tokenized_mean': float(iou['uniform'].mean()),
        'uniform_iou_drop': float((iou['fitted'] - iou['uniform']).mean()),
    })
    summary.update({k: float('nan') for k in ('psnr_fields_mean', 'psnr_tokenized_mean', 'psnr_drop_db',
                                              'uniform_psnr_tokenized_mean', 'uniform_psnr_drop_db')})
  else:
    summary.update({k: float('nan') for k in ('psnr_fields_mean', 'psnr_tokenized_mean', 'psnr_drop_db',
                                              'uniform_psnr_tokenized_mean', 'uniform_psnr_drop_db')})
  _histogram_png(stage, tok, w[train_rows], counts)

  token_data.write(tstage.path, seqs, field_index=good, labels=labels, train_idx=train_rows, val_idx=val_rows,
                   vocab=vocab, prefix_len=len(prefix),
                   extra_meta={**tok.sequence_meta(), 'prefix': prefix, 'split_seed': seed,
                               'val_fraction': float(config.tokenize.val_fraction),
                               'tokenizer': f'../{DIRNAME}/tokenizer.npz'})
  summary['seconds'] = time.perf_counter() - t_start
  summary['info'] = {'fit': tok.meta.get('fit_info', {}).get('refine', {}), 'kmeans_seconds':
                     tok.meta.get('fit_info', {}).get('kmeans_seconds')}
  stage.write_summary(summary)
  tstage.write_summary({'num_sequences': int(len(seqs)), 'seq_len': int(seqs.shape[1]), 'prefix_len': len(prefix),
                        'vocab_size': vocab.vocab_size, 'num_train': int(len(train_rows)),
                        'num_val': int(len(val_rows)), 'split_seed': seed, 'tokenizer': settings.method})
  quality = (f"IoU {summary['iou_fields_mean']:.3f} -> {summary['iou_tokenized_mean']:.3f} (uniform bins: "
             f"{summary['uniform_iou_tokenized_mean']:.3f})" if 'iou_drop' in summary else
             f"PSNR {summary['psnr_fields_mean']:.2f} -> {summary['psnr_tokenized_mean']:.2f} dB (drop "
             f"{summary['psnr_drop_db']:.2f} dB; uniform bins: {summary['uniform_psnr_drop_db']:.2f} dB)")
  log(STAGE, f"done: vocab {vocab.vocab_size} ({tok.num_codes} codes + {len(vocab.specials)} specials + "
             f"{vocab.num_classes} class tokens), weight RMSE {summary['weight_rmse']:.4f}, {quality}, usage {usage:.0%}, perplexity {perplexity:.1f}, "
             f"{summary['seconds']:.1f}s -> {stage.path}, {tstage.path}")
  return summary


def _reconstructions_png(stage, config, images, recon, psnr, labels, rows) -> None:
  k = min(int(config.tokenize.num_examples), len(rows))
  if k <= 0:
    return
  per_class = [list(rows[labels[rows] == c]) for c in np.unique(labels[rows])]
  pick = []
  while len(pick) < k and any(per_class):
    for lst in per_class:
      if lst and len(pick) < k:
        pick.append(lst.pop(0))
  idx = np.array(sorted(pick))
  cols = [f"{labels[i]}: {psnr['fitted'][i]:.1f}>{psnr['tokenized'][i]:.1f}" for i in idx]
  img = img_utils.grid([images[idx], recon['fitted'][idx], recon['tokenized'][idx], recon['uniform'][idx]],
                       row_labels=['image', 'field', 'tokenized', 'uniform bins'], col_labels=cols, scale=4)
  img_utils.save_png(img, stage.file('reconstructions.png'))


def _histogram_png(stage, tok: tokenizers.Tokenizer, w_train: np.ndarray, counts: np.ndarray) -> None:
  """Histogram of the coded values (coding space) of each codebook with its codes marked."""
  import io

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from nfjax.utils.io import write_bytes

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
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=90)
  plt.close(fig)
  write_bytes(stage.file('histogram.png'), buf.getvalue())
