"""The images modality's metrics inside the evaluation protocol (nfjax/evaluate/protocol.py; docs/evaluate.md).

For every candidate set (each sampling setting, the ceiling, baseline and no-structure rows) it measures
  class consistency   accuracy of nfjax's own MNIST classifier against the conditioning class
  Fréchet distance    of the classifier's penultimate features, generated vs real images
  SSIM MMD/COV/1-NNA  NeF-GPT's metrics (D = (1 - SSIM) / 2) against reconstructions of the
                      reference fields
  novelty             L2 to the nearest training image and to the nearest training weight vector
The ceiling row is the held-out fields' reconstructions; a sample is a "copy" when its render is
as close to a training image as the training fields' own renders are to their images (the
COPY_PERCENTILE of the reconstruction error). The classifier is cached in eval/classifier.
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np

from nfjax import config as cfg_utils
from nfjax.data import images as image_data
from nfjax.errors import ConfigError, DataError
from nfjax.evaluate import classifier as clf_lib
from nfjax.evaluate import image_metrics as im
from nfjax.evaluate import novelty
from nfjax.evaluate.protocol import Evaluator
from nfjax.fields import mlp
from nfjax.io import files
from nfjax.io.workdir import EVAL
from nfjax.utils import images as img_utils
from nfjax.utils import picks
from nfjax.utils.logging import log

STAGE = 'evaluate'
# The evaluation classifier of the offline default (mnist.py's evaluate.classifier, seed 0, all 5,000
# images of data/mnist_5k.npz): `_classifier` uses it instead of training the same one again (~25 s
# of every fresh run on 2 CPU cores), so every machine scores samples with the same classifier.
PACKAGED_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(image_data.__file__)), 'mnist_5k_classifier')
# NeF-GPT's MNIST numbers (nefgpt.md §7.2), for side-by-side reading; their protocol differs.
NEFGPT_REPORTED = {'ssim_mmd': 0.2162, 'ssim_cov': 0.2773, 'ssim_1nna': 0.84,
                   'class_accuracy': 0.984, 'note': 'slides, top-k 3, T 0.8; accuracy from 64 samples '
                   'and a HuggingFace ResNet classifier; SSIM metrics against training reconstructions'}
# A sample is a "copy" when its render is as close to a training image as the training fields'
# own renders are to their images (this percentile of the reconstruction error).
COPY_PERCENTILE = 95


def validate(config) -> None:
  """The images modality's evaluate keys (the frame's keys: nfjax/configs/checks.py)."""
  e = config.evaluate
  cfg_utils.check_positive(config, 'evaluate.ssim_tile')
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


def _real_images(config) -> image_data.ImageSet:
  """Every image of the configured source split (fields index into it with source_index)."""
  full = copy.deepcopy(config)
  full.data.num_fields = -1
  return image_data.load(full)


def _classifier(directory: str, config, real: image_data.ImageSet, num_classes: int) -> clf_lib.Classifier:
  """The evaluation classifier of `config` for `real`: the one cached in `directory` when its
  fingerprint (training config, data source, seed, image and class counts) is this config's, else
  the packaged one when it is (evaluate.classifier.packaged: the offline default's, trained by
  `clf_lib.train` with the same config; tests/test_evaluate.py trains it again and compares), else
  trained here (also where the packaged one is cached, with packaged=False). Either way it ends up
  cached in `directory`."""
  ccfg = config.evaluate.classifier
  seed = int(config.seed)
  n = len(real.images)
  cap = int(ccfg.max_images)
  use = np.arange(n) if cap == -1 or cap >= n else np.sort(np.random.default_rng(seed + 7).permutation(n)[:cap])
  fp = {'classifier': {k: v for k, v in cfg_utils.to_dict(ccfg).items() if k != 'packaged'}, 'source': real.source,
        'seed': seed, 'num_images': int(len(use)), 'num_classes': int(num_classes)}
  meta_path = files.join(directory, 'classifier.json')
  packaged = bool(ccfg.get('packaged', True))
  cached = files.read_json(meta_path) if files.exists(meta_path) else {}
  if cached.get('fingerprint') == fp and (packaged or not cached.get('packaged')):
    clf = clf_lib.Classifier.load(directory)
    log(STAGE, f"classifier: cached in {directory} (held-out accuracy {clf.info['heldout_accuracy']:.4f})")
    return clf
  if packaged and files.read_json(files.join(PACKAGED_CLASSIFIER, 'classifier.json')).get('fingerprint') == fp:
    clf = clf_lib.Classifier.load(PACKAGED_CLASSIFIER)
    clf.info['packaged'] = True   # so that packaged=False trains one here even where this is cached
    clf.save(directory)
    log(STAGE, f"classifier: nfjax's packaged one, trained with this config on {real.source} (held-out accuracy "
               f"{clf.info['heldout_accuracy']:.4f}; --config.evaluate.classifier.packaged=False trains it here) -> {directory}")
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


def _render(spec, weights: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
  """Render rows with finite weights; (images [n, H, W] zero where invalid, valid [n])."""
  valid = np.isfinite(weights).all(1)
  out = np.zeros((len(weights),) + tuple(shape), np.float32)
  if valid.any():
    out[valid] = mlp.render_weights(spec, weights[valid], *shape)
  valid &= np.isfinite(out).all((1, 2))
  out[~valid] = 0.0
  return out, valid


def _measure(ctx, name: str, images: np.ndarray, valid: np.ndarray, labels: np.ndarray,
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


def _neighbours_png(stage, ctx, name, images, labels, per_sample, k):
  if k <= 0:
    return
  show = picks.per_class(labels, k, candidates=np.nonzero(per_sample['valid'])[0], sort=False)
  if len(show) == 0:
    return
  pos = ctx.position  # field id -> position in the good arrays
  img_nn = pos[per_sample['nn_image_field'][show]]
  w_nn = pos[per_sample['nn_weight_field'][show]]
  novelty.neighbours_png(stage.file(f'neighbours_{name}.png'), images[show], labels[show],
                         per_sample['pred'][show], ctx.real[img_nn], per_sample['nn_image_l2'][show],
                         ctx.recon[w_nn], per_sample['nn_weight_l2'][show])


GRID_PER_CLASS = 10   # samples per row of eval/grid_<setting>.png (as samples/<setting>/grid.png)
GRID_LABEL_WIDTH = 100
GRID_CAPTION = ("rows: the class the samples were conditioned on, then the classifier's accuracy on every evaluated "
                f"sample of that class in this setting (correct/total; the first {GRID_PER_CLASS} are shown); red "
                "frame: a sample the classifier puts in another class, with that class in its corner ('x': "
                "non-finite weights, not rendered, counted wrong)")


def row_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> list[tuple[int, int, int]]:
  """(class c, correct, total) for every class c < num_classes that has samples: how many of the samples
  conditioned on c the classifier puts in c (pred -1, a non-finite sample, is wrong). correct / total is
  the setting's class_accuracy_per_class[c]."""
  labels, pred = np.asarray(labels), np.asarray(pred)
  out = []
  for c in range(num_classes):
    m = labels == c
    if m.any():
      out.append((c, int((pred[m] == c).sum()), int(m.sum())))
  return out


def grid_figures(result: dict) -> str:
  """The numbers of a set in words, for a picture's title."""
  n, bad = result['num_samples'], result['num_nonfinite']
  return (f"class consistency {result['class_accuracy']:.3f} over {n} samples"
          + (f" ({bad} non-finite, counted wrong)" if bad else '')
          + f", FD {result['frechet_distance']:.3g}, SSIM MMD {result['ssim_mmd']:.4f} COV {result['ssim_cov']:.3f} "
            f"1-NNA {result['ssim_1nna']:.3f}")


def class_grid(images: np.ndarray, labels: np.ndarray, pred: np.ndarray, num_classes: int, title=(),
               per_class: int = GRID_PER_CLASS, scale: int = 3):
  """The first `per_class` images [n, H, W] of every class, a row per class labelled with the class and
  its `row_accuracy`; misclassified tiles framed in red with the predicted class ('x': pred -1) in their
  corner; `title` above, GRID_CAPTION below. Returns an RGB PIL image."""
  rows = picks.class_rows(labels, num_classes, per_class)
  acc = {c: (k, n) for c, k, n in row_accuracy(labels, pred, num_classes)}
  row_labels = [f"class {c}\n{acc[c][0] / acc[c][1]:.2f} ({acc[c][0]}/{acc[c][1]})" for c, _ in rows]
  img = img_utils.grid([images[idx] for _, idx in rows], row_labels=row_labels, scale=scale,
                       label_width=GRID_LABEL_WIDTH)
  h, w = images.shape[1] * scale, images.shape[2] * scale
  boxes, texts = [], []
  for i, (c, idx) in enumerate(rows):
    for j, k in enumerate(idx):
      if pred[k] != c:
        boxes.append(img_utils.tile_box(i, j, h, w, left=GRID_LABEL_WIDTH))
        texts.append('x' if pred[k] < 0 else str(int(pred[k])))
  return img_utils.captioned(img_utils.mark_tiles(img, boxes, texts), title, GRID_CAPTION)


class _Context:
  """Everything the candidate sets are compared with."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


class ImageEvaluator(Evaluator):
  """Images in the evaluation protocol: renders, the classifier, SSIM matrices, novelty."""

  data_distance = 'nn_image_l2'
  comparison = (('class_accuracy', 'class consistency', '.3f', 'higher'), ('frechet_distance', 'FD', '.3g', 'lower'),
                ('ssim_cov', 'SSIM COV', '.3f', 'higher'))
  coverage = 'ssim_cov'

  def __init__(self, config, workdir: str, fields, mesh):
    self.config, self.fields, self.mesh = config, fields, mesh
    self.directory = files.join(workdir, EVAL, 'classifier')
    self.spec = mlp.FieldSpec.from_dict(fields.meta['field'])
    self.shape = tuple(fields.meta['image_shape'])

  def load(self, fields, good):
    config = self.config
    timings = {}
    t0 = time.perf_counter()
    real_set = _real_images(config)
    if fields.meta.get('source') != real_set.source:
      raise DataError(f"fields/ was fitted on {fields.meta.get('source')!r} but the config's data is "
                      f"{real_set.source!r}: evaluate with the data config the fit stage used")
    self.num_classes = int(fields.meta.get('num_classes') or real_set.num_classes)
    self.clf = _classifier(self.directory, config, real_set, self.num_classes)
    timings['classifier'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.good = good
    self.weights = np.asarray(fields.weights[good], np.float32)
    self.labels = np.asarray(fields.labels[good], np.int32)
    self.real = real_set.images[fields.source_index[good]]
    self.recon = mlp.render_weights(self.spec, self.weights, *self.shape)
    self.recon_err = np.sqrt(((self.recon.astype(np.float64) - self.real) ** 2).sum((1, 2)))
    self.copy_threshold = float(np.percentile(self.recon_err, COPY_PERCENTILE))
    self.position = np.full(len(fields), -1, np.int64)
    self.position[good] = np.arange(len(good))
    timings['render_fields'] = time.perf_counter() - t0
    return timings

  def references(self, ref_pos):
    e = self.config.evaluate
    pairwise = im.PairwiseSSIM(self.shape[0], self.shape[1], tile=int(e.ssim_tile), mesh=self.mesh)
    ref_recon = self.recon[ref_pos]
    self.ref_pos = ref_pos
    self.ctx = _Context(clf=self.clf, pairwise=pairwise, ref_recon=ref_recon, d_rr=pairwise(ref_recon),
                        ref_feats=self.clf.logits_and_features(self.real[ref_pos])[1], real=self.real,
                        recon=self.recon, weights=self.weights, good=self.good, position=self.position,
                        num_classes=self.num_classes, copy_threshold=self.copy_threshold)

  def describe(self):
    return (f"reconstruction error L2 median {np.median(self.recon_err):.3f} (copy threshold p{COPY_PERCENTILE} "
            f"{self.copy_threshold:.3f})")

  def candidates(self, weights):
    return _render(self.spec, weights, self.shape)

  def ceiling(self, held_pos, pool):
    n_held = len(held_pos)
    cands = (self.recon[held_pos], np.ones(n_held, bool))
    result, ps = self.measure('reference (held-out reconstructions)', cands, self.labels[held_pos],
                              self.weights[held_pos], pool)
    held_feats = self.clf.logits_and_features(self.real[held_pos])[1]
    result.update({
        'what': 'reconstructions of held-out training fields vs the reference fields (ceiling)',
        'frechet_distance_real': im.frechet_distance(held_feats, self.ctx.ref_feats),
        'recon_l2_to_source': novelty.stats(self.recon_err),
        'psnr_mean': float(np.nanmean(self.fields.quality[self.good])),
    })
    return result, ps, cands

  def measure(self, name, candidates, labels, weights, pool):
    images, valid = candidates
    return _measure(self.ctx, name, images, valid, labels, weights, pool)

  def baseline_extra(self, field_ids, candidates):
    bimg, _ = candidates
    return {'psnr_to_source_mean': float(np.mean(im.psnr(bimg, self.real[self.position[field_ids]])))}

  def pictures(self, stage, shown, nn_data, nn_weight, k):
    novelty.histogram_png(stage.file('novelty.png'), nn_data, nn_weight, self.recon_err, self.copy_threshold)
    for name, ((images, _), labels, ps) in shown.items():
      _neighbours_png(stage, self.ctx, name, images, labels, ps, k)

  def setting_picture(self, stage, setting, shown, result):
    (images, _), labels, ps = shown
    img = class_grid(images, labels, ps['pred'], self.num_classes,
                     [img_utils.setting_title(setting), grid_figures(result)])
    img_utils.save_png(img, stage.file(f"grid_{setting['name']}.png"))

  def headline(self, h):
    return {k: h[k] for k in ('class_accuracy', 'frechet_distance', 'ssim_mmd', 'ssim_cov', 'ssim_1nna')}

  def summary(self):
    return {'classifier_heldout_accuracy': self.clf.info['heldout_accuracy'],
            'classifier': {k: v for k, v in self.clf.info.items() if k != 'fingerprint'},
            'copy_threshold_l2': self.copy_threshold, 'nefgpt_reported': NEFGPT_REPORTED}

  def notes(self, results, reference, baseline, n_ref, n_gen):
    notes = []
    if n_gen < 1000:
      notes.append(f"{n_gen} samples per setting (< 1,000): FD, COV and 1-NNA are noisy and biased at this "
                   f"size; compare only with rows of the same size")
    if any(r['num_evaluated'] != n_ref for r in results.values()):
      notes.append(f"some settings have a different number of valid samples than references ({n_ref}): "
                   f"COV and 1-NNA depend on both set sizes")
    return notes

  def done(self, head, h, reference, baseline):
    return (f"class acc {h['class_accuracy']:.4f} (ceiling {reference['class_accuracy']:.4f}, baseline "
            f"{baseline['class_accuracy']:.4f}), FD {h['frechet_distance']:.3f} (ceiling "
            f"{reference['frechet_distance']:.3f}), 1-NNA {h['ssim_1nna']:.3f} (ceiling {reference['ssim_1nna']:.3f})")
