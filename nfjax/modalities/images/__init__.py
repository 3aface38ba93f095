"""The images modality: 2-D fields of grey-level images (MNIST), scored by PSNR.

  data        the offline MNIST subset or TFDS (nfjax/data/images.py); `data.source`, `data.name`, ...
  fit         every field is fitted to its whole pixel grid (encoded once, shared by all fields; a
              random `fit.pixels_per_step` subset per step when > 0); BCE on logits or MSE; quality =
              PSNR of the rendered image (`fit.psnr_floor` flags)
  pictures    fields/reconstructions.png, tokenizer/reconstructions.png, a grid per sampling
              setting and samples/generation.gif (a field appearing weight by weight)
  tokenize    PSNR of the fields as fitted / tokenized / uniform-binned against their images; the
              compensated encoder measures rounding errors on the pixel grid
  evaluate    class consistency and Fréchet distance with nfjax's own classifier, NeF-GPT's SSIM
              MMD / COV / 1-NNA, novelty (nfjax/modalities/images/evaluate.py)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from nfjax import config as config_lib
from nfjax import modalities
from nfjax.data import images as image_data
from nfjax.errors import ConfigError, DataError
from nfjax.fields import mlp
from nfjax.fields.stack import StackFitter
from nfjax.io import fields as field_io
from nfjax.io import files
from nfjax.evaluate.image_metrics import psnr
from nfjax.modalities.base import FitData, Modality, PrototypeSpace, Quality, SampleOutput, prototype_target
from nfjax.modalities.images import evaluate as image_eval
from nfjax.utils import images as img_utils
from nfjax.utils import picks

PSNR = Quality('psnr', 'PSNR', 'psnr_db', 'fit.psnr_floor', ' dB', 2)
# What the labels on the pictures mean, written under them.
FIT_CAPTION = "column labels: the image's class, then the fitted field's PSNR against its image (dB)"
TOKENIZE_CAPTION = ("column labels: class: PSNR of the field > PSNR after tokenization (dB, against the image); "
                    "uniform bins = the weights rounded to uniform bins of the same vocabulary size (a baseline)")
SAMPLE_CAPTION = "rows: the class each sample was conditioned on; one sample per tile"


def psnr_score(spec: mlp.FieldSpec):
  """PSNR of the fitted field's image (sigmoid of logits, or the output) against its pixels."""
  def score(params, feats, target):
    raw = mlp.apply_encoded(spec, params, feats)
    pred = jax.nn.sigmoid(raw) if spec.output_activation == 'none' else mlp.output(spec, raw)
    return mlp.psnr(pred, target, axis=(0, 1))
  return score


class Images(Modality):
  name = 'images'
  quality = PSNR
  fit_keys = ('fit.pixels_per_step', 'fit.psnr_floor')
  evaluate_keys = ('data.source', 'data.name', 'data.split', 'evaluate.num_samples', 'evaluate.num_reference',
                   'evaluate.baseline_noise', 'evaluate.headline_top_k', 'evaluate.headline_temperature', 'evaluate.headline_guidance',
                   'evaluate.num_neighbours', 'evaluate.classifier')
  evaluate_keep = ('classifier',)
  headline_keys = ('class_accuracy',)

  def validate(self, config, stages):
    if stages & {'fit', 'evaluate'}:
      image_data.validate(config)
    if 'fit' in stages:
      config_lib.check_positive(config, 'fit.pixels_per_step', allow_minus_one=True)
      config_lib.get(config, 'fit.psnr_floor')
      spec = mlp.FieldSpec.from_config(config.field)
      if spec.in_dims != 2:
        raise ConfigError(f"config key field.in_dims={spec.in_dims}: image fields take 2-D coordinates")
    if 'evaluate' in stages:
      image_eval.validate(config)

  # -- fit -----------------------------------------------------------------------------------------
  def load(self, config, workdir):
    data = image_data.load(config)
    n = len(data.images)
    if n == 0:
      raise ConfigError("no images to fit: data.num_fields selected 0 images")
    init_index = int(config.fit.shared_init_index)
    if config.fit.init == 'shared' and not 0 <= init_index < n:
      raise ConfigError(f"config key fit.shared_init_index={init_index} is outside the {n} selected images")
    height, width = data.images.shape[1:]
    return FitData(rows=(data.images.reshape(n, height * width, 1),), labels=data.labels,
                   source_index=data.source_index, source=data.source, num_classes=data.num_classes,
                   meta={'image_shape': [height, width]}, description=f"{n} images from {data.source}",
                   handle=data)

  def make_fitter(self, spec, config, mesh, data):
    h, w = data.meta['image_shape']
    return StackFitter(spec, config, mesh, psnr_score(spec), feats=mlp.encode(spec, jnp.asarray(mlp.pixel_centres(h, w))),
                       per_step=int(config.fit.pixels_per_step))

  def fit_pictures(self, stage, config, spec, data, arrays, mesh):
    k = min(int(config.fit.num_reconstructions), len(arrays['weights']))
    if k <= 0:
      return
    labels = arrays['labels']
    idx = picks.per_class(labels, k)
    recon = mlp.render_weights(spec, arrays['weights'][idx], *data.meta['image_shape'])
    cols = [f"{labels[i]} {arrays['quality'][i]:.1f}dB" for i in idx]
    img = img_utils.grid([data.handle.images[idx], recon], row_labels=['original', 'fitted'], col_labels=cols)
    img_utils.save_png(img_utils.captioned(img, 'fitted fields beside their images', FIT_CAPTION),
                       stage.file('reconstructions.png'))
    proto = field_io.prototypes(stage.path)
    if proto is not None:
      self._prototype_picture(stage, config, spec, data, proto)

  def _prototype_picture(self, stage, config, spec, data, proto):
    """fields/prototypes.png: each class's prototype fields (fit.prototypes), one row per class."""
    h, w = data.meta['image_shape']
    fitted_to = {'mean': 'k-means means', 'medoid': 'medoids of the k-means clusters'}[
        prototype_target(config.fit, self.prototype_targets(data))]
    recon = mlp.render_weights(spec, proto['weights'], h, w)
    used = np.bincount(proto['of_field'], minlength=len(recon))
    classes = np.unique(proto['labels'])
    rows = [recon[proto['labels'] == c] for c in classes]
    cells = [[f"{used[i]}" for i in np.nonzero(proto['labels'] == c)[0]] for c in classes]
    img = img_utils.grid(rows, row_labels=[f'class {c}' for c in classes], cell_labels=cells)
    img_utils.save_png(img_utils.captioned(
        img, f"prototype fields: fitted to the {fitted_to} of each class (fit.prototypes)",
        'under each: how many fields start from it'), stage.file('prototypes.png'))

  def prototype_targets(self, data):
    targets = np.asarray(data.rows[0], np.float32)   # [N, pixels, 1]
    n, pixels, out = targets.shape
    return PrototypeSpace(targets.reshape(n, pixels * out), lambda idx: (targets[idx],),
                          lambda means, classes: (np.asarray(means, np.float32).reshape(-1, pixels, out),))

  # -- tokenize ------------------------------------------------------------------------------------
  def compensation_grid(self, meta):
    return tuple(meta['image_shape'])

  def tokenize_quality(self, config, workdir, fields, good, weights, labels, val_rows, stage):
    data = image_data.load(config)
    if len(data.images) != len(fields) or not np.array_equal(data.source_index, fields.source_index):
      raise DataError(f"the images selected by the config ({len(data.images)} from {data.source}) are not the ones "
                      f"the fields in WORKDIR/fields were fitted to ({len(fields)} fields from "
                      f"{fields.meta.get('source')}); run tokenize with the config the fit stage used")
    images = data.images[good]
    spec = mlp.FieldSpec.from_dict(fields.meta['field'])
    h, w = images.shape[1:]
    recon = {k: mlp.render_weights(spec, v, h, w) for k, v in weights.items()}
    q = {k: psnr(v, images) for k, v in recon.items()}
    drop = q['fitted'] - q['tokenized']
    out = {
        'psnr_fields_mean': float(q['fitted'].mean()), 'psnr_tokenized_mean': float(q['tokenized'].mean()),
        'psnr_drop_db': float(drop.mean()), 'psnr_drop_db_p90': float(np.percentile(drop, 90)),
        'psnr_drop_db_max': float(drop.max()),
        'psnr_drop_db_val': float(drop[val_rows].mean()) if len(val_rows) else float('nan'),
        'psnr_tokenized_vs_fields_mean': float(psnr(recon['tokenized'], recon['fitted']).mean()),
        'uniform_psnr_tokenized_mean': float(q['uniform'].mean()),
        'uniform_psnr_drop_db': float((q['fitted'] - q['uniform']).mean()),
    }
    rows = val_rows if len(val_rows) else np.arange(len(good))
    k = min(int(config.tokenize.num_examples), len(rows))
    if k > 0:
      idx = picks.per_class(labels, k, candidates=rows)
      cols = [f"{labels[i]}: {q['fitted'][i]:.1f}>{q['tokenized'][i]:.1f}" for i in idx]
      img = img_utils.grid([images[idx], recon['fitted'][idx], recon['tokenized'][idx], recon['uniform'][idx]],
                           row_labels=['image', 'field', 'tokenized', 'uniform bins'], col_labels=cols, scale=4)
      img_utils.save_png(img_utils.captioned(img, 'fields before and after tokenization (held-out fields)',
                                             TOKENIZE_CAPTION), stage.file('reconstructions.png'))
    text = (f"PSNR {out['psnr_fields_mean']:.2f} -> {out['psnr_tokenized_mean']:.2f} dB (drop "
            f"{out['psnr_drop_db']:.2f} dB; uniform bins: {out['uniform_psnr_drop_db']:.2f} dB)")
    return out, text

  # -- sample / evaluate ---------------------------------------------------------------------------
  def sample_output(self, config, fields, spec):
    return ImageOutput(fields, spec)

  def evaluator(self, config, workdir, fields, mesh):
    return image_eval.ImageEvaluator(config, workdir, fields, mesh)


class ImageOutput(SampleOutput):
  """A PNG grid of renders per setting; a GIF of one field being generated."""

  picture = 'generation.gif'

  def __init__(self, fields, spec):
    self.spec, self.shape = spec, tuple(fields.meta['image_shape'])

  def write(self, directory, weights, labels, num_classes, setting=None):
    imgs = mlp.render_weights(self.spec, np.nan_to_num(weights), *self.shape)
    rows = picks.class_rows(labels, num_classes, 10)
    img = img_utils.grid([imgs[idx] for _, idx in rows], row_labels=[f"class {c}" for c, _ in rows])
    img_utils.save_png(img_utils.captioned(img, img_utils.setting_title(setting or {}), SAMPLE_CAPTION),
                       files.join(directory, 'grid.png'))

  def animate(self, stage, settings, decode, fields, prefix, frames: int = 40):
    """The first sample of the first setting appearing weight by weight (not-yet-generated weights
    = the shared init, or the mean field when there is none)."""
    toks = files.read_npy(stage.file(settings[0]['name'], 'tokens.npy'))[0, prefix:]
    full = decode(toks[None])[0]
    start = fields.shared_init if fields.shared_init is not None else np.asarray(fields.weights).mean(0)
    p = len(full)
    cuts = np.unique(np.linspace(0, p, frames).astype(int))
    partial = np.stack([np.concatenate([full[:k], start[k:]]) for k in cuts])
    imgs = img_utils.to_uint8(mlp.render_weights(self.spec, partial, *self.shape))
    pil = [Image.fromarray(im).resize((168, 168), Image.NEAREST) for im in imgs]
    pil += [pil[-1]] * 10  # hold the finished field
    files.write_gif(stage.file(self.picture), pil)


modalities.register(Images())
