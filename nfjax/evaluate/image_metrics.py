"""Set-level image metrics: SSIM distances, MMD / COV / 1-NNA, Fréchet distance.

SSIM is the Gaussian-window SSIM of Wang et al. (2004) with the settings that torchmetrics uses by
default and NeF-GPT used (window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, population
statistics, the mean of the SSIM map over the positions where the whole window fits inside the
image). NeF-GPT's distance is D = (1 - SSIM) / 2.

Pairwise SSIM between two sets is computed without materialising image pairs: the Gaussian filter
is separable and linear, so the local cross moment E_w[x y] of every pair in a tile is two
contractions with banded filter matrices (one along columns, one along rows). Per-image means
and variances are computed once. Tiles have a fixed shape (one compilation per shape), their row
axis is sharded over the mesh, and symmetric matrices only compute the upper triangle of tiles.

MMD, COV and 1-NNA follow the PointFlow / HyperDiffusion code that NeF-GPT copied
(nefgpt.md §7.1): with D_sr the [samples, refs] distance matrix,
  MMD   = mean over refs of (min over samples of D)
  COV   = |{nearest ref of each sample}| / N_ref
  1-NNA = leave-one-out 1-nearest-neighbour accuracy on refs (label 1) + samples (label 0).
1-NNA is 0.5 when the two sets are indistinguishable, 1.0 when they are separated, and below 0.5
when samples are copies of the references (each point's neighbour is its twin of the other set).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from nfjax import sharding

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 1.0


def gaussian_1d(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  d = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (d / sigma) ** 2)
  return g / g.sum()


def _band(n: int, size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  """[n - size + 1, n] matrix whose row a applies the 1-D window to positions a .. a+size-1."""
  if n < size:
    raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got a side of {n}")
  g = gaussian_1d(size, sigma)
  m = np.zeros((n - size + 1, n), np.float64)
  for a in range(n - size + 1):
    m[a, a:a + size] = g
  return m.astype(np.float32)


def _filters(height: int, width: int) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(_band(height)), jnp.asarray(_band(width))


def _local(gv, gh, x):
  """Gaussian-filtered maps (valid region) of x [..., H, W] -> [..., H', W']."""
  return jnp.einsum('ai,...ij,bj->...ab', gv, x, gh)


def _moments(gv, gh, x):
  mu = _local(gv, gh, x)
  var = _local(gv, gh, x * x) - mu * mu
  return mu, var


def _ssim_from_moments(mu_x, mu_y, var_x, var_y, exy):
  c1 = (K1 * DATA_RANGE) ** 2
  c2 = (K2 * DATA_RANGE) ** 2
  cov = exy - mu_x * mu_y
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


@jax.jit
def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """SSIM of matched pairs: a, b [n, H, W] in [0, 1] -> [n]."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  gv, gh = _filters(a.shape[-2], a.shape[-1])
  mu_a, var_a = _moments(gv, gh, a)
  mu_b, var_b = _moments(gv, gh, b)
  exy = _local(gv, gh, a * b)
  return _ssim_from_moments(mu_a, mu_b, var_a, var_b, exy).mean((-2, -1))


def ssim_distance(a, b) -> jax.Array:
  """NeF-GPT's distance of matched pairs, (1 - SSIM) / 2."""
  return (1.0 - ssim(a, b)) / 2.0


class PairwiseSSIM:
  """All-pairs SSIM distance D = (1 - SSIM) / 2 between two image sets, tiled and jitted.

  `tile` is the side of a tile of the distance matrix; the row axis of each tile is sharded over
  the mesh's batch axes when a mesh is given.
  """

  def __init__(self, height: int, width: int, tile: int = 128, mesh=None):
    self.height, self.width, self.mesh = height, width, mesh
    self.shards = sharding.axis_size(mesh, 'batch') if mesh is not None else 1
    self.tile = max(self.shards, -(-int(tile) // self.shards) * self.shards)
    self.gv, self.gh = _filters(height, width)
    gv, gh = self.gv, self.gh

    def stats(x):
      mu, var = _moments(gv, gh, x)
      return mu, var

    def tile_fn(xa, mua, va, xb, mub, vb):
      # E_w[x_a y_b] for every pair: filter along columns on the a side, contract with b, then rows.
      xh = jnp.einsum('nij,bj->nibj', xa, gh)          # [ta, H, W', W]
      t = jnp.einsum('nibj,mij->nmib', xh, xb)          # [ta, tb, H, W']
      exy = jnp.einsum('ai,nmib->nmab', gv, t)          # [ta, tb, H', W']
      s = _ssim_from_moments(mua[:, None], mub[None], va[:, None], vb[None], exy)
      return (1.0 - s.mean((-2, -1))) / 2.0

    self._stats = jax.jit(stats)
    if mesh is None:
      self._tile = jax.jit(tile_fn)
    else:
      rows = sharding.named(mesh, 'batch', None, None)
      rep = sharding.replicated(mesh)
      self._tile = jax.jit(tile_fn, in_shardings=(rows, rows, rows, rep, rep, rep),
                           out_shardings=sharding.named(mesh, 'batch', None))

  def _prepare(self, x: np.ndarray, size: int):
    x = np.asarray(x, np.float32).reshape(-1, self.height, self.width)
    n = len(x)
    padded = -(-max(n, 1) // size) * size
    xp = np.zeros((padded, self.height, self.width), np.float32)
    xp[:n] = x
    mu, var = self._stats(jnp.asarray(xp))
    return jnp.asarray(xp), mu, var

  def __call__(self, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """[na, H, W], [nb, H, W] (b None: a against itself) -> distances [na, nb] float32 numpy."""
    symmetric = b is None
    na = len(a)
    nb = na if symmetric else len(b)
    if na == 0 or nb == 0:
      return np.zeros((na, nb), np.float32)
    ta = min(self.tile, -(-na // self.shards) * self.shards)
    tb = ta if symmetric else min(self.tile, nb)
    xa, mua, va = self._prepare(a, ta)
    xb, mub, vb = (xa, mua, va) if symmetric else self._prepare(b, tb)
    out = np.zeros((len(xa), len(xb)), np.float32)
    for i in range(0, len(xa), ta):
      for j in range(0, len(xb), tb):
        if symmetric and j < i:
          continue
        d = self._tile(xa[i:i + ta], mua[i:i + ta], va[i:i + ta], xb[j:j + tb], mub[j:j + tb], vb[j:j + tb])
        out[i:i + ta, j:j + tb] = np.asarray(d)
    if symmetric:
      upper = np.triu(np.ones((len(xa) // ta,) * 2, bool))
      mask = np.kron(upper, np.ones((ta, ta), bool))
      out = np.where(mask, out, out.T)
    return out[:na, :nb]


# ---------------------------------------------------------------------------------------------
# Set metrics from distance matrices (NeF-GPT / PointFlow definitions).

def mmd_cov(d_sr: np.ndarray) -> dict:
  """d_sr [N_samples, N_refs] -> {'mmd', 'cov', 'mmd_smp'} (see the module docstring)."""
  d_sr = np.asarray(d_sr, np.float64)
  n_s, n_r = d_sr.shape
  if n_s == 0 or n_r == 0:
    return {'mmd': float('nan'), 'cov': float('nan'), 'mmd_smp': float('nan')}
  nearest_ref = d_sr.argmin(1)
  return {
      'mmd': float(d_sr.min(0).mean()),
      'cov': float(len(np.unique(nearest_ref)) / n_r),
      'mmd_smp': float(d_sr.min(1).mean()),
  }


def one_nna(d_rr: np.ndarray, d_rs: np.ndarray, d_ss: np.ndarray) -> dict:
  """Leave-one-out 1-NN two-sample accuracy. d_rs is [N_refs, N_samples].

  Returns {'acc', 'acc_ref', 'acc_sample'} (PointFlow's acc, acc_t, acc_f).
  """
  d_rr, d_rs, d_ss = (np.asarray(m, np.float64) for m in (d_rr, d_rs, d_ss))
  n_r, n_s = d_rs.shape
  if n_r == 0 or n_s == 0:
    return {'acc': float('nan'), 'acc_ref': float('nan'), 'acc_sample': float('nan')}
  full = np.block([[d_rr, d_rs], [d_rs.T, d_ss]])
  np.fill_diagonal(full, np.inf)
  label = np.concatenate([np.ones(n_r, bool), np.zeros(n_s, bool)])
  pred = label[full.argmin(1)]
  correct = pred == label
  return {'acc': float(correct.mean()), 'acc_ref': float(correct[:n_r].mean()),
          'acc_sample': float(correct[n_r:].mean())}


# ---------------------------------------------------------------------------------------------
# Fréchet distance.

def _psd_sqrt(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_moments(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

  Tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
  PSD matrix C1^(1/2) C2 C1^(1/2) (same spectrum as C1 C2), which needs only symmetric
  eigendecompositions: no complex parts, no failure on singular covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  r = _psd_sqrt(cov1)
  m = r @ cov2 @ r
  eig = np.linalg.eigvalsh((m + m.T) / 2.0)
  tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets [n, d] (nan if n < 2)."""
  if len(f1) < 2 or len(f2) < 2:
    return float('nan')
  return frechet_from_moments(*moments(f1), *moments(f2))


def set_metrics(d_sr: np.ndarray, d_rr: np.ndarray, d_ss: np.ndarray) -> dict:
  """NeF-GPT's three numbers for one generated set against the references."""
  mc = mmd_cov(d_sr)
  nna = one_nna(d_rr, np.asarray(d_sr).T, d_ss)
  return {'ssim_mmd': mc['mmd'], 'ssim_cov': mc['cov'], 'ssim_1nna': nna['acc'],
          'ssim_1nna_ref': nna['acc_ref'], 'ssim_1nna_sample': nna['acc_sample'],
          'ssim_mmd_smp': mc['mmd_smp']}




def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB (float64) of [n, H, W] arrays in [0, 1] (mlp.psnr is the jitted one)."""
  mse = np.mean((np.asarray(pred, np.float64) - target) ** 2, axis=(1, 2))
  return -10.0 * np.log10(np.maximum(mse, 1e-12))
