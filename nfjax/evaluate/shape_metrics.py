"""Shape metrics: HyperDiffusion's protocol (hyperdiffusion.md §2) on point clouds from meshes.

Protocol, as HyperDiffusion's `calc_metrics('test')` runs it:
  1. References: 2048-point clouds of the test split. Generated: `generated_count(N_ref)` =
     int(1.1 N_ref) weight vectors, meshed (R = 356, logit level 1.386 in HyperDiffusion), 2048
     area-weighted surface samples per mesh (`sample_clouds`); empty meshes are dropped and the
     rest truncated to N_ref (an error if fewer remain: HyperDiffusion asserts).
  2. Normalisation ('shape_unit', `normalize_clouds`): every cloud, reference and generated,
     separately: subtract its per-axis mean, divide by ONE scalar = the unbiased (n-1) standard
     deviation of all 3n coordinates of the cloud *before* centring (`pc.flatten().std()` on the
     raw cloud, as HyperDiffusion and NeF-GPT compute it). That scalar includes the spread of the
     three axis means, so the scale is not translation invariant: reproduced as is. HyperDiffusion's
     x2 on generated clouds cancels in this normalisation and is not applied. 'global' (one std over
     all centred coordinates of the set) and 'none' are offered for other protocols.
  3. Squared Chamfer distance (`chamfer_matrix`): mean over a's points of the squared distance to
     the nearest point of b, plus the reverse. Computed as sum((x - y)^2) over the 3 axes in
     float32 (no cancellation, so identical clouds give exactly 0; HyperDiffusion's
     |x|^2 + |y|^2 - 2 x.y differs by float32 rounding only).
  4. MMD = mean over references of the min over generated clouds of CD (reported x 10^2 as
     `mmd_cd_x100`), COV = fraction of references that are some generated cloud's nearest,
     1-NNA = leave-one-out 1-NN accuracy over the union (0.5 ideal; below 0.5 when the generated
     clouds are copies of the references): `nfjax.evaluate.image_metrics.mmd_cov` / `one_nna`.
  5. FPD: the Fréchet distance of PointNet++ features of the same normalised clouds, when the
     user gives the PointNet++ checkpoint (`fpd`, `nfjax.evaluate.pointnet2`).

NeF-GPT's variant (`bootstrap`): 32 generated vs 32 reference clouds drawn with replacement,
metrics averaged over 32 rounds (here: mean and std). Novelty (`nearest_training`): each generated
cloud's CD to its nearest training cloud, against HyperDiffusion's memorisation criticism.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import geometry, sharding
from nfjax.errors import NfjaxError
from nfjax.evaluate import image_metrics, pointnet2

NUM_POINTS = 2048
GENERATED_MULT = 1.1
NORMALIZATIONS = ('shape_unit', 'global', 'none')
FPD_NOT_COMPUTED = "not computed: no PointNet++ weights given (evaluate.pointnet_weights)"

# Floats per Chamfer tile (ta x tb x n x m): ~256 MB.
_TILE_BUDGET = 1 << 26


def generated_count(num_ref: int, mult: float = GENERATED_MULT) -> int:
  """How many shapes to generate for num_ref references (HyperDiffusion: int(N_ref * 1.1))."""
  return int(num_ref * mult)


# ---------------------------------------------------------------------------------------------
# Point clouds.

def sample_clouds(meshes: Sequence[tuple[np.ndarray, np.ndarray] | None], n: int = NUM_POINTS, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """n area-weighted surface samples per mesh -> (clouds float32 [M, n, 3], kept indices int64 [M]).

  Meshes with no vertices, no faces or no area (or None) are dropped; mesh i is sampled with
  rng([seed, i]), so a mesh's cloud does not depend on the others.
  """
  clouds, kept = [], []
  for i, m in enumerate(meshes):
    if m is None or len(m[0]) == 0 or len(m[1]) == 0:
      continue
    try:
      pts, _ = geometry.sample_surface(m[0], m[1], int(n), np.random.default_rng([int(seed), i]))
    except ValueError:
      continue
    clouds.append(pts)
    kept.append(i)
  if not clouds:
    return np.zeros((0, int(n), 3), np.float32), np.zeros(0, np.int64)
  return np.stack(clouds).astype(np.float32), np.asarray(kept, np.int64)


def normalize_clouds(clouds: np.ndarray, mode: str = 'shape_unit', scale: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Centre and scale clouds [M, n, 3] -> (normalised float32 [M, n, 3], scale per cloud float64 [M]).

  shape_unit: HyperDiffusion's (module docstring, step 2). global: each cloud centred on its mean,
  all divided by one std (unbiased, over every centred coordinate of the set, or `scale` if given,
  e.g. the reference set's). none: unchanged (scale 1).
  """
  if mode not in NORMALIZATIONS:
    raise NfjaxError(f"cloud normalisation {mode!r} is not one of {NORMALIZATIONS}")
  x = np.asarray(clouds, np.float64)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise NfjaxError(f"clouds must be [M, n, 3], got shape {x.shape}")
  m = len(x)
  if mode == 'none' or m == 0:
    return x.astype(np.float32), np.ones(m)
  centred = x - x.mean(1, keepdims=True)
  if mode == 'shape_unit':
    s = x.reshape(m, -1).std(1, ddof=1)
  else:
    s = np.full(m, float(scale) if scale is not None else centred.std(ddof=1))
  s = np.where(s > 0, s, 1.0)
  return (centred / s[:, None, None]).astype(np.float32), s


# ---------------------------------------------------------------------------------------------
# Chamfer distance.

def _tile_fn(ta: int, tb: int, k: int, mesh):
  def tile(a, b):
    # a [ta, n, 3], b [k * tb, m, 3] -> squared Chamfer [ta, k * tb]
    bs = b.reshape(k, tb, *b.shape[1:])

    def one(bc):
      d = sum((a[:, None, :, None, c] - bc[None, :, None, :, c]) ** 2 for c in range(3))  # [ta, tb, n, m]
      return d.min(3).mean(2) + d.min(2).mean(2)

    out = jax.lax.map(one, bs)                         # [k, ta, tb]
    return jnp.transpose(out, (1, 0, 2)).reshape(ta, k * tb)

  if mesh is None:
    return jax.jit(tile)
  rows = sharding.named(mesh, 'batch', None, None)
  return jax.jit(tile, in_shardings=(rows, sharding.replicated(mesh)),
                 out_shardings=sharding.named(mesh, 'batch', None))


_FN_CACHE: dict = {}


def chamfer_matrix(a: np.ndarray, b: np.ndarray | None = None, block: int | None = None, mesh=None
                   ) -> np.ndarray:
  """Squared Chamfer distances between cloud sets a [Na, n, 3] and b [Nb, m, 3] (b None: a with
  itself) -> float32 numpy [Na, Nb].

  Tiles of `block` x `block` cloud pairs (default: the largest power of two keeping a tile's
  n x m distances under ~2^26 floats) are computed by one jitted function of fixed shape; sets are
  zero-padded to whole tiles. With a mesh, a tile's rows are sharded over the 'batch' axes.
  """
  a = np.asarray(a, np.float32)
  b = a if b is None else np.asarray(b, np.float32)
  for name, x in (('a', a), ('b', b)):
    if x.ndim != 3 or x.shape[-1] != 3:
      raise NfjaxError(f"chamfer_matrix: {name} must be [N, points, 3], got shape {x.shape}")
  na, nb = len(a), len(b)
  if na == 0 or nb == 0:
    return np.zeros((na, nb), np.float32)
  n, m = a.shape[1], b.shape[1]
  shards = sharding.axis_size(mesh, 'batch') if mesh is not None else 1
  if block is None:
    block = 1 << max(0, int(math.log2(max(1, _TILE_BUDGET // (n * m)))) // 2)
  ta = max(shards, -(-min(int(block), -(-na // shards) * shards) // shards) * shards)
  tb = max(1, min(int(block), nb))
  nb_pad = -(-nb // tb) * tb
  na_pad = -(-na // ta) * ta
  bp = np.zeros((nb_pad, m, 3), np.float32)
  bp[:nb] = b
  ap = np.zeros((na_pad, n, 3), np.float32)
  ap[:na] = a
  key = (ta, tb, nb_pad // tb, mesh)
  fn = _FN_CACHE.get(key)
  if fn is None:
    fn = _FN_CACHE[key] = _tile_fn(ta, tb, nb_pad // tb, mesh)
  bj = jnp.asarray(bp) if mesh is None else jax.device_put(bp, sharding.replicated(mesh))
  parts = [fn(jnp.asarray(ap[i:i + ta]), bj) for i in range(0, na_pad, ta)]
  return np.concatenate([np.asarray(p) for p in parts])[:na, :nb]


# ---------------------------------------------------------------------------------------------
# Set metrics.

def metrics_from_matrices(d_sr: np.ndarray, d_rr: np.ndarray, d_ss: np.ndarray) -> dict:
  """MMD / COV / 1-NNA from Chamfer matrices d_sr [N_gen, N_ref], d_rr [N_ref, N_ref], d_ss."""
  mc = image_metrics.mmd_cov(d_sr)
  nna = image_metrics.one_nna(d_rr, np.asarray(d_sr).T, d_ss)
  return {'mmd_cd': mc['mmd'], 'mmd_cd_x100': 100.0 * mc['mmd'], 'cov': mc['cov'], '1nna': nna['acc'],
          '1nna_ref': nna['acc_ref'], '1nna_gen': nna['acc_sample'], 'mmd_smp_cd': mc['mmd_smp']}


def _prepare(gen, ref, normalize, match_ref):
  gen = np.asarray(gen, np.float32)
  ref = np.asarray(ref, np.float32)
  if len(ref) == 0:
    raise NfjaxError("shape metrics need at least one reference cloud")
  if match_ref:
    if len(gen) < len(ref):
      raise NfjaxError(f"{len(gen)} non-empty generated shapes for {len(ref)} references: generate "
                       f"generated_count({len(ref)}) = {generated_count(len(ref))} or more (HyperDiffusion "
                       "truncates to N_ref and fails when fewer), or pass match_ref=False")
    gen = gen[:len(ref)]
  if normalize == 'global':
    ref_n, s = normalize_clouds(ref, 'global')
    gen_n, _ = normalize_clouds(gen, 'global', scale=float(s[0]))
  else:
    ref_n, _ = normalize_clouds(ref, normalize)
    gen_n, _ = normalize_clouds(gen, normalize)
  return gen_n, ref_n


def set_metrics(gen_clouds: np.ndarray, ref_clouds: np.ndarray, normalize: str = 'shape_unit',
                match_ref: bool = True, block: int | None = None, mesh=None, return_matrices: bool = False
                ) -> dict:
  """HyperDiffusion's MMD-CD / COV-CD / 1-NNA-CD of raw generated clouds [Ng, n, 3] against raw
  references [Nr, n, 3].

  normalize: 'shape_unit' (HyperDiffusion), 'global' (one std of the centred references divides
  both sets) or 'none' (already normalised). match_ref: keep the first N_ref generated clouds and
  fail if there are fewer (HyperDiffusion), else use all. Returns {'mmd_cd', 'mmd_cd_x100', 'cov',
  '1nna', '1nna_ref', '1nna_gen', 'mmd_smp_cd', 'num_gen', 'num_ref'} (+ 'd_sr', 'd_rr', 'd_ss'
  numpy matrices if return_matrices).
  """
  gen, ref = _prepare(gen_clouds, ref_clouds, normalize, match_ref)
  d_sr = chamfer_matrix(gen, ref, block, mesh)
  d_rr = chamfer_matrix(ref, None, block, mesh)
  d_ss = chamfer_matrix(gen, None, block, mesh)
  out = metrics_from_matrices(d_sr, d_rr, d_ss)
  out.update(num_gen=len(gen), num_ref=len(ref))
  if return_matrices:
    out.update(d_sr=d_sr, d_rr=d_rr, d_ss=d_ss)
  return out


def bootstrap(gen_clouds: np.ndarray, ref_clouds: np.ndarray, size: int = 32, rounds: int = 32, seed: int = 0,
              normalize: str = 'shape_unit', block: int | None = None, mesh=None) -> dict:
  """NeF-GPT's protocol: `rounds` draws of `size` generated and `size` reference clouds, uniformly
  with replacement; metrics per draw. Returns {metric: mean, metric + '_std': std over rounds,
  'rounds', 'size'}.

  The Chamfer matrices are computed once on the full sets and indexed per draw (a cloud drawn twice
  is at distance 0 from its copy, as when NeF-GPT recomputes them on the drawn clouds).
  """
  gen, ref = _prepare(gen_clouds, ref_clouds, normalize, match_ref=False)
  if len(gen) == 0:
    raise NfjaxError("bootstrap needs at least one generated cloud")
  d_sr = chamfer_matrix(gen, ref, block, mesh)
  d_rr = chamfer_matrix(ref, None, block, mesh)
  d_ss = chamfer_matrix(gen, None, block, mesh)
  rng = np.random.default_rng(seed)
  per = []
  for _ in range(int(rounds)):
    s = rng.integers(0, len(gen), int(size))
    r = rng.integers(0, len(ref), int(size))
    per.append(metrics_from_matrices(d_sr[np.ix_(s, r)], d_rr[np.ix_(r, r)], d_ss[np.ix_(s, s)]))
  out = {'rounds': int(rounds), 'size': int(size)}
  for k in per[0]:
    vals = np.array([p[k] for p in per], np.float64)
    out[k] = float(vals.mean())
    out[k + '_std'] = float(vals.std())
  return out


def nearest_training(gen_clouds: np.ndarray, train_clouds: np.ndarray, normalize: str = 'shape_unit',
                     block: int | None = None, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Novelty: each generated cloud's squared Chamfer distance to its nearest training cloud.

  Raw clouds [Ng, n, 3] and [Nt, n, 3], normalised as in `set_metrics`. Returns (distance float64
  [Ng], index into train_clouds int64 [Ng]).
  """
  gen, train = _prepare(gen_clouds, train_clouds, normalize, match_ref=False)
  if len(gen) == 0:
    return np.zeros(0), np.zeros(0, np.int64)
  d = chamfer_matrix(gen, train, block, mesh)
  idx = d.argmin(1).astype(np.int64)
  return d[np.arange(len(gen)), idx].astype(np.float64), idx


# ---------------------------------------------------------------------------------------------
# FPD.

def fpd_from_features(gen_features: np.ndarray, ref_features: np.ndarray) -> float:
  """Fréchet distance between feature sets [n, d] (HyperDiffusion: PointNet++ fc2 features, d=256):
  float64, per-dimension means, unbiased covariances."""
  return image_metrics.frechet_distance(gen_features, ref_features)


def fpd(gen_clouds: np.ndarray, ref_clouds: np.ndarray, pointnet_weights: str | None = None,
        normalize: str = 'shape_unit', seed: int = 0) -> tuple[float | None, str]:
  """Fréchet PointNet++ Distance of raw clouds [Ng, n, 3] and [Nr, n, 3] -> (value or None, note).

  Without weights: (None, FPD_NOT_COMPUTED). With the path of the PointNet++ SSG ModelNet40
  checkpoint (.pth, read without torch, or .npz): both sets normalised as for Chamfer, 256-d
  features (`nfjax.evaluate.pointnet2`), `fpd_from_features`.
  """
  if not pointnet_weights:
    return None, FPD_NOT_COMPUTED
  params = pointnet2.load(pointnet_weights)
  gen, ref = _prepare(gen_clouds, ref_clouds, normalize, match_ref=False)
  return (fpd_from_features(pointnet2.features(params, gen, seed), pointnet2.features(params, ref, seed)),
          fpd_note(pointnet_weights))


def fpd_note(pointnet_weights: str) -> str:
  return (f"PointNet++ SSG fc2 features (256-d) of the normalised clouds, weights {pointnet_weights}; "
          "FPS starts seeded (HyperDiffusion's are unseeded)")
