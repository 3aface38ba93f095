"""PointNet++ (single-scale grouping, ModelNet40 classifier) in JAX: the feature extractor of FPD.

HyperDiffusion's FPD (Fréchet PointNet++ Distance) is the Fréchet distance between 256-d features
of generated and reference point clouds, taken from the PyTorch PointNet++ SSG classifier trained
on ModelNet40 without normals (yanx27/Pointnet_Pointnet2_pytorch,
log/classification/pointnet2_ssg_wo_normals/checkpoints/best_model.pth; reference/hyperdiffusion.md
§2.4). nfjax reads that checkpoint without torch (`nfjax.utils.torch_checkpoint`) and evaluates the
same network here, in inference mode:

  set abstraction 1   512 centres by farthest-point sampling, ball radius 0.2, 32 neighbours;
                      input = neighbour xyz - centre xyz (3); shared MLP 64, 64, 128; max-pool
  set abstraction 2   128 centres, radius 0.4, 64 neighbours; input = relative xyz (3) then the
                      128 features; MLP 128, 128, 256; max-pool
  set abstraction 3   all 128 points at once: absolute xyz (3) then the 256 features; MLP 256,
                      512, 1024; max-pool -> 1024
  head                fc 1024->512, BN, ReLU, (dropout), fc 512->256, BN, ReLU, (dropout) =
                      the FPD feature; fc 256->40 = class logits
Every shared-MLP layer is a 1x1 convolution, BatchNorm (running statistics, eps 1e-5) and ReLU;
BatchNorm is folded into the preceding weights once at load time. Dropout is the identity at
inference.

Grouping follows the reference exactly: a ball query takes, for each centre, the `nsample`
lowest-index points within the radius (squared distance <= r^2) and pads with the first of them;
farthest-point sampling starts from one point and repeatedly takes the point farthest from those
taken (first index on ties). The reference draws each level's start uniformly at random with no
seed; nfjax draws them from a seed, so features are reproducible.

Clouds are [B, N, 3] (channels last; the PyTorch model takes [B, 3, N]). HyperDiffusion feeds the
2048-point clouds after the same per-cloud 'shape_unit' normalisation its Chamfer metrics use, in
batches of 10; batch size does not change the result here.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.errors import DataError
from nfjax.utils import torch_checkpoint

# (centres, radius, neighbours, MLP widths) per set-abstraction level; centres None = group all.
SSG_LEVELS = ((512, 0.2, 32, (64, 64, 128)),
              (128, 0.4, 64, (128, 128, 256)),
              (None, None, None, (256, 512, 1024)))
HEAD = (512, 256)          # fc1, fc2 widths; fc2's post-ReLU output is the FPD feature
FEATURE_DIM = 256
BN_EPS = 1e-5
DEFAULT_BATCH = 16
_HI = jax.lax.Precision.HIGHEST


class Layer(NamedTuple):
  w: jax.Array   # [in, out], BatchNorm folded in
  b: jax.Array   # [out]


class Params(NamedTuple):
  levels: tuple    # per level: tuple of Layer
  head: tuple      # fc1+bn1, fc2+bn2
  logits: Layer | None   # fc3 (None when the checkpoint has none)


def expected_shapes(num_classes: int | None = 40) -> dict[str, tuple[int, ...]]:
  """State-dict names and shapes of the PyTorch model (normal_channel=False), BatchNorm's
  num_batches_tracked left out. fc3 is listed when num_classes is given."""
  out = {}
  c_in = 3
  for i, (_, _, _, widths) in enumerate(SSG_LEVELS, start=1):
    for j, c_out in enumerate(widths):
      out[f'sa{i}.mlp_convs.{j}.weight'] = (c_out, c_in, 1, 1)
      out[f'sa{i}.mlp_convs.{j}.bias'] = (c_out,)
      for k in ('weight', 'bias', 'running_mean', 'running_var'):
        out[f'sa{i}.mlp_bns.{j}.{k}'] = (c_out,)
      c_in = c_out
    c_in = widths[-1] + 3          # the next level's input: relative / absolute xyz + features
  c_in = SSG_LEVELS[-1][3][-1]
  for i, c_out in enumerate(HEAD, start=1):
    out[f'fc{i}.weight'] = (c_out, c_in)
    out[f'fc{i}.bias'] = (c_out,)
    for k in ('weight', 'bias', 'running_mean', 'running_var'):
      out[f'bn{i}.{k}'] = (c_out,)
    c_in = c_out
  if num_classes:
    out['fc3.weight'] = (num_classes, c_in)
    out['fc3.bias'] = (num_classes,)
  return out


def _fold(w: np.ndarray, b: np.ndarray, sd: dict, bn: str) -> Layer:
  """Linear/1x1-conv weight [out, in(,1,1)] + bias, then BatchNorm `bn` -> one Layer [in, out]."""
  w = np.asarray(w, np.float64).reshape(w.shape[0], -1)
  scale = np.asarray(sd[f'{bn}.weight'], np.float64) / np.sqrt(np.asarray(sd[f'{bn}.running_var'], np.float64)
                                                               + BN_EPS)
  shift = np.asarray(sd[f'{bn}.bias'], np.float64) - np.asarray(sd[f'{bn}.running_mean'], np.float64) * scale
  return Layer(jnp.asarray((w * scale[:, None]).T, jnp.float32),
               jnp.asarray(np.asarray(b, np.float64) * scale + shift, jnp.float32))


def params_from_state_dict(sd: dict, source: str = 'state dict') -> Params:
  """Check a PointNet++ SSG state dict (names as in the PyTorch model, 'module.' already
  stripped) and fold it into Params. Any missing name or wrong shape is one DataError listing them."""
  has_fc3 = 'fc3.weight' in sd
  num_classes = int(np.shape(sd['fc3.weight'])[0]) if has_fc3 else None
  want = expected_shapes(num_classes)
  missing = [k for k in want if k not in sd]
  wrong = [f"{k} {tuple(np.shape(sd[k]))} (expected {s})" for k, s in want.items()
           if k in sd and tuple(np.shape(sd[k])) != s]
  if missing or wrong:
    what = []
    if missing:
      what.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if wrong:
      what.append(f"{len(wrong)} with the wrong shape ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
    raise DataError(f"{source} is not a PointNet++ SSG classifier without normals (pointnet2_cls_ssg, "
                    f"normal_channel=False), as FPD needs: {' and '.join(what)} of its {len(want)} tensors")
  bad = [k for k in want if not np.all(np.isfinite(np.asarray(sd[k], np.float64)))]
  if bad:
    raise DataError(f"{source}: non-finite values in {', '.join(bad[:4])}")
  levels = []
  for i, (_, _, _, widths) in enumerate(SSG_LEVELS, start=1):
    levels.append(tuple(_fold(sd[f'sa{i}.mlp_convs.{j}.weight'], sd[f'sa{i}.mlp_convs.{j}.bias'], sd,
                              f'sa{i}.mlp_bns.{j}') for j in range(len(widths))))
  head = tuple(_fold(sd[f'fc{i}.weight'], sd[f'fc{i}.bias'], sd, f'bn{i}') for i in range(1, len(HEAD) + 1))
  logits = None
  if has_fc3:
    logits = Layer(jnp.asarray(np.asarray(sd['fc3.weight'], np.float32).T), jnp.asarray(sd['fc3.bias'], jnp.float32))
  return Params(tuple(levels), head, logits)


def load(path: str) -> Params:
  """PointNet++ parameters from a PyTorch checkpoint (.pth/.pt: a dict with 'model_state_dict', or
  a bare state dict; read without torch) or an .npz of the state dict's arrays."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise DataError(f"PointNet++ weights {path!r} do not exist (evaluate.pointnet_weights): give the path of "
                    "best_model.pth of the PointNet++ SSG ModelNet40 classifier without normals")
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as z:
        sd = {k[len('module.'):] if k.startswith('module.') else k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise DataError(f"PointNet++ weights {path!r} are not a readable .npz: {e}") from None
  else:
    sd = torch_checkpoint.state_dict(torch_checkpoint.load(path))
  return params_from_state_dict(sd, f"PointNet++ weights {path!r}")


# ---------------------------------------------------------------------------------------------
# The network, on one cloud [N, 3]; vmapped over clouds.

def _sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:
  """[S, N] squared distances, expanded as |a|^2 + |b|^2 - 2 a.b like the reference."""
  return (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
          - 2.0 * jnp.dot(a, b.T, precision=_HI))


def farthest_point_sample(xyz: jax.Array, num: int, start: jax.Array) -> jax.Array:
  """Indices [num] of farthest-point sampling of xyz [N, 3] from index `start`."""
  n = xyz.shape[0]

  def body(i, carry):
    idx, dist, far = carry
    idx = idx.at[i].set(far)
    d = jnp.sum((xyz - xyz[far]) ** 2, -1)
    dist = jnp.minimum(dist, d)
    return idx, dist, jnp.argmax(dist).astype(jnp.int32)

  idx0 = jnp.zeros(num, jnp.int32)
  dist0 = jnp.full(n, 1e10, xyz.dtype)
  return jax.lax.fori_loop(0, num, body, (idx0, dist0, start.astype(jnp.int32)))[0]


def ball_query(xyz: jax.Array, centres: jax.Array, radius: float, nsample: int) -> jax.Array:
  """[S, K] indices: per centre the K lowest-index points with squared distance <= radius^2,
  padded with the first (K = min(nsample, N); max-pooling ignores the padding, so fewer columns
  than the reference's when N < nsample changes nothing)."""
  n = xyz.shape[0]
  k = min(int(nsample), n)
  order = jnp.arange(n, dtype=jnp.int32)
  key = jnp.where(_sq_dist(centres, xyz) > radius * radius, n, order[None, :])
  idx = -jax.lax.top_k(-key, k)[0]                  # the k smallest keys, ascending
  return jnp.where(idx == n, idx[:, :1], idx)


def _mlp_max(layers, x: jax.Array) -> jax.Array:
  """Shared MLP (1x1 conv + folded BN + ReLU) over the last axis, then max over axis -2."""
  for layer in layers:
    x = jax.nn.relu(jnp.dot(x, layer.w, precision=_HI) + layer.b)
  return jnp.max(x, axis=-2)


def _cloud(params: Params, xyz: jax.Array, starts: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  feats = None
  for level, ((num, radius, nsample, _), layers) in enumerate(zip(SSG_LEVELS, params.levels)):
    if num is None:                                 # group all: absolute xyz + features
      x = xyz if feats is None else jnp.concatenate([xyz, feats], -1)
      feats = _mlp_max(layers, x[None])[0]
      continue
    centres = xyz[farthest_point_sample(xyz, num, starts[level])]
    idx = ball_query(xyz, centres, radius, nsample)
    rel = xyz[idx] - centres[:, None, :]            # [S, K, 3]
    x = rel if feats is None else jnp.concatenate([rel, feats[idx]], -1)
    feats = _mlp_max(layers, x)                     # [S, C]
    xyz = centres
  h = feats
  for layer in params.head:
    h = jax.nn.relu(jnp.dot(h, layer.w, precision=_HI) + layer.b)
  logits = None if params.logits is None else jnp.dot(h, params.logits.w, precision=_HI) + params.logits.b
  return h, logits


@jax.jit
def _batch(params: Params, clouds: jax.Array, starts: jax.Array):
  return jax.vmap(_cloud, in_axes=(None, 0, 0))(params, clouds, starts)


def fps_starts(num_clouds: int, num_points: int, seed: int = 0) -> np.ndarray:
  """[clouds, 2]: the first farthest-point-sampling index of every cloud at both sampled levels
  (level 1 over the cloud's points, level 2 over level 1's centres), uniform like the reference's
  but seeded."""
  rng = np.random.default_rng(int(seed) + 0x2B)
  sizes = [num_points] + [lvl[0] for lvl in SSG_LEVELS[:-2]]
  return np.stack([rng.integers(0, m, size=num_clouds) for m in sizes], 1).astype(np.int32)


def apply(params: Params, clouds: np.ndarray, seed: int = 0, batch: int = DEFAULT_BATCH,
          starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [B, 256], logits [B, classes] or None) of clouds [B, N, 3] (float32), `batch` at a
  time. starts: FPS start indices [B, 2] (default: `fps_starts(B, N, seed)`)."""
  clouds = np.asarray(clouds, np.float32)
  if clouds.ndim != 3 or clouds.shape[-1] != 3:
    raise DataError(f"PointNet++ takes point clouds [clouds, points, 3], got shape {clouds.shape}")
  b, n, _ = clouds.shape
  if b == 0:
    return np.zeros((0, FEATURE_DIM), np.float32), None
  starts = fps_starts(b, n, seed) if starts is None else np.asarray(starts, np.int32)
  batch = max(1, min(int(batch), b))
  feats, logits = [], []
  for i in range(0, b, batch):
    c, s = clouds[i:i + batch], starts[i:i + batch]
    pad = batch - len(c)                            # one compiled shape: pad the last batch
    if pad:
      c = np.concatenate([c, np.repeat(c[-1:], pad, 0)])
      s = np.concatenate([s, np.repeat(s[-1:], pad, 0)])
    f, lg = _batch(params, jnp.asarray(c), jnp.asarray(s))
    feats.append(np.asarray(f)[:batch - pad])
    if lg is not None:
      logits.append(np.asarray(lg)[:batch - pad])
  return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def features(params: Params, clouds: np.ndarray, seed: int = 0, batch: int = DEFAULT_BATCH) -> np.ndarray:
  """FPD features [B, 256] of clouds [B, N, 3]."""
  return apply(params, clouds, seed, batch)[0]


def random_state_dict(seed: int = 0, num_classes: int | None = 40) -> dict[str, np.ndarray]:
  """A PointNet++ SSG state dict of random weights and BatchNorm statistics (the checkpoint's
  names and shapes): for tests and benchmarks without the real checkpoint. Not a trained model."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in expected_shapes(num_classes).items():
    if name.endswith('running_var'):
      v = rng.uniform(0.5, 2.0, shape)
    elif name.endswith('running_mean'):
      v = rng.normal(0.0, 0.1, shape)
    elif '_bns.' in name or name.startswith('bn'):
      v = rng.uniform(0.8, 1.2, shape) if name.endswith('weight') else rng.normal(0.0, 0.05, shape)
    elif name.endswith('bias'):
      v = rng.normal(0.0, 0.05, shape)
    else:
      v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
    sd[name] = v.astype(np.float32)
  return sd
