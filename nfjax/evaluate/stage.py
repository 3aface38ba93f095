"""The evaluate stage: samples/ + fields/ + real images -> WORKDIR/eval (see docs/evaluate.md).

Shape fields (fields/meta.json `kind: 'shape'`) share the loading, fingerprint and skip logic
below and are measured by nfjax/evaluate/shapes.py (HyperDiffusion's protocol). For image fields:

For every sampling setting in samples/, and for two context sets that make the numbers readable,
it measures
  class consistency   accuracy of nfjax's own MNIST classifier against the conditioning class
  Fréchet distance    of the classifier's penultimate features, generated vs real images
  SSIM MMD/COV/1-NNA  NeF-GPT's metrics (D = (1 - SSIM) / 2) against training reconstructions
  novelty             L2 to the nearest training image and to the nearest training weight vector
The context sets:
  reference  reconstructions of held-out training fields (disjoint from the compared references):
             what a perfect generator of this field dataset would score (the ceiling)
  baseline   training fields + Gaussian noise (evaluate.baseline_noise): a trivial memorizer
All sets are compared with the same seeded reference subset of the training fields, at the same
size, so the numbers of a setting can be read against the two context rows.
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import time

import jax
import numpy as np

from nfjax import sharding
from nfjax.data import images as image_data
from nfjax.data import weights as wds
from nfjax.errors import ConfigError, DataError
from nfjax.evaluate import classifier as clf_lib
from nfjax.evaluate import image_metrics as im
from nfjax.evaluate import novelty
from nfjax.evaluate import samples as samples_lib
from nfjax.fields import mlp
from nfjax.utils import config as cfg_utils
from nfjax.utils import io
from nfjax.utils.logging import log
from nfjax.utils.stage import StageDir

STAGE = 'evaluate'
DIRNAME = 'eval'
# Everything the numbers depend on (evaluate.ssim_tile only changes speed). The fields and samples
# themselves are tracked by a digest of their summaries (`inputs`): new samples are re-evaluated.
FINGERPRINT_KEYS = ('seed', 'data.source', 'data.name', 'data.split', 'evaluate.num_samples',
                    'evaluate.num_reference', 'evaluate.baseline_noise', 'evaluate.headline_top_k',
                    'evaluate.headline_temperature', 'evaluate.num_neighbours', 'evaluate.classifier')
# NeF-GPT's MNIST numbers (nefgpt.md §7.2), for side-by-side reading; their protocol differs.
NEFGPT_REPORTED = {'ssim_mmd': 0.2162, 'ssim_cov': 0.2773, 'ssim_1nna': 0.84,
                   'class_accuracy': 0.984, 'note': 'slides, top-k 3, T 0.8; accuracy from 64 samples '
                   'and a HuggingFace ResNet classifier; SSIM metrics against training reconstructions'}
# A sample is a "copy" when its render is as close to a training image as the training fields'
# own renders are to their images (this percentile of the reconstruction error).
COPY_PERCENTILE = 95


def validate(config) -> None:
  if config.data.get('kind', 'image') == 'shape':
    from nfjax.evaluate import shapes
    shapes.validate(config)
    return
  image_data.validate(config)
  e = config.evaluate
  cfg_utils.check_positive(config, 'evaluate.num_samples', allow_minus_one=True)
  cfg_utils.check_positive(config, 'evaluate.num_reference', allow_minus_one=True)
  cfg_utils.check_positive(config, 'evaluate.baseline_noise', allow_zero=True)
  cfg_utils.check_positive(config, 'evaluate.ssim_tile')
  cfg_utils.check_positive(config, 'evaluate.num_neighbours', allow_zero=True)
  for key in ('epochs', 'batch_size', 'hidden', 'lr'):
    cfg_utils.check_positive(config, f'evaluate.classifier.{key}')
  cfg_utils.check_positive(config, 'evaluate.classifier.weight_decay', allow_zero=True)
  cfg_utils.check_positive(config, 'evaluate.classifier.augment_shift', allow_zero=True)
  cfg_utils.check_positive(config, 'evaluate.classifier.max_images', allow_minus_one=True)
  if not 0.0 < float(e.classifier.heldout_fraction) < 1.0:
    raise ConfigError(f"config key evaluate.classifier.heldout_fraction={e.classifier.heldout_fraction!r} "
                      f"must be in (0, 1)")
  if len(tuple(e.classifier.channels)) != 2 or min(e.classifier.channels) < 1:
    raise ConfigError(f"config key evaluate.classifier.channels={tuple(e.classifier.channels)!r} must be "
                      f"two positive widths")
  sharding.mesh_shape(config.mesh)


def _load_fields(workdir: str) -> wds.FieldDataset:
  path = os.path.join(workdir, 'fields')
  try:
    return wds.load(path)
  except FileNotFoundError as e:
    raise DataError(f"{e}. The evaluate stage compares samples with the fitted fields "
                    f"(--stages=fit,...,evaluate)") from e


def _inputs_digest(workdir: str) -> dict:
  """What the results depend on besides the config: the finished fields and samples."""
  out = {}
  for name, files in (('fields', ('summary.json', 'meta.json')), ('samples', ('summary.json', 'settings.json'))):
    parts = {f: io.read_json(os.path.join(workdir, name, f)) for f in files
             if os.path.exists(os.path.join(workdir, name, f))}
    out[name] = cfg_utils.fingerprint_hash(parts)
  return out


def _real_images(config) -> image_data.ImageSet:
  """Every image of the configured source split (fields index into it with source_index)."""
  full = copy.deepcopy(config)
  full.data.num_fields = -1
  return image_data.load(full)


def _classifier(stage: StageDir, config, real: image_data.ImageSet, num_classes: int) -> clf_lib.Classifier:
  ccfg = config.evaluate.classifier
  seed = int(config.seed)
  n = len(real.images)
  cap = int(ccfg.max_images)
  use = np.arange(n) if cap == -1 or cap >= n else np.sort(np.random.default_rng(seed + 7).permutation(n)[:cap])
  fp = {'classifier': cfg_utils.to_dict(ccfg), 'source': real.source, 'seed': seed, 'num_images': int(len(use)),
        'num_classes': int(num_classes)}
  directory = stage.file('classifier')
  meta_path = os.path.join(directory, 'classifier.json')
  if os.path.exists(meta_path) and io.read_json(meta_path).get('fingerprint') == fp:
    clf = clf_lib.Classifier.load(directory)
    log(STAGE, f"classifier: cached in {directory} (held-out accuracy {clf.info['heldout_accuracy']:.4f})")
    return clf
  log(STAGE, f"classifier: training on {len(use)} real images from {real.source} "
             f"({ccfg.heldout_fraction:.0%} held out), {ccfg.epochs} epochs")
  clf = clf_lib.train(real.images[use], real.labels[use], ccfg, seed, num_classes=num_classes,
                      log_fn=lambda m: log(STAGE, m))
  clf.info['fingerprint'] = fp
  clf.save(directory)
  log(STAGE, f"classifier: held-out accuracy {clf.info['heldout_accuracy']:.4f} on {clf.info['num_heldout']} "
             f"images, trained in {clf.info['train_seconds']:.1f}s -> {directory}")
  return clf


class _Context:
  """Everything the candidate sets are compared with."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _render(spec, weights: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
  """Render rows with finite weights; (images [n, H, W] zero where invalid, valid [n])."""
  valid = np.isfinite(weights).all(1)
  out = np.zeros((len(weights),) + tuple(shape), np.float32)
  if valid.any():
    out[valid] = mlp.render_weights(spec, weights[valid], *shape)
  valid &= np.isfinite(out).all((1, 2))
  out[~valid] = 0.0
  return out, valid


def _measure(ctx: _Context, name: str, images: np.ndarray, valid: np.ndarray, labels: np.ndarray,
             weights: np.ndarray, pool: np.ndarray) -> tuple[dict, dict]:
  """All metrics of one candidate set. pool: positions (in the good-field arrays) it may match."""
  t0 = time.perf_counter()
  n = len(images)
  v = np.nonzero(valid)[0]
  imgs = images[v]
  logits, feats = ctx.clf.logits_and_features(imgs)
  pred_v = logits.argmax(-1).astype(np.int32)
  pred = np.full(n, -1, np.int32)
  pred[v] = pred_v
  correct = pred == labels
  per_class = []
  for c in range(ctx.num_classes):
    m = labels == c
    per_class.append(float(correct[m].mean()) if m.any() else None)  # None: class absent

  d_sr = ctx.pairwise(imgs, ctx.ref_recon)
  d_ss = ctx.pairwise(imgs)
  ssim_metrics = im.set_metrics(d_sr, ctx.d_rr, d_ss)

  nn_img_d, nn_img_i = novelty.nearest(imgs, ctx.real[pool])
  nn_w_d, nn_w_i = novelty.nearest(weights[v], ctx.weights[pool])
  per_sample = {
      'valid': valid, 'pred': pred,
      'nn_image_l2': _scatter(n, v, nn_img_d, np.nan),
      'nn_image_field': _scatter(n, v, ctx.good[pool][nn_img_i] if len(v) else nn_img_i, -1),
      'nn_weight_l2': _scatter(n, v, nn_w_d, np.nan),
      'nn_weight_field': _scatter(n, v, ctx.good[pool][nn_w_i] if len(v) else nn_w_i, -1),
  }
  result = {
      'num_samples': int(n), 'num_nonfinite': int(n - len(v)), 'num_evaluated': int(len(v)),
      'class_accuracy': float(correct.mean()) if n else float('nan'),
      'class_accuracy_valid': float(correct[v].mean()) if len(v) else float('nan'),
      'class_accuracy_per_class': per_class,
      'frechet_distance': im.frechet_distance(feats, ctx.ref_feats),
      **ssim_metrics,
      'novelty': {
          'nn_image_l2': novelty.stats(nn_img_d),
          'nn_weight_l2': novelty.stats(nn_w_d),
          'copy_fraction': float((nn_img_d <= ctx.copy_threshold).mean()) if len(v) else float('nan'),
      },
      'seconds': float(time.perf_counter() - t0),
  }
  log(STAGE, f"{name}: {len(v)}/{n} valid, class acc {result['class_accuracy']:.4f}, FD "
             f"{result['frechet_distance']:.3f}, SSIM MMD {result['ssim_mmd']:.4f} COV {result['ssim_cov']:.3f} "
             f"1-NNA {result['ssim_1nna']:.3f}, nearest image L2 median "
             f"{result['novelty']['nn_image_l2']['median']:.2f} (copies {result['novelty']['copy_fraction']:.1%}) "
             f"[{result['seconds']:.1f}s]")
  return result, per_sample


def _scatter(n, idx, values, fill):
  values = np.asarray(values)
  out = np.full(n, fill, dtype=values.dtype if values.dtype.kind == 'f' else np.int64)
  out[idx] = values
  return out


def _spread_over_classes(labels: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
  order, per_class = [], {}
  for i in candidates:
    per_class.setdefault(int(labels[i]), []).append(int(i))
  lists = [per_class[c] for c in sorted(per_class)]
  while len(order) < k and any(lists):
    for lst in lists:
      if lst and len(order) < k:
        order.append(lst.pop(0))
  return np.array(order, np.int64)


def _neighbours_png(stage, ctx, name, images, labels, per_sample, k):
  if k <= 0:
    return
  show = _spread_over_classes(labels, np.nonzero(per_sample['valid'])[0], k)
  if len(show) == 0:
    return
  pos = ctx.position  # field id -> position in the good arrays
  img_nn = pos[per_sample['nn_image_field'][show]]
  w_nn = pos[per_sample['nn_weight_field'][show]]
  novelty.neighbours_png(stage.file(f'neighbours_{name}.png'), images[show], labels[show],
                         per_sample['pred'][show], ctx.real[img_nn], per_sample['nn_image_l2'][show],
                         ctx.recon[w_nn], per_sample['nn_weight_l2'][show])


def _good_fields(fields: wds.FieldDataset) -> np.ndarray:
  good = fields.good()
  if len(good) < 4:
    raise DataError(f"fields/ has only {len(good)} good fields; the evaluate stage needs at least 4")
  return good


def _load_samples(workdir: str, settings: list[dict], params_per_field: int, cap: int) -> dict:
  """{setting name: (weights [S, P], labels [S])}, the first `cap` samples of each (cap -1: all)."""
  loaded = {}
  for s in settings:
    w, lab = samples_lib.load_setting(workdir, s['name'], params_per_field)
    if cap > 0:
      w, lab = w[:cap], lab[:cap]
    if len(w) == 0:
      raise DataError(f"samples/{s['name']} holds no samples")
    loaded[s['name']] = (w, lab)
  return loaded


def _check_kind(config, fields: wds.FieldDataset) -> str:
  """fields/meta.json's kind ('image' or 'shape'), which must be the config's data.kind."""
  kind = fields.meta.get('kind', 'image')
  wanted = config.data.get('kind', 'image')
  if kind not in ('image', 'shape'):
    raise DataError(f"fields/meta.json has kind={kind!r}; the evaluate stage knows 'image' and 'shape'")
  if kind != wanted:
    example = 'configs/shapes.py' if kind == 'shape' else 'configs/mnist.py'
    raise DataError(f"fields/ holds {kind} fields but the config is for {wanted} fields (data.kind={wanted!r}): "
                    f"evaluate with the config the fit stage used (e.g. {example})")
  return kind


def _resume(stage: StageDir, inputs: dict, headline_keys: tuple[str, ...]) -> dict | None:
  """The finished summary when eval/ holds this config's results for these inputs (skip), else
  None, after clearing the per-sample files and pictures of stale results."""
  done = stage.finished()
  if done is not None and done.get('inputs') == inputs:
    figures = ', '.join(f"{k} {done[k]:.4f}" if isinstance(done.get(k), (int, float)) else f"{k} -"
                        for k in headline_keys)
    log(STAGE, f"already finished in {stage.path} (headline {done.get('headline_setting')}: {figures}); skipping")
    return done
  if done is not None:
    log(STAGE, f"fields/ or samples/ changed since {stage.path} was written; evaluating again")
    shutil.rmtree(stage.file('per_sample'), ignore_errors=True)
    for f in glob.glob(stage.file('neighbours_*.png')):
      os.remove(f)
  return None


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  validate(config)
  fields = _load_fields(workdir)
  kind = _check_kind(config, fields)
  settings = samples_lib.load_settings(workdir)
  inputs = _inputs_digest(workdir)
  if kind == 'shape':
    from nfjax.evaluate import shapes
    stage = StageDir(workdir, DIRNAME, config, shapes.FINGERPRINT_KEYS)
    done = _resume(stage, inputs, shapes.HEADLINE_KEYS)
    if done is not None:
      return done
    return shapes.evaluate(config, workdir, stage, fields, settings, inputs, t_start)
  stage = StageDir(workdir, DIRNAME, config, FINGERPRINT_KEYS)
  done = _resume(stage, inputs, ('class_accuracy',))
  if done is not None:
    return done

  e = config.evaluate
  seed = int(config.seed)
  timings = {}
  spec = mlp.FieldSpec.from_dict(fields.meta['field'])
  shape = tuple(fields.meta['image_shape'])
  good = _good_fields(fields)
  loaded = _load_samples(workdir, settings, fields.params_per_field, int(e.num_samples))

  # --- real images and the classifier ---------------------------------------------------------
  t0 = time.perf_counter()
  real_set = _real_images(config)
  if fields.meta.get('source') != real_set.source:
    raise DataError(f"fields/ was fitted on {fields.meta.get('source')!r} but the config's data is "
                    f"{real_set.source!r}: evaluate with the data config the fit stage used")
  num_classes = int(fields.meta.get('num_classes') or real_set.num_classes)
  clf = _classifier(stage, config, real_set, num_classes)
  timings['classifier'] = time.perf_counter() - t0

  # --- the training fields: reference / held-out split, renders -------------------------------
  t0 = time.perf_counter()
  weights = np.asarray(fields.weights[good], np.float32)
  labels = np.asarray(fields.labels[good], np.int32)
  real = real_set.images[fields.source_index[good]]
  recon = mlp.render_weights(spec, weights, *shape)
  recon_err = np.sqrt(((recon.astype(np.float64) - real) ** 2).sum((1, 2)))
  copy_threshold = float(np.percentile(recon_err, COPY_PERCENTILE))
  position = np.full(len(fields), -1, np.int64)
  position[good] = np.arange(len(good))
  timings['render_fields'] = time.perf_counter() - t0

  n_eval = max(len(w) for w, _ in loaded.values())
  n_ref = int(e.num_reference) if int(e.num_reference) > 0 else n_eval
  n_ref = min(n_ref, len(good) // 2)
  n_held = min(n_eval, len(good) - n_ref)
  perm = np.random.default_rng(seed + 0xE7A1).permutation(len(good))
  ref_pos, held_pos = np.sort(perm[:n_ref]), np.sort(perm[n_ref:n_ref + n_held])
  not_held = np.setdiff1d(np.arange(len(good)), held_pos)

  mesh = sharding.make_mesh(config.mesh)
  pairwise = im.PairwiseSSIM(shape[0], shape[1], tile=int(e.ssim_tile), mesh=mesh)
  t0 = time.perf_counter()
  ref_recon = recon[ref_pos]
  d_rr = pairwise(ref_recon)
  ref_feats = clf.logits_and_features(real[ref_pos])[1]
  timings['reference_matrix'] = time.perf_counter() - t0
  ctx = _Context(clf=clf, pairwise=pairwise, ref_recon=ref_recon, d_rr=d_rr, ref_feats=ref_feats, real=real,
                 recon=recon, weights=weights, good=good, position=position, num_classes=num_classes,
                 copy_threshold=copy_threshold)
  log(STAGE, f"{len(good)} good fields: {n_ref} references, {n_held} held out; {len(settings)} setting(s) of "
             f"up to {n_eval} samples; reconstruction error L2 median {np.median(recon_err):.3f} "
             f"(copy threshold p{COPY_PERCENTILE} {copy_threshold:.3f})")

  all_pool = np.arange(len(good))
  per_sample_files = {}
  nn_pixel, nn_weight = {}, {}
  k_png = int(e.num_neighbours)

  # --- ceiling: held-out reconstructions -------------------------------------------------------
  t0 = time.perf_counter()
  reference, ps = _measure(ctx, 'reference (held-out reconstructions)', recon[held_pos],
                           np.ones(n_held, bool), labels[held_pos], weights[held_pos], not_held)
  held_feats = clf.logits_and_features(real[held_pos])[1]
  reference.update({
      'what': 'reconstructions of held-out training fields vs the reference fields (ceiling)',
      'frechet_distance_real': im.frechet_distance(held_feats, ref_feats),
      'recon_l2_to_source': novelty.stats(recon_err),
      'psnr_mean': float(np.nanmean(fields.quality[good])),
  })
  nn_pixel['held-out fields'], nn_weight['held-out fields'] = ps['nn_image_l2'], ps['nn_weight_l2']
  _neighbours_png(stage, ctx, 'reference', recon[held_pos], labels[held_pos], ps, k_png)
  timings['reference'] = time.perf_counter() - t0

  # --- trivial baseline: noisy copies of training fields --------------------------------------
  t0 = time.perf_counter()
  noise = float(e.baseline_noise)
  bw, blab, bids = samples_lib.perturbed_fields(fields, n_eval, noise, seed + 0xBA5E)
  bimg, bvalid = _render(spec, bw, shape)
  baseline, ps = _measure(ctx, f'baseline (fields + {noise:g} std noise)', bimg, bvalid, blab, bw, all_pool)
  bpos = position[bids]
  bmse = ((bimg.astype(np.float64) - real[bpos]) ** 2).mean((1, 2))
  baseline.update({
      'what': f'training fields + Gaussian noise of {noise:g} x each parameter\'s std (a memorizer)',
      'noise': noise, 'psnr_to_source_mean': float(np.mean(-10 * np.log10(np.maximum(bmse, 1e-12)))),
  })
  nn_pixel['baseline'], nn_weight['baseline'] = ps['nn_image_l2'], ps['nn_weight_l2']
  _neighbours_png(stage, ctx, 'baseline', bimg, blab, ps, k_png)
  timings['baseline'] = time.perf_counter() - t0

  # --- the sampled settings --------------------------------------------------------------------
  results = {}
  for s in settings:
    t0 = time.perf_counter()
    name = s['name']
    w, lab = loaded[name]
    imgs, valid = _render(spec, w, shape)
    res, ps = _measure(ctx, name, imgs, valid, lab, w, all_pool)
    res.update({k: s.get(k) for k in ('top_k', 'temperature', 'top_p')})
    results[name] = res
    nn_pixel[name], nn_weight[name] = ps['nn_image_l2'], ps['nn_weight_l2']
    path = stage.file('per_sample', f'{name}.npz')
    io.write_npz(path, **ps)
    per_sample_files[name] = os.path.relpath(path, stage.path)
    _neighbours_png(stage, ctx, name, imgs, lab, ps, k_png)
    timings[f'setting:{name}'] = time.perf_counter() - t0

  novelty.histogram_png(stage.file('novelty.png'), nn_pixel, nn_weight, recon_err, copy_threshold)

  # --- summary -----------------------------------------------------------------------------------
  head = _headline(settings, e)
  h = results[head]
  notes = []
  if n_eval < 1000:
    notes.append(f"{n_eval} samples per setting (< 1,000): FD, COV and 1-NNA are noisy and biased at this "
                 f"size; compare only with rows of the same size")
  if n_held < n_eval:
    notes.append(f"only {n_held} held-out fields for the reference row (vs {n_eval} samples)")
  sizes = {name: r['num_evaluated'] for name, r in results.items()}
  if any(v != n_ref for v in sizes.values()):
    notes.append(f"some settings have a different number of valid samples than references ({n_ref}): "
                 f"COV and 1-NNA depend on both set sizes")
  summary = {
      'headline_setting': head,
      'class_accuracy': h['class_accuracy'], 'frechet_distance': h['frechet_distance'],
      'ssim_mmd': h['ssim_mmd'], 'ssim_cov': h['ssim_cov'], 'ssim_1nna': h['ssim_1nna'],
      'num_samples': int(n_eval), 'num_reference': int(n_ref), 'num_heldout_fields': int(n_held),
      'num_fields': int(len(good)),
      'classifier_heldout_accuracy': clf.info['heldout_accuracy'],
      'classifier': {k: v for k, v in clf.info.items() if k != 'fingerprint'},
      'settings': results, 'reference': reference, 'baseline': baseline,
      'copy_threshold_l2': copy_threshold, 'nefgpt_reported': NEFGPT_REPORTED,
      'per_sample_files': per_sample_files, 'notes': notes, 'inputs': inputs,
      'timings': {k: float(v) for k, v in timings.items()},
      'seconds': float(time.perf_counter() - t_start),
      'device_kind': jax.devices()[0].device_kind, 'num_devices': int(mesh.size),
  }
  stage.write_summary(summary)
  summary = stage.summary  # as a re-run returns it (JSON types)
  log(STAGE, f"done: {head}: class acc {h['class_accuracy']:.4f} (ceiling {reference['class_accuracy']:.4f}, "
             f"baseline {baseline['class_accuracy']:.4f}), FD {h['frechet_distance']:.3f} (ceiling "
             f"{reference['frechet_distance']:.3f}), 1-NNA {h['ssim_1nna']:.3f} (ceiling {reference['ssim_1nna']:.3f}); "
             f"{summary['seconds']:.1f}s -> {stage.path}")
  return summary


def _headline(settings: list[dict], e) -> str:
  for s in settings:
    try:
      if int(s.get('top_k') or -1) == int(e.headline_top_k) and \
          abs(float(s.get('temperature')) - float(e.headline_temperature)) < 1e-6:
        return s['name']
    except (TypeError, ValueError):
      continue
  return settings[0]['name']
