"""Fitting a tokenizer: settings (from `config.tokenize`) + training weights -> `Tokenizer`.

Methods (all give the same `Tokenizer` object; see codebook.py for the token layout):

  scalar_vq    one token per weight; per codebook group an exact 1-D k-means (k-means++ seeding,
               `kmeans_restarts` restarts, Lloyd to convergence or `kmeans_iters`, dead codes
               re-seeded, point masses pinned), then optional gradient refinement.
  residual_vq  `num_quantizers` tokens per chunk: stage q is k-means on what stages < q left over,
               then all stages are refined jointly by gradient.
  vector_vq    one token per chunk of D weights (e.g. a neuron: chunk='neuron'): vector k-means
               (JAX) + gradient refinement.
  uniform      K equal-width bins over [min, max] of each group (code = bin centre): the naive
               baseline.
  quantile     K equal-mass bins (code = bin mean): every code used equally often.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from nfjax.errors import ConfigError
from nfjax.tokenizers import chunking as chunking_mod
from nfjax.tokenizers import kmeans, kmeans1d, refine
from nfjax.tokenizers.codebook import Tokenizer

METHODS = ('scalar_vq', 'residual_vq', 'vector_vq', 'uniform', 'quantile')
NORMALIZE = ('none', 'slot')
ENCODERS = ('nearest', 'compensated')


@dataclasses.dataclass(frozen=True)
class Settings:
  method: str = 'scalar_vq'
  num_codes: int = 245
  residual: bool = False          # code w - w_init (the fields' shared init) instead of w
  normalize: str = 'none'         # 'slot': per-weight-slot standardisation (mean/std over training fields)
  per_layer: str = 'off'          # off | layer | tensor: one codebook per layer / tensor of the layout
  chunk: str = 'scalar'           # scalar | neuron | fixed
  chunk_size: int = 8             # chunk='fixed': weights per chunk
  num_quantizers: int = 1         # residual_vq: tokens per chunk
  kmeans_restarts: int = 10
  kmeans_iters: int = 100
  kmeans_sample: int = 65536      # vector k-means: rows per restart (a seeded sample)
  pin_atoms: float = 0.01         # scalar k-means: values making up >= this fraction of a group get an exact code
  refine_steps: int = 0           # gradient refinement steps (NNX + optax Adam, minibatches)
  refine_lr: float = 0.1          # Adam learning rate, in units of the typical code spacing (RMS / K^(1/D))
  refine_batch: int = 8192        # rows (chunks) per refinement step
  dead_code_threshold: float = 1.0  # codes used by fewer rows than this (of the fitting data) are re-seeded
  encoder: str = 'nearest'        # nearest | compensated (GPTQ-style, image fields, scalar codebooks)
  compensate_damp: float = 1e-2   # compensated encoder: Hessian damping, relative to its mean diagonal

  @classmethod
  def from_config(cls, cfg) -> 'Settings':
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in cfg:
        kw[f.name] = type(f.default)(cfg[f.name])
    return cls(**kw)

  def validate(self) -> 'Settings':
    def bad(key, msg):
      raise ConfigError(f"config key tokenize.{key}={getattr(self, key)!r} {msg}")
    if self.method not in METHODS:
      bad('method', f"is not one of {METHODS}")
    if self.normalize not in NORMALIZE:
      bad('normalize', f"is not one of {NORMALIZE}")
    if self.encoder not in ENCODERS:
      bad('encoder', f"is not one of {ENCODERS}")
    if self.chunk not in chunking_mod.CHUNKS:
      bad('chunk', f"is not one of {chunking_mod.CHUNKS}")
    if self.per_layer not in chunking_mod.PER_LAYER:
      bad('per_layer', f"is not one of {chunking_mod.PER_LAYER}")
    if self.num_codes < 2:
      bad('num_codes', "must be >= 2")
    for key in ('kmeans_restarts', 'kmeans_iters', 'kmeans_sample', 'refine_batch', 'num_quantizers', 'chunk_size'):
      if getattr(self, key) < 1:
        bad(key, "must be >= 1")
    for key in ('refine_steps', 'pin_atoms', 'dead_code_threshold', 'compensate_damp', 'refine_lr'):
      if getattr(self, key) < 0:
        bad(key, "must be >= 0")
    if self.pin_atoms >= 1:
      bad('pin_atoms', "must be < 1 (a fraction of the values)")
    if self.method in ('scalar_vq', 'uniform', 'quantile') and self.chunk != 'scalar':
      bad('chunk', f"must be 'scalar' for method {self.method!r} (one token per weight); use "
                   f"method='vector_vq' or 'residual_vq' for chunks of weights")
    if self.method in ('scalar_vq', 'vector_vq', 'uniform', 'quantile') and self.num_quantizers != 1:
      bad('num_quantizers', f"must be 1 for method {self.method!r}; use method='residual_vq' for several "
                            f"tokens per chunk")
    if self.encoder == 'compensated' and (self.chunk != 'scalar' or self.num_quantizers != 1):
      bad('encoder', "needs a scalar codebook (chunk='scalar', num_quantizers=1)")
    return self


def _transform(settings: Settings, w: np.ndarray, shared_init: np.ndarray | None):
  """center, scale [P] of the coding space z = (w - center) / scale."""
  p = w.shape[1]
  if settings.residual:
    if shared_init is None:
      raise ConfigError("tokenize.residual=True codes w - w_init, but the fields have no shared init "
                        "(fields/shared_init.npy; fit with fit.init='shared'), set tokenize.residual=False")
    base = np.asarray(shared_init, np.float32).reshape(-1)
    if base.shape != (p,):
      raise ConfigError(f"shared init has {base.size} entries, the fields {p}")
  else:
    base = np.zeros(p, np.float32)
  if settings.normalize == 'none':
    return base, np.ones(p, np.float32)
  r = w.astype(np.float64) - base.astype(np.float64)
  mu, sd = r.mean(0), r.std(0)
  const = ~(sd > 1e-12 * np.maximum(1.0, np.abs(mu)))
  center = (base + mu).astype(np.float32)
  center[const] = w[0, const]  # a constant slot is coded exactly (z = 0)
  scale = np.where(const, 1.0, sd).astype(np.float32)
  return center, scale


def _fit_scalar(values: np.ndarray, settings: Settings, seed: int) -> tuple[np.ndarray, dict]:
  k = settings.num_codes
  data = kmeans1d.Sorted1D.build(values)
  if settings.method == 'uniform':
    return kmeans1d.uniform_codes(data.x, k), {}
  if settings.method == 'quantile':
    return kmeans1d.quantile_codes(data, k), {}
  pinned = kmeans1d.atoms(data.x, settings.pin_atoms, limit=max(1, k // 8), assume_sorted=True)
  res = kmeans1d.kmeans(data, k, restarts=settings.kmeans_restarts, iters=settings.kmeans_iters, seed=seed,
                        pinned=pinned, dead_threshold=settings.dead_code_threshold)
  return res.codes, {'mse': res.sse / data.n, 'restart_mse': [s / data.n for s in res.restarts_sse],
                     'iterations': res.iterations, 'revived': res.revived, 'pinned': list(pinned)}


def fit(settings: Settings, weights: np.ndarray, layout: list[dict], shared_init: np.ndarray | None = None,
        seed: int = 0, field: dict | None = None, grid=None) -> Tokenizer:
  """Fit a tokenizer on training weights [N, P] with this layout. `field` (the FieldSpec dict) and
  `grid` (the (H, W) pixel grid of image fields, `Modality.compensation_grid`) are recorded for the
  compensated encoder."""
  settings.validate()
  t0 = time.perf_counter()
  w = np.asarray(weights, np.float32)
  p = sum(int(e['size']) for e in layout)
  if w.ndim != 2 or w.shape[1] != p:
    raise ConfigError(f"weights of shape {w.shape} do not match the layout ({p} parameters)")
  if len(w) == 0:
    raise ConfigError("no weights to fit a tokenizer on")
  if not np.isfinite(w).all():
    raise ConfigError("cannot fit a tokenizer on non-finite weights (exclude flagged fields)")
  ch = chunking_mod.make(layout, settings.chunk, settings.per_layer, settings.chunk_size)
  center, scale = _transform(settings, w, shared_init)
  z = (w - center) / scale
  x = ch.gather(z)                                              # [N, C, D]
  k, q_count, d = settings.num_codes, settings.num_quantizers, ch.dim
  codebooks = np.zeros((ch.num_groups, q_count, k, d), np.float32)
  frozen = np.zeros((ch.num_groups, q_count, k), bool)
  info: dict = {'groups': {}}
  all_rows, all_groups = [], []
  for g, name in enumerate(ch.group_names):
    sel = np.nonzero(ch.group == g)[0]
    width = int((ch.index[sel[0]] >= 0).sum())
    rows = x[:, sel, :width].reshape(-1, width)
    all_rows.append(x[:, sel].reshape(-1, d))
    all_groups.append(np.full(len(rows), g, np.int32))
    resid = rows.astype(np.float64)
    ginfo = []
    for q in range(q_count):
      gseed = seed * 1000003 + g * 101 + q
      if width == 1:
        codes, qi = _fit_scalar(resid[:, 0], settings, gseed)
        codes = np.asarray(codes, np.float32)[:, None]
      else:
        codes, qi = kmeans.kmeans(resid, k, settings.kmeans_restarts, settings.kmeans_iters, gseed,
                                  settings.kmeans_sample, settings.dead_code_threshold)
      codebooks[g, q, :, :width] = codes
      if width == 1 and qi.get('pinned'):
        frozen[g, q] = np.isin(codes[:, 0], np.asarray(qi['pinned'], np.float32))
      ginfo.append(qi)
      if q + 1 < q_count:
        if width == 1:
          srt = np.sort(codes[:, 0].astype(np.float64))
          pos = np.searchsorted(0.5 * (srt[1:] + srt[:-1]), resid[:, 0])
          resid = resid - srt[pos][:, None]
        else:
          ids = kmeans.assign(resid, codes)
          resid = resid - codes[ids]
    info['groups'][name] = ginfo if q_count > 1 else ginfo[0]
  info['kmeans_seconds'] = time.perf_counter() - t0
  if settings.refine_steps > 0 and settings.method in ('scalar_vq', 'vector_vq', 'residual_vq'):
    t1 = time.perf_counter()
    codebooks, rinfo = refine.refine(codebooks, np.concatenate(all_rows), np.concatenate(all_groups),
                                     settings.refine_steps, settings.refine_lr, settings.refine_batch, seed,
                                     settings.dead_code_threshold, frozen=frozen)
    rinfo['seconds'] = time.perf_counter() - t1
    info['refine'] = rinfo
  info['seconds'] = time.perf_counter() - t0
  meta = {
      'method': settings.method, 'settings': dataclasses.asdict(settings), 'layout': [dict(e) for e in layout],
      'params_per_field': p, 'residual': settings.residual, 'normalize': settings.normalize,
      'per_layer': settings.per_layer, 'chunk_size': settings.chunk_size, 'encoder': settings.encoder,
      'compensate_damp': settings.compensate_damp, 'field': field,
      'image_shape': list(grid) if grid is not None else None,
      'fitted_on_fields': int(len(w)), 'seed': int(seed), 'fit_info': info,
  }
  return Tokenizer(codebooks=codebooks, chunking=ch, center=center, scale=scale, meta=meta)
