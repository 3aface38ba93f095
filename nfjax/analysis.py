"""Looking inside fitted neural fields: per-tensor views, hidden-neuron permutations, alignment.

An MLP field computes the same function when the neurons of a hidden layer are permuted (rows of
that layer's weight and bias, columns of the next layer's weight). Fields fitted from independent
random inits therefore land in arbitrarily permuted copies of similar solutions, and their weight
vectors are far apart even when their images are alike; a shared init (NeF-GPT's "conditioned"
init, `fit.init='shared'`) keeps every field's neurons in the same order. This module measures that:

  tensors(layout, w)                    {name: [N, *shape]} views of flat weight vectors
  permute_hidden(spec, w, perms)        the same function with its hidden neurons reordered
  preactivations(spec, w, shape)        every hidden neuron's pre-activation over the pixel grid
  neuron_correlation(spec, a, b, shape) [H, H] correlation of two fields' neurons over the pixels
  align(spec, ref, w, shape)            the permutation of w's neurons closest to ref (weight matching)
  pairwise_distances(spec, W, shape)    ||w_i - w_j|| before and after aligning w_j to w_i
  neuron_agreement(spec, W, shape)      how alike neuron i of field a and neuron i of field b are
  symmetry_experiment(config, images)   fit the same images from a shared and from random inits

and draws the figures of colab/fields.ipynb (`plot_*`, matplotlib). Flat vectors follow the weight
dataset's layout (PyTorch state_dict order, `nfjax.fields.mlp`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import sharding
from nfjax.fields import mlp
from nfjax.fields.stack import StackFitter
from nfjax.modalities.images import psnr_score
from nfjax.utils import picks

# ---------------------------------------------------------------------------------------------
# Views of flat weight vectors.


def tensors(layout: Sequence[dict], weights) -> dict[str, np.ndarray]:
  """Flat vectors [N, P] (or [P]) -> {tensor name: [N, *shape] (or [*shape])} in layout order."""
  w = np.asarray(weights)
  lead = w.shape[:-1]
  return {e['name']: w[..., e['offset']:e['offset'] + e['size']].reshape(*lead, *e['shape']) for e in layout}


def num_hidden_layers(spec: mlp.FieldSpec) -> int:
  return len(spec.hidden)


def permute_hidden(spec: mlp.FieldSpec, weights, perms: Sequence[np.ndarray]) -> np.ndarray:
  """Reorder hidden neurons: neuron i of hidden layer l becomes old neuron perms[l][i].

  weights [..., P] -> [..., P]; the fields compute exactly the same functions.
  """
  if len(perms) != num_hidden_layers(spec):
    raise ValueError(f"need one permutation per hidden layer ({num_hidden_layers(spec)}), got {len(perms)}")
  w = np.asarray(weights, np.float32)
  params = mlp.unflatten(spec, w)
  params = [dict(layer) for layer in params]
  for l, p in enumerate(perms):
    p = np.asarray(p)
    if sorted(p.tolist()) != list(range(spec.hidden[l])):
      raise ValueError(f"perms[{l}] is not a permutation of {spec.hidden[l]} neurons")
    params[l]['weight'] = params[l]['weight'][..., p, :]
    params[l]['bias'] = params[l]['bias'][..., p]
    params[l + 1]['weight'] = params[l + 1]['weight'][..., :, p]
  return np.asarray(mlp.flatten(spec, [{k: jnp.asarray(v) for k, v in layer.items()} for layer in params]))


def random_permutations(spec: mlp.FieldSpec, rng: np.random.Generator) -> list[np.ndarray]:
  return [rng.permutation(h) for h in spec.hidden]


def identity_permutations(spec: mlp.FieldSpec) -> list[np.ndarray]:
  return [np.arange(h) for h in spec.hidden]


def invert(perms: Sequence[np.ndarray]) -> list[np.ndarray]:
  return [np.argsort(p) for p in perms]


def preactivations(spec: mlp.FieldSpec, weights, shape: Sequence[int]) -> list[np.ndarray]:
  """Flat vectors [N, P] -> per hidden layer [N, pixels, width]: each neuron's pre-activation
  (W h + b) at every pixel centre. Permuting a field's neurons permutes the last axis."""
  w = np.atleast_2d(np.asarray(weights, np.float32))
  return [np.asarray(z) for z in _preact_fn(spec, tuple(int(s) for s in shape))(jnp.asarray(w))]


_PREACT_CACHE: dict = {}


def _preact_fn(spec, shape):
  key = (spec, shape)
  if key not in _PREACT_CACHE:
    feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(*shape)))

    def one(vec):
      params = mlp.unflatten(spec, vec)
      h, out = feats, []
      for i, layer in enumerate(params[:-1]):
        z = mlp.dense(layer, h)
        out.append(z)
        h = mlp._act(spec, z, first=(i == 0))
      return out

    _PREACT_CACHE[key] = jax.jit(jax.vmap(one))
  return _PREACT_CACHE[key]


def neuron_correlation(spec: mlp.FieldSpec, w_a, w_b, shape: Sequence[int], layer: int = 0) -> np.ndarray:
  """[H, H] Pearson correlation over the pixel grid between neuron i of field a and neuron j of
  field b (pre-activations of hidden layer `layer`). Aligned fields give a strong diagonal."""
  za, zb = (_standardize(preactivations(spec, w, shape)[layer][0]) for w in (w_a, w_b))
  return (za.T @ zb) / za.shape[0]


def _standardize(z: np.ndarray) -> np.ndarray:
  """[pixels, H] -> zero mean, unit variance per neuron (constant neurons stay 0)."""
  z = np.asarray(z, np.float64)
  return (z - z.mean(0)) / (z.std(0) + 1e-8)


# ---------------------------------------------------------------------------------------------
# Alignment.


def _lap_max(score: np.ndarray) -> np.ndarray:
  """perm with perm[i] = column assigned to row i, maximizing sum score[i, perm[i]]."""
  from scipy.optimize import linear_sum_assignment  # scipy: a dependency of jax
  rows, cols = linear_sum_assignment(score, maximize=True)
  out = np.empty(len(rows), np.int64)
  out[rows] = cols
  return out


def align(spec: mlp.FieldSpec, reference, weights, shape: Sequence[int] | None = None,
          method: str = 'weights', max_iters: int = 50) -> tuple[np.ndarray, list[np.ndarray]]:
  """Permute the hidden neurons of `weights` [P] to match `reference` [P].

  method='weights' (the closest weight vector): weight matching (Ainsworth et al., "Git Re-Basin"),
  coordinate ascent of sum_l <W_l^ref, P_l W_l P_{l-1}^T> over one layer's permutation at a time,
  each an exact linear assignment problem, until no layer changes; with `shape` it starts from
  activation matching, otherwise from the identity.
  method='activations' (needs `shape`): each hidden neuron is paired with the reference neuron whose
  pre-activations over the pixel grid correlate best (the assignment maximizing the summed
  correlation, layer by layer; pre-activations do not depend on the other layers' orders). Both recover an exact permuted copy. Returns (aligned weights [P],
  perms) with aligned == permute_hidden(weights, perms).
  """
  if method not in ('weights', 'activations'):
    raise ValueError(f"method must be 'weights' or 'activations', not {method!r}")
  if method == 'activations':
    if shape is None:
      raise ValueError("method='activations' needs the image shape (the pixel grid the neurons are compared on)")
    max_iters = 0
  ref = np.asarray(reference, np.float32)
  w = np.asarray(weights, np.float32)
  if ref.shape != (spec.num_params,) or w.shape != (spec.num_params,):
    raise ValueError(f"align takes two flat vectors of {spec.num_params} weights, got {ref.shape} and {w.shape}")
  L = num_hidden_layers(spec)
  if L == 0:
    return w.copy(), []
  if shape is not None:
    zr, zw = preactivations(spec, ref, shape), preactivations(spec, w, shape)
    perms = []
    for l in range(L):
      a, b = (_standardize(z[l][0]) for z in (zr, zw))   # [pixels, H]
      perms.append(_lap_max(a.T @ b))
  else:
    perms = identity_permutations(spec)
  R = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in mlp.unflatten(spec, ref)]
  W = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in mlp.unflatten(spec, w)]
  for _ in range(max_iters):
    changed = False
    for l in range(L):
      # Rows of layer l (and its bias), with their inputs in the order the previous layer now has.
      wl = W[l]['weight'][:, perms[l - 1]] if l > 0 else W[l]['weight']
      score = R[l]['weight'] @ wl.T + np.outer(R[l]['bias'], W[l]['bias'])
      # Columns of layer l + 1, with its rows in the order the next layer now has.
      nxt = W[l + 1]['weight'][perms[l + 1]] if l + 1 < L else W[l + 1]['weight']
      score += R[l + 1]['weight'].T @ nxt
      new = _lap_max(score)
      if not np.array_equal(new, perms[l]):
        cur = score[np.arange(len(new)), perms[l]].sum()
        if score[np.arange(len(new)), new].sum() > cur + 1e-9 * max(1.0, abs(cur)):
          perms[l], changed = new, True
    if not changed:
      break
  return permute_hidden(spec, w, perms), perms


def pairwise_distances(spec: mlp.FieldSpec, weights, shape: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """For fields [N, P]: 'raw' [N, N] = ||w_i - w_j||, 'aligned' [N, N] = ||w_i - align(w_i, w_j)||."""
  w = np.asarray(weights, np.float32)
  n = len(w)
  raw = np.sqrt(np.maximum(((w[:, None, :] - w[None, :, :]) ** 2).sum(-1), 0.0))
  aligned = np.zeros_like(raw)
  for i in range(n):
    for j in range(n):
      if i != j:
        aligned[i, j] = np.linalg.norm(w[i] - align(spec, w[i], w[j], shape)[0])
  return {'raw': raw, 'aligned': aligned}


def neuron_agreement(spec: mlp.FieldSpec, weights, shape: Sequence[int], layer: int = 0,
                     matched: bool = False) -> np.ndarray:
  """[N, N]: mean over neurons i of |corr(neuron i of field a, neuron i of field b)| over the pixel
  grid (hidden layer `layer`); matched=True first matches b's neurons to a's (align, 'activations')."""
  w = np.asarray(weights, np.float32)
  n = len(w)
  out = np.ones((n, n))
  for i in range(n):
    for j in range(n):
      if i != j:
        b = align(spec, w[i], w[j], shape, method='activations')[0] if matched else w[j]
        out[i, j] = np.abs(np.diag(neuron_correlation(spec, w[i], b, shape, layer))).mean()
  return out


def off_diagonal(m: np.ndarray) -> np.ndarray:
  return m[~np.eye(len(m), dtype=bool)]


# ---------------------------------------------------------------------------------------------
# The experiment: the same images from a shared init and from random inits.


def pick_per_class(labels, k: int) -> np.ndarray:
  """k indices spread over the classes (the first of each class in turn), in increasing order."""
  return picks.per_class(labels, k)


@dataclasses.dataclass
class FitResult:
  weights: np.ndarray   # [n, P]
  psnr: np.ndarray      # [n]
  init: str             # 'shared' | 'random'


def fit_images(config, images, init: str = 'shared', shared_init=None, steps: int | None = None,
               seed: int | None = None, fitter=None) -> FitResult:
  """Fit image fields [n, H, W] (values in [0, 1]) with the fit stage's batched fitter.

  init='shared': every field starts from `shared_init` [P] (e.g. WORKDIR/fields/shared_init.npy;
  None = one random init, the same for all). init='random': each field its own random init.
  steps defaults to config.fit.steps.
  """
  images = np.asarray(images, np.float32)
  n, h, w = images.shape
  spec = mlp.FieldSpec.from_config(config.field)
  seed = int(config.seed) if seed is None else int(seed)
  steps = int(config.fit.steps) if steps is None else int(steps)
  fitter = fitter or make_fitter(config, (h, w))
  keys = field_keys(seed, n)
  if init == 'shared':
    if shared_init is None:
      shared_init = np.asarray(mlp.flatten(spec, mlp.init(spec, jax.random.fold_in(jax.random.PRNGKey(seed), 0x5A))))
    shared = np.asarray(shared_init, np.float32)
  elif init == 'random':
    shared = None
  else:
    raise ValueError(f"init must be 'shared' or 'random', not {init!r}")
  wts, _, psnr = fitter.fit(steps, images.reshape(n, h * w, 1), keys, shared)
  return FitResult(weights=wts, psnr=psnr, init=init)


def make_fitter(config, shape: Sequence[int]):
  """The fit stage's StackFitter for image fields on the config's mesh (compiles once per (steps, fields))."""
  spec = mlp.FieldSpec.from_config(config.field)
  mesh = sharding.make_mesh(config.mesh, per_core=True)
  return StackFitter(spec, config, mesh, psnr_score(spec), feats=mlp.encode(spec, jnp.asarray(mlp.pixel_centres(*shape))),
                     per_step=int(config.fit.pixels_per_step))


def field_keys(seed: int, n: int) -> jax.Array:
  base = jax.random.fold_in(jax.random.PRNGKey(seed), 0xA11)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n, dtype=jnp.uint32))


@dataclasses.dataclass
class SymmetryResult:
  spec: mlp.FieldSpec
  shape: tuple
  images: np.ndarray                  # [n, H, W]
  labels: np.ndarray                  # [n]
  fits: dict[str, FitResult]          # 'shared', 'random'
  distances: dict[str, dict]          # init -> {'raw': [n, n], 'aligned': [n, n]}
  agreement: dict[str, dict]          # init -> {'raw': [n, n], 'matched': [n, n]} (neuron_agreement)

  def table(self) -> list[dict]:
    """One row per init: mean PSNR, mean distance between fields before/after alignment, and how
    alike the fields' first-layer neurons are (mean |corr| of neuron i with neuron i)."""
    rows = []
    for name, fit in self.fits.items():
      d, a = self.distances[name], self.agreement[name]
      raw, al = off_diagonal(d['raw']).mean(), off_diagonal(d['aligned']).mean()
      rows.append({'init': name, 'psnr_mean': float(np.mean(fit.psnr)),
                   'weight_norm_mean': float(np.linalg.norm(fit.weights, axis=1).mean()),
                   'distance_raw': float(raw), 'distance_aligned': float(al),
                   'aligned_over_raw': float(al / raw) if raw > 0 else float('nan'),
                   'neuron_corr_raw': float(off_diagonal(a['raw']).mean()),
                   'neuron_corr_matched': float(off_diagonal(a['matched']).mean())})
    return rows


def symmetry_experiment(config, images, labels=None, shared_init=None, steps: int | None = None,
                        seed: int | None = None) -> SymmetryResult:
  """Fit the same images from a shared init and from independent random inits, and measure how
  far apart the fields' weights are before and after optimal neuron permutation."""
  images = np.asarray(images, np.float32)
  shape = tuple(images.shape[1:])
  spec = mlp.FieldSpec.from_config(config.field)
  fitter = make_fitter(config, shape)
  fits = {init: fit_images(config, images, init, shared_init, steps, seed, fitter=fitter)
          for init in ('shared', 'random')}
  distances = {k: pairwise_distances(spec, f.weights, shape) for k, f in fits.items()}
  agreement = {k: {'raw': neuron_agreement(spec, f.weights, shape),
                   'matched': neuron_agreement(spec, f.weights, shape, matched=True)} for k, f in fits.items()}
  return SymmetryResult(spec=spec, shape=shape, images=images,
                        labels=np.zeros(len(images), np.int64) if labels is None else np.asarray(labels),
                        fits=fits, distances=distances, agreement=agreement)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib; each returns the Figure).


def plot_layer_histograms(weights, layout: Sequence[dict], shared_init=None, bins: int = 80, max_values: int = 2_000_000):
  """Histogram of every tensor's values over all fields; with `shared_init`, a second row shows
  the residuals w - init (what the residual tokenizer codes)."""
  import matplotlib.pyplot as plt
  views = tensors(layout, weights)
  rows = 2 if shared_init is not None else 1
  inits = tensors(layout, shared_init) if shared_init is not None else None
  fig, axes = plt.subplots(rows, len(layout), figsize=(2.6 * len(layout), 2.4 * rows), squeeze=False)
  rng = np.random.default_rng(0)
  for j, e in enumerate(layout):
    v = views[e['name']].reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) > max_values:
      v = rng.choice(v, max_values, replace=False)
    ax = axes[0, j]
    ax.hist(v, bins=bins, color='C0')
    ax.set_title(f"{e['name']}\n{'x'.join(map(str, e['shape']))}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_yticks([])
    if inits is not None:
      r = (views[e['name']] - inits[e['name']][None]).reshape(-1)
      r = r[np.isfinite(r)]
      if len(r) > max_values:
        r = rng.choice(r, max_values, replace=False)
      axes[1, j].hist(r, bins=bins, color='C1')
      axes[1, j].tick_params(labelsize=7)
      axes[1, j].set_yticks([])
  axes[0, 0].set_ylabel('w', fontsize=8)
  if inits is not None:
    axes[1, 0].set_ylabel('w - shared init', fontsize=8)
  fig.tight_layout()
  return fig


def plot_quality(quality, labels=None, floor: float | None = None, metric: str = 'PSNR (dB)'):
  """The per-field quality distribution (histogram) and, given labels, its spread per class."""
  import matplotlib.pyplot as plt
  q = np.asarray(quality, np.float64)
  ok = np.isfinite(q)
  ncols = 2 if labels is not None else 1
  fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3), squeeze=False)
  ax = axes[0, 0]
  ax.hist(q[ok], bins=40, color='C2')
  if floor is not None:
    ax.axvline(floor, color='r', ls='--', label=f'floor {floor:g}')
    ax.legend(fontsize=8)
  ax.set_xlabel(metric)
  ax.set_ylabel('fields')
  ax.set_title(f"{ok.sum()} fields: mean {q[ok].mean():.2f}, p10 {np.percentile(q[ok], 10):.2f}, "
               f"min {q[ok].min():.2f}" if ok.any() else 'no finite values', fontsize=9)
  if labels is not None:
    labels = np.asarray(labels)
    classes = np.unique(labels)
    axes[0, 1].boxplot([q[ok & (labels == c)] for c in classes], showfliers=True)
    axes[0, 1].set_xticks(range(1, len(classes) + 1), [str(c) for c in classes])
    axes[0, 1].set_xlabel('class')
    axes[0, 1].set_ylabel(metric)
  fig.tight_layout()
  return fig


def plot_distances(result: SymmetryResult):
  """Pairwise weight distances for both inits, raw and after alignment, as matrices and means."""
  import matplotlib.pyplot as plt
  names = list(result.fits)
  vmax = max(float(d['raw'].max()) for d in result.distances.values())
  fig, axes = plt.subplots(1, 2 * len(names) + 1, figsize=(3.0 * (2 * len(names) + 1), 3))
  for i, name in enumerate(names):
    for j, kind in enumerate(('raw', 'aligned')):
      ax = axes[2 * i + j]
      im = ax.imshow(result.distances[name][kind], vmin=0, vmax=vmax, cmap='viridis')
      ax.set_title(f"{name} init, {kind}", fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes[:-1].tolist(), shrink=0.8, label='||w_i - w_j||')
  ax = axes[-1]
  x = np.arange(len(names))
  for j, kind in enumerate(('raw', 'aligned')):
    vals = [off_diagonal(result.distances[n][kind]) for n in names]
    ax.bar(x + (j - 0.5) * 0.38, [v.mean() for v in vals], 0.38, yerr=[v.std() for v in vals], label=kind,
           capsize=3)
  ax.set_xticks(x, [f'{n} init' for n in names])
  ax.set_ylabel('mean distance between fields')
  ax.legend(fontsize=8)
  return fig


def plot_neuron_correlations(result: SymmetryResult, pair: tuple[int, int] = (0, 1), layer: int = 0):
  """Correlation over the pixel grid between the hidden neurons of two fields: shared init, random
  init as fitted, random init with the second field's neurons matched to the first's
  (align(method='activations'))."""
  import matplotlib.pyplot as plt
  a, b = pair
  spec, shape = result.spec, result.shape
  ws, wr = result.fits['shared'].weights, result.fits['random'].weights
  matched = align(spec, wr[a], wr[b], shape, method='activations')[0]
  panels = [('shared init', neuron_correlation(spec, ws[a], ws[b], shape, layer)),
            ('random init', neuron_correlation(spec, wr[a], wr[b], shape, layer)),
            ('random init, neurons matched', neuron_correlation(spec, wr[a], matched, shape, layer))]
  fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4))
  for ax, (title, c) in zip(axes, panels):
    im = ax.imshow(c, vmin=-1, vmax=1, cmap='RdBu_r')
    ax.set_title(f"{title}\nmean |diag| {np.abs(np.diag(c)).mean():.2f}", fontsize=9)
    ax.set_xlabel(f'field {b} neuron')
  axes[0].set_ylabel(f'field {a} neuron')
  fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label=f'corr (hidden layer {layer})')
  return fig


def plot_weight_matrices(result: SymmetryResult, name: str | None = None, fields: int = 4):
  """One weight matrix of several fields side by side: shared init, random init, random aligned to
  the first field. Aligned weights share structure column by column; unaligned ones do not."""
  import matplotlib.pyplot as plt
  spec = result.spec
  layout = spec.layout
  name = name or next(e['name'] for e in layout if e['name'].endswith('.weight') and e['name'] != 'layers.0.weight')
  k = min(fields, len(result.images))
  wr = result.fits['random'].weights
  aligned = np.stack([wr[0]] + [align(spec, wr[0], wr[i], result.shape)[0] for i in range(1, k)])
  rows = [('shared init', result.fits['shared'].weights[:k]), ('random init', wr[:k]), ('random, aligned', aligned)]
  mats = {t: tensors(layout, w)[name] for t, w in rows}
  vmax = max(float(np.abs(m).max()) for m in mats.values())
  fig, axes = plt.subplots(3, k + 1, figsize=(1.9 * (k + 1), 5.8),
                           gridspec_kw={'width_ratios': [0.7] + [1] * k})
  for r, (title, _) in enumerate(rows):
    for c in range(k):
      ax = axes[r, c + 1]
      ax.imshow(mats[title][c], vmin=-vmax, vmax=vmax, cmap='RdBu_r')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f'field {c} (class {result.labels[c]})', fontsize=8)
    axes[r, 0].axis('off')
    axes[r, 0].text(0.0, 0.5, title, fontsize=9, va='center')
  fig.suptitle(f'{name} (rows = neurons)', fontsize=10)
  fig.tight_layout()
  return fig
