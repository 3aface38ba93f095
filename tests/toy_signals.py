"""A third modality defined entirely in the tests: 1-D signals (sums of two sines) as neural fields.

It proves the plug-in seam: registering `Signals` makes the whole pipeline -- fit, tokenize,
train, sample, evaluate -- run on signals without a line of any stage module changed. Each signal
is sampled at K points in [-0.5, 0.5]; a tiny MLP (t -> sin/cos features -> 16 -> 1) is fitted to
it with MSE; quality is -10 log10(MSE) in dB; pictures are curves; the evaluation measures MMD and
coverage of the L2 distance between rendered curves, plus novelty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfjax import config as config_lib
from nfjax import modalities
from nfjax.configs import common
from nfjax.errors import ConfigError
from nfjax.evaluate import novelty
from nfjax.evaluate.protocol import Evaluator
from nfjax.fields import mlp
from nfjax.fields.stack import StackFitter
from nfjax.io import files
from nfjax.modalities.base import FitData, Modality, Quality, SampleOutput

NUM_POINTS = 64
SNR = Quality('snr', 'SNR', 'snr_db', 'fit.snr_floor', ' dB', 2)


def positions() -> np.ndarray:
  return (np.arange(NUM_POINTS, dtype=np.float32) + 0.5) / NUM_POINTS - 0.5


def make_signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n signals [n, K] in [-1, 1]; class 0 slow (1-2 cycles), class 1 fast (3-4 cycles)."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % 2).astype(np.int32)
  t = positions()[None]
  f1 = 1.0 + 2.0 * labels[:, None] + rng.random((n, 1))
  f2 = f1 * 0.5
  ph = rng.random((n, 2)) * 2 * np.pi
  x = 0.6 * np.sin(2 * np.pi * f1 * t + ph[:, :1]) + 0.3 * np.sin(2 * np.pi * f2 * t + ph[:, 1:])
  return x.astype(np.float32), labels


def render(spec, weights: np.ndarray) -> np.ndarray:
  """Weights [n, P] -> curves [n, K] (NaN rows stay NaN)."""
  feats = mlp.encode(spec, jnp.asarray(positions()[:, None]))
  fn = jax.jit(jax.vmap(lambda p: mlp.output(spec, mlp.apply_encoded(spec, p, feats))[:, 0]))
  return np.asarray(fn(mlp.unflatten(spec, jnp.asarray(np.asarray(weights, np.float32)))))


def snr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  return -10.0 * np.log10(np.maximum(np.mean((np.asarray(pred, np.float64) - target) ** 2, axis=-1), 1e-12))


def curves_png(path: str, rows: list[tuple[str, np.ndarray]]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(rows), 1, figsize=(5, 1.6 * len(rows)), squeeze=False)
  for ax, (title, curves) in zip(axes[:, 0], rows):
    for c in curves:
      ax.plot(positions(), c, lw=0.8)
    ax.set_title(title, fontsize=8)
  files.write_figure(path, fig)


class Signals(Modality):
  name = 'signals'
  quality = SNR
  fit_keys = ('fit.snr_floor',)
  evaluate_keys = ('evaluate',)
  headline_keys = ('mmd',)

  def validate(self, config, stages):
    if 'fit' in stages:
      spec = mlp.FieldSpec.from_config(config.field)
      if spec.in_dims != 1 or spec.out_dims != 1:
        raise ConfigError("config key field.in_dims / out_dims: signal fields map t -> x (1 -> 1)")
      config_lib.check_positive(config, 'data.num_fields')
      config_lib.get(config, 'fit.snr_floor')

  def load(self, config, workdir):
    x, labels = make_signals(int(config.data.num_fields), int(config.seed))
    return FitData(rows=(x[..., None],), labels=labels, source_index=np.arange(len(x)), source='toy:sines',
                   num_classes=2, meta={'num_points': NUM_POINTS}, description=f"{len(x)} toy signals",
                   handle=x)

  def make_fitter(self, spec, config, mesh, data):
    feats = mlp.encode(spec, jnp.asarray(positions()[:, None]))

    def score(params, f, target):
      pred = mlp.output(spec, mlp.apply_encoded(spec, params, f))
      return -10.0 * jnp.log10(jnp.maximum(jnp.mean((pred - target) ** 2), 1e-12))
    return StackFitter(spec, config, mesh, score, feats=feats)

  def fit_pictures(self, stage, config, spec, data, arrays, mesh):
    curves_png(stage.file('signals.png'), [('signals', data.handle[:4]), ('fitted', render(spec, arrays['weights'][:4]))])

  def tokenize_quality(self, config, workdir, fields, good, weights, labels, val_rows, stage):
    x, _ = make_signals(len(fields), int(config.seed))
    spec = mlp.FieldSpec.from_dict(fields.meta['field'])
    q = {k: snr(render(spec, w), x[good]) for k, w in weights.items()}
    out = {'snr_fields_mean': float(q['fitted'].mean()), 'snr_tokenized_mean': float(q['tokenized'].mean())}
    return out, f"SNR {out['snr_fields_mean']:.2f} -> {out['snr_tokenized_mean']:.2f} dB"

  def sample_output(self, config, fields, spec):
    return CurveOutput(spec)

  def evaluator(self, config, workdir, fields, mesh):
    return CurveEvaluator(fields)


class CurveOutput(SampleOutput):
  def __init__(self, spec):
    self.spec = spec

  def write(self, directory, weights, labels, num_classes, setting=None):
    curves = render(self.spec, np.nan_to_num(weights))
    curves_png(files.join(directory, 'grid.png'),
               [(f'class {c}', curves[labels == c][:4]) for c in range(num_classes)])


class CurveEvaluator(Evaluator):
  """MMD / COV of curve L2 distances against the references, novelty vs training curves."""

  data_distance = 'nn_curve_l2'

  def __init__(self, fields):
    self.spec = mlp.FieldSpec.from_dict(fields.meta['field'])

  def load(self, fields, good):
    self.weights = np.asarray(fields.weights[good], np.float32)
    self.curves = render(self.spec, self.weights)
    return {}

  def references(self, ref_pos):
    self.ref = self.curves[ref_pos]

  def candidates(self, weights):
    return render(self.spec, np.nan_to_num(weights))

  def ceiling(self, held_pos, pool):
    cands = self.curves[held_pos]
    result, ps = self.measure('reference', cands, None, self.weights[held_pos], pool)
    return result, ps, cands

  def measure(self, name, candidates, labels, weights, pool):
    d = np.sqrt(((candidates[:, None] - self.ref[None]) ** 2).sum(-1))
    nn_d, _ = novelty.nearest(candidates, self.curves[pool])
    nn_w, _ = novelty.nearest(weights, self.weights[pool])
    result = {'mmd': float(d.min(1).mean()), 'cov': float(len(np.unique(d.argmin(1))) / len(self.ref)),
              'nn_weight_l2_median': float(np.median(nn_w)), 'num_evaluated': int(len(candidates))}
    return result, {'nn_curve_l2': nn_d, 'nn_weight_l2': nn_w}

  def headline(self, result):
    return {'mmd': result['mmd'], 'cov': result['cov']}

  def done(self, head, result, reference, baseline):
    return f"MMD {result['mmd']:.3f} (ceiling {reference['mmd']:.3f}, baseline {baseline['mmd']:.3f})"


def get_config() -> ml_collections.ConfigDict:
  """A smoke pipeline config for signals, built on the shared sections like configs/mnist.py."""
  c = common.get_config('smoke', modality='signals')
  c.data.source = 'toy'
  c.data.num_fields = 48
  c.field = ml_collections.ConfigDict({
      'in_dims': 1, 'freqs': (1.0, 2.0, 4.0), 'use_pi': True, 'include_input': True, 'hidden': (16,),
      'activation': 'relu', 'siren_w0': 30.0, 'out_dims': 1, 'output_bias': True, 'output_activation': 'none',
      'init': 'torch_default'})
  c.fit.steps = 200
  c.fit.lr = 1e-2
  c.fit.loss = 'mse'
  c.fit.shared_init_steps = 200
  c.fit.shared_init_candidates = 1
  c.fit.refit_below = 0.0
  c.fit.chunk_size = 24
  c.fit.snr_floor = 0.0
  c.tokenize.num_codes = 31
  c.tokenize.encoder = 'nearest'
  c.tokenize.kmeans_restarts = 1
  c.sample.num_samples = 8
  c.sample.batch_size = 8
  c.lock()
  return c


SIGNALS = modalities.register(Signals())
