r"""Fit throughput: nfjax's batched, sharded field fitting vs its own reference path and a NeF-GPT-style per-field loop.

  python benchmarks/fit_throughput.py --num_fields=1000 [--steps=500 --lr=0.04] [--baseline_fields=5]
  python benchmarks/fit_throughput.py --num_fields=60000 --steps=1000 --chunk_size=4096 \
      --baseline_vmap_fields=8192 --baseline=none     # a GPU's figure: the 5,000 offline images repeated
  python benchmarks/fit_throughput.py --kind=shape --field=nefgpt3d|hyperdiffusion --num_fields=256 \
      [--steps=500 --points=20000 --chunk_size=256] [--baseline_fields=3]

Images (--kind=image, the default):

Both sides start from the same shared init and fit the same offline MNIST images with the parity
architecture (561 parameters); PSNR is measured for both on the same pixel-centre grid.

* nfjax: what the fit stage runs (`--formulation=auto`: for images the stacked formulation,
  nfjax/fields/stacked.py, a chunk of fields in big matrix products) over a chunk of fields sharded
  over every device, full-batch Adam, cosine
  schedule. Time excludes compilation and the one-off shared init.
* baseline_vmap (same run, same chunks, timed chunk by chunk alternately with the above so that a
  noisy machine slows both alike): today's reference path, the compiled jit(vmap(fit_one)),
  `fit.formulation='vmap'`, on the same devices. The JSON gives both rates, the ratio
  (`speedup_vs_vmap`), both mean qualities and the per-field |difference| of quality.
* baseline_vmap_one_device (on a CPU split into several devices, as the launcher does with
  --cpu_devices): the reference on one device, as the fit stage ran on a CPU before
  (`speedup_vs_vmap_one_device`).
* baseline (same run): NeF-GPT's procedure, one field at a time in PyTorch: 64-pixel shuffled
  batches, 250 epochs, Adam lr 4e-3, ReduceLROnPlateau(patience 10, factor 0.95, min 1e-5) per
  epoch, early stop after 100 epochs without improvement. Without torch installed
  (`pip install -e .[bench]`), the same procedure runs one field at a time in JAX and the JSON says so.

Shapes (--kind=shape): the fit stage's point fitter (nfjax/modalities/shapes/) on shapes from
nfjax.data.shapes (or, until that module exists, spheres and boxes with analytic labels) with a
parity field: `nefgpt3d` (3,712 params, tanh vs +-1 labels, MSE, 8,192 points per step) or
`hyperdiffusion` (36,737 params, BCE on occupancy logits, 2,048 points per step); Adam lr 1e-2.
* nfjax: chunks of fields sharded over every device, each step a per-field random batch of points
  encoded on the fly, cosine schedule; what the fit stage runs (`--formulation=auto`: on a CPU a
  cache-sized block of fields at a time, each by `stacked.fit_point_field`, `blocked`), with the vmap reference in the
  same run as for images. Time excludes compilation and the one-off shared init.
* baseline (same run, same shapes, same shared init, same steps and points per step): NeF-GPT's
  ShapeNet loop, one shape at a time in PyTorch (on the GPU when there is one): random points
  with replacement per step, Adam, ReduceLROnPlateau(patience 10, factor 0.8, min 1e-5) per
  "epoch" of points/batch steps. Quality: IoU of both on the same held-out points.

Also measured in the same run: the machine's dense f32 matmul peak (GFLOP/s) and the achieved
GFLOP/s of the fitting computation (analytic FLOPs of the MLP's forward and backward passes).
Prints progress, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from nfjax import modalities  # noqa: E402
from nfjax.configs import checks  # noqa: E402
from nfjax.fields import stack  # noqa: E402
from nfjax.modalities import shapes as shape_modality  # noqa: E402
from nfjax.modalities.images import psnr_score  # noqa: E402
from nfjax import sharding  # noqa: E402
from nfjax.data import images as image_data  # noqa: E402
from nfjax.fields import fitting, mlp  # noqa: E402
from nfjax.utils import perf  # noqa: E402


def _torch_encode(spec: mlp.FieldSpec, x):
  """mlp.encode in torch: [x] if include_input, then sin(f x), cos(f x) per frequency."""
  import torch
  scale = np.pi if spec.use_pi else 1.0
  feats = [x] if spec.include_input else []
  for f in spec.freqs:
    feats += [torch.sin(f * scale * x), torch.cos(f * scale * x)]
  return torch.cat(feats, -1)


def _torch_field(spec: mlp.FieldSpec, flat: np.ndarray, device='cpu'):
  """The field as a torch nn.Sequential (PyTorch's own layout), loaded from a flat nfjax vector
  (state_dict order == nfjax layout). Its output is the raw network output."""
  import torch
  acts = {'relu': torch.nn.ReLU, 'gelu': torch.nn.GELU, 'silu': torch.nn.SiLU, 'tanh': torch.nn.Tanh}
  if spec.activation not in acts:
    raise ValueError(f"the torch baseline has no {spec.activation!r} activation")
  layers = []
  for i, (o, n_in, has_bias) in enumerate(spec.layer_dims):
    layers.append(torch.nn.Linear(n_in, o, bias=has_bias))
    if i < len(spec.layer_dims) - 1:
      layers.append(acts[spec.activation]())
  net = torch.nn.Sequential(*layers)
  with torch.no_grad():
    flat_t = torch.from_numpy(np.array(flat, np.float32))
    off = 0
    for p in net.parameters():
      p.copy_(flat_t[off:off + p.numel()].view_as(p))
      off += p.numel()
  return net.to(device)


def _pick_baseline(kind: str) -> str:
  if kind == 'auto':
    try:
      import torch  # noqa: F401
      return 'torch'
    except ImportError:
      return 'jax'
  return kind


def _fitters(make, config, mesh, formulation: str):
  """The fitters timed in one run, each made by `make(config, mesh)` from a copy of the config that
  differs in fit.formulation only: 'new' (`formulation`, e.g. 'auto': what the fit stage runs) and
  'vmap' (the reference) on `mesh`,
  and with more than one device also 'vmap_one_device': the reference on one device, which is how
  the fit stage used a CPU before the launcher split it into one device per core."""
  out = {}
  meshes = [('new', formulation, mesh), ('vmap', 'vmap', mesh)]
  if mesh.size > 1:
    meshes.append(('vmap_one_device', 'vmap', sharding.make_mesh(config.mesh, jax.devices()[:1])))
  for name, form, m in meshes:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.fit.formulation = form
    out[name] = make(c, m)
  return out


def _time_chunks(fitters: dict, steps: int, targets, n: int, chunk: int, shared, label: str = 'fields',
                 reference_fields: int = -1):
  """Fit n fields in chunks with every fitter (compiled beforehand), alternating fitters chunk by
  chunk so that a noisy machine slows them alike; the reference fitters (all but 'new') stop
  after the chunks that cover `reference_fields` (-1: all n). Returns {name: (quality of the fields
  it fitted, seconds)} and the new path's calls."""
  quality = {k: [] for k in fitters}
  seconds = dict.fromkeys(fitters, 0.0)
  done = dict.fromkeys(fitters, 0)
  calls = 0
  for f in fitters.values():
    f.compile(steps, f.padded_size(chunk), stack.take(targets, np.arange(1)))
  for lo in range(0, n, chunk):
    ids = np.arange(lo, min(n, lo + chunk))
    for name, f in fitters.items():
      if name != 'new' and 0 <= reference_fields <= lo:
        continue
      t0 = time.perf_counter()
      _, _, q = f.fit(steps, stack.take(targets, ids), stack.field_keys(0, ids), shared, pad_to=f.padded_size(chunk))
      seconds[name] += time.perf_counter() - t0
      quality[name].append(q)
      done[name] += len(ids)
    calls += 1
    print(f"  {ids[-1] + 1}/{n} {label} ({', '.join(f'{k} {done[k] / t:.1f}/s' for k, t in seconds.items())})",
          flush=True)
  return {k: (np.concatenate(quality[k]), seconds[k]) for k in fitters}, calls


def _vmap_baseline(result: dict, timed: dict, flops_per_field: float, peak: float, metric: str) -> None:
  """Today's path (jit(vmap(fit_one))) in the same run: its figures and the new path's ratios."""
  q, seconds = timed['vmap']
  n = len(q)  # the reference may have fitted only the first fields (--baseline_vmap_fields)
  result['baseline_vmap_num_fields'] = n
  result['baseline_vmap_fields_per_sec'] = n / seconds
  result[f'baseline_vmap_{metric}_mean'] = float(np.nanmean(q))
  result['baseline_vmap_gflops_achieved'] = flops_per_field * n / seconds / 1e9
  result['baseline_vmap_mfu'] = flops_per_field * n / seconds / 1e9 / peak
  result['speedup_vs_vmap'] = result['fields_per_sec'] / result['baseline_vmap_fields_per_sec']
  if 'vmap_one_device' in timed:
    result['baseline_vmap_one_device_fields_per_sec'] = n / timed['vmap_one_device'][1]
    result['speedup_vs_vmap_one_device'] = result['fields_per_sec'] / result['baseline_vmap_one_device_fields_per_sec']
  new = timed['new'][0][:n]
  diff = np.abs(new - q)
  result[f'{metric}_vs_vmap'] = float(np.nanmean(new)) - result[f'baseline_vmap_{metric}_mean']  # same fields
  tol = {'psnr': 0.01, 'iou': 0.001}[metric]
  result[f'{metric}_abs_diff_per_field'] = {
      'mean': float(np.nanmean(diff)), 'p90': float(np.nanpercentile(diff, 90)), 'max': float(np.nanmax(diff)),
      f'fraction_within_{tol:g}': float(np.mean(diff <= tol))}


def torch_baseline(images: np.ndarray, shared: np.ndarray, spec: mlp.FieldSpec, epochs: int = 250):
  import torch
  torch.manual_seed(0)
  coords = torch.from_numpy(mlp.pixel_centres(28, 28))
  feats_all = _torch_encode(spec, coords)
  psnrs, times = [], []
  for img in images:
    t0 = time.perf_counter()
    net = _torch_field(spec, shared)  # start from the same shared init
    target = torch.from_numpy(img.reshape(-1, 1))
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10, factor=0.95, threshold=1e-5, min_lr=1e-5)
    best, since = float('inf'), 0
    for _ in range(epochs):
      perm = torch.randperm(784)
      total = 0.0
      for s in range(0, 784, 64):
        idx = perm[s:s + 64]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(feats_all[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
      epoch_loss = total / 784
      sched.step(epoch_loss)
      if epoch_loss < best:
        best, since = epoch_loss, 0
      else:
        since += 1
        if since >= 100:
          break
    with torch.no_grad():
      pred = torch.sigmoid(net(feats_all)).numpy()
    times.append(time.perf_counter() - t0)
    psnrs.append(float(-10 * np.log10(((pred - img.reshape(-1, 1)) ** 2).mean())))
  return {'impl': f'torch {torch.__version__}, threads={torch.get_num_threads()}',
          'fields_per_sec': len(images) / sum(times), 'psnr_mean': float(np.mean(psnrs)),
          'num_fields': len(images)}


def jax_per_field_baseline(images: np.ndarray, shared: np.ndarray, spec: mlp.FieldSpec, epochs: int = 250):
  """The same per-field procedure without torch: one field at a time, jitted epoch of 64-pixel steps."""
  import optax
  feats = mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28)))
  opt = optax.inject_hyperparams(optax.adam)(learning_rate=4e-3)

  @jax.jit
  def epoch(params, st, target, key):
    perm = jax.random.permutation(key, 784)
    pad = jnp.concatenate([perm, perm[:64 * 13 - 784]]).reshape(13, 64)

    def step(c, idx):
      p, s = c
      l, g = jax.value_and_grad(lambda q: fitting.field_loss(spec, 'bce', 0.0, q, feats[idx], target[idx]))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), l
    (params, st), losses = jax.lax.scan(step, (params, st), pad)
    return params, st, losses.mean()

  psnrs, times = [], []
  for i, img in enumerate(images):
    t0 = time.perf_counter()
    params = mlp.unflatten(spec, jnp.asarray(shared))
    st = opt.init(params)
    target = jnp.asarray(img.reshape(-1, 1))
    best, since, lr, plateau = float('inf'), 0, 4e-3, 0
    for e in range(epochs):
      params, st, loss = epoch(params, st, target, jax.random.PRNGKey(1000 * i + e))
      loss = float(loss)
      if loss < best * (1 - 1e-5):
        best, since, plateau = loss, 0, 0
      else:
        since += 1
        plateau += 1
        if plateau > 10:
          lr, plateau = max(lr * 0.95, 1e-5), 0
          st.hyperparams['learning_rate'] = jnp.asarray(lr)
        if since >= 100:
          break
    pred = np.asarray(mlp.render_images(spec, mlp.stack(params, 1), 28, 28))[0]
    times.append(time.perf_counter() - t0)
    psnrs.append(float(-10 * np.log10(((pred - img) ** 2).mean())))
  return {'impl': 'jax per-field loop (torch not installed)', 'fields_per_sec': len(images) / sum(times),
          'psnr_mean': float(np.mean(psnrs)), 'num_fields': len(images)}


def torch_shape_baseline(rows, shared: np.ndarray, spec: mlp.FieldSpec, steps: int, per_step: int, lr: float,
                         loss: str, level: float, inside_above: bool):
  """NeF-GPT's ShapeNet fitting loop, one shape at a time: per step `per_step` random points (with
  replacement), Adam, ReduceLROnPlateau per epoch of n // per_step steps; then IoU on held-out points."""
  import torch
  torch.manual_seed(0)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  coords, values, held_pts, held_occ = rows
  ious, times = [], []
  for i in [-1] + list(range(len(coords))):  # -1: a warm-up fit (CUDA context, kernels), not timed
    warmup = i < 0
    i = max(i, 0)
    if device == 'cuda':
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    net = _torch_field(spec, shared, device)  # start from the same shared init
    x = torch.from_numpy(coords[i].astype(np.float32)).to(device)
    y = torch.from_numpy(values[i].astype(np.float32)).to(device)[:, None]
    n = len(x)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10, factor=0.8, threshold=0, min_lr=1e-5)
    epoch = max(1, n // per_step)
    running = torch.zeros((), device=device)
    for s in range(20 if warmup else steps):
      idx = torch.randint(0, n, (per_step,), device=device)
      out = net(_torch_encode(spec, x[idx]))
      if loss == 'bce':
        value = torch.nn.functional.binary_cross_entropy_with_logits(out, y[idx])
      else:
        pred = torch.tanh(out) if spec.output_activation == 'tanh' else out
        value = torch.nn.functional.mse_loss(pred, y[idx])
      opt.zero_grad()
      value.backward()
      opt.step()
      running += value.detach()
      if (s + 1) % epoch == 0:
        sched.step(running.item() / epoch)
        running.zero_()
    with torch.no_grad():
      out = net(_torch_encode(spec, torch.from_numpy(held_pts[i].astype(np.float32)).to(device)))[:, 0]
      out = torch.tanh(out) if spec.output_activation == 'tanh' else out
      inside = (out > level) if inside_above else (out < level)
      occ = torch.from_numpy(held_occ[i] > 0.5).to(device)
      iou = float(((inside & occ).sum() / (inside | occ).sum().clamp(min=1)).item())
    if warmup:
      continue
    times.append(time.perf_counter() - t0)
    ious.append(iou)
    print(f"  torch baseline: shape {i + 1}/{len(coords)} in {times[-1]:.1f}s, IoU {iou:.3f}", flush=True)
  return {'impl': f'torch {torch.__version__} on {device}' + (f', threads={torch.get_num_threads()}' if device == 'cpu'
                                                              else f' ({torch.cuda.get_device_name()})'),
          'fields_per_sec': len(coords) / sum(times), 'iou_mean': float(np.mean(ious)), 'iou': ious,
          'num_fields': len(coords)}


def jax_per_shape_baseline(rows, shared: np.ndarray, spec: mlp.FieldSpec, config, level: float, inside_above: bool):
  """The same per-shape procedure without torch: one shape at a time through a jitted fit_points."""
  coords, values, held_pts, held_occ = rows
  steps = int(config.fit.steps)
  fit_fn = jax.jit(lambda p, x, y, k: fitting.fit_points(spec, config.fit, steps, p, x, y, k, int(config.fit.points_per_step))[0])
  iou_fn = jax.jit(lambda p, x, o: fitting.occupancy_iou(spec, level, inside_above, x, o, p))
  ious, times = [], []
  for i in range(len(coords)):
    t0 = time.perf_counter()
    params = fit_fn(mlp.unflatten(spec, jnp.asarray(shared)), coords[i], values[i], jax.random.PRNGKey(i))
    ious.append(float(iou_fn(params, held_pts[i], held_occ[i])))
    times.append(time.perf_counter() - t0)
  return {'impl': 'jax per-shape loop (torch not installed; includes one compile)',
          'fields_per_sec': len(coords) / sum(times), 'iou_mean': float(np.mean(ious)), 'iou': ious,
          'num_fields': len(coords)}


def _shape_config(args):
  """A shapes fit config with the chosen parity field (every key the shapes modality's fit reads)."""
  import ml_collections
  nefgpt = args.field == 'nefgpt3d'
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
  c.data = ml_collections.ConfigDict({
      'modality': 'shapes', 'source': 'procedural', 'label': 'pm1' if nefgpt else 'occupancy', 'num_fields': args.num_fields,
      'synsets': (), 'mesh_dir': '', 'split_file': '', 'normalize': 'mean', 'num_uniform': args.points // 2,
      'num_surface': args.points - args.points // 2, 'surface_sigma': 0.01, 'num_heldout': args.heldout,
      'cache_dir': ''})
  c.field = ml_collections.ConfigDict({
      'in_dims': 3, 'freqs': (1.0, 2.0) if nefgpt else (1.0, 2.0, 4.0, 8.0), 'use_pi': False, 'include_input': True,
      'hidden': (32, 32, 32, 32) if nefgpt else (128, 128, 128), 'activation': 'gelu' if nefgpt else 'relu',
      'siren_w0': 30.0, 'out_dims': 1, 'output_bias': not nefgpt, 'output_activation': 'tanh' if nefgpt else 'none',
      'init': 'torch_default'})
  per_step = args.points_per_step if args.points_per_step > 0 else (8192 if nefgpt else 2048)
  c.fit = ml_collections.ConfigDict({
      'steps': args.steps, 'lr': args.lr if args.lr > 0 else 1e-2, 'schedule': 'cosine', 'warmup_steps': 0,
      'end_lr_factor': 0.01, 'b1': 0.9, 'b2': 0.999, 'loss': 'mse' if nefgpt else 'bce', 'l2': 0.0,
      'sdf_clamp': 0.0, 'points_per_step': per_step, 'init': 'shared', 'formulation': 'auto', 'shared_init_index': 0,
      'shared_init_steps': args.shared_init_steps, 'shared_init_candidates': 1, 'shared_init_probe': 1,
      'shared_init_l2': 5.0 if nefgpt else -1.0, 'refit_below': 0.0, 'refit_steps_factor': 1,
      'chunk_size': args.chunk_size, 'block_fields': args.block_fields, 'matmul_precision': args.matmul_precision,
      'iou_floor': 0.5, 'num_reconstructions': 0, 'render_resolution': 64})
  return c


def _shape_data(config, args):
  """Procedural shapes from nfjax.data.shapes (half uniform, half near-surface points, as
  HyperDiffusion), or the tests' analytic spheres and boxes (--data=synthetic).

  The procedural points are labelled with occupancy and turned into NeF-GPT's +-1 labels (-1
  inside) here for the nefgpt3d field, so the benchmark does not depend on a pm1 convention."""
  label = config.data.label
  if args.data == 'synthetic':
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from test_fit_shapes import synthetic_shapes
    return synthetic_shapes(args.num_fields, points=args.points, heldout=args.heldout, label=label)
  from nfjax.data import shapes as shape_data
  config.data.label = 'occupancy'
  data = shape_data.load(config, os.path.join(args.cache_dir, f'shapes_{args.num_fields}_{args.points}'))
  config.data.label = label
  if label == 'pm1':
    data.values = 1.0 - 2.0 * data.values
  return data


def main_shape(args):
  config = _shape_config(args)
  checks.validate(config, ('fit',))
  spec = mlp.FieldSpec.from_config(config.field)
  data = _shape_data(config, args)
  rows = shape_modality.check_data(config, spec, data)
  n, k = rows[0].shape[:2]
  mesh = sharding.make_mesh(config.mesh, per_core=True)
  fitters = _fitters(lambda c, m: modalities.get('shapes').make_fitter(spec, c, m, None), config, mesh,
                     args.formulation)
  fitter = fitters['new']
  level, above = shape_modality.surface(spec, config.fit.loss, config.data.label)
  peak = perf.matmul_peak_flops(precision=args.matmul_precision) / 1e9
  print(f"matmul peak {peak:.0f} GFLOP/s; {n} shapes from {data.source}, {k} points each; field "
        f"{args.field} ({spec.num_params} params)", flush=True)

  t0 = time.perf_counter()
  shared, init_info = stack.search_shared_init(fitter, config, rows, 0, shape_modality.IOU)
  init_seconds = time.perf_counter() - t0
  chunk = min(args.chunk_size, n)
  per_step = int(config.fit.points_per_step)
  timed, calls = _time_chunks(fitters, args.steps, rows, n, chunk, shared, 'shapes', args.baseline_vmap_fields)
  iou, seconds = timed['new']
  flops_per_call = 3 * 2 * per_step * sum(o * i for o, i, _ in spec.layer_dims) * args.steps * fitter.padded_size(chunk)
  result = {
      'kind': 'shape', 'field': args.field, 'params_per_field': spec.num_params, 'source': data.source,
      'num_fields': n, 'points_per_shape': int(k), 'steps': args.steps, 'points_per_step': per_step,
      'lr': float(config.fit.lr), 'loss': config.fit.loss, 'label': config.data.label, 'chunk_size': chunk,
      'formulation': fitter.formulation,
      'fields_per_sec': n / seconds, 'seconds': seconds,
      'iou_mean': float(np.nanmean(iou)), 'iou_min': float(np.nanmin(iou)), 'iou_p10': float(np.nanpercentile(iou, 10)),
      'iou_empty_fraction': float(np.mean(~(iou >= 0.01))),  # fields that collapsed to (almost) no inside
      'gflops_achieved': flops_per_call * calls / seconds / 1e9, 'gflops_peak': peak,
      'shared_init_seconds': init_seconds, 'shared_init_iou': float(init_info['candidate_iou'][0]),
      'fields_per_sec_incl_init': n / (seconds + init_seconds), 'compile_seconds': fitter.compile_seconds,
      'device_kind': jax.devices()[0].device_kind, 'num_devices': mesh.size, 'jax': jax.__version__, 'matmul_precision': args.matmul_precision,
  }
  result['mfu'] = result['gflops_achieved'] / peak
  _vmap_baseline(result, timed, flops_per_call / fitter.padded_size(chunk), peak, 'iou')
  kind = _pick_baseline(args.baseline)
  if kind != 'none' and args.baseline_fields > 0:
    print(f"baseline ({kind}) on {args.baseline_fields} shape(s) ...", flush=True)
    pick = np.unique(np.linspace(1, n - 1, args.baseline_fields).astype(int))  # never shape 0 (the init's)
    sub = stack.take(rows, pick)
    if kind == 'torch':
      base = torch_shape_baseline(sub, shared, spec, args.steps, per_step, float(config.fit.lr), config.fit.loss,
                                  level, above)
    else:
      base = jax_per_shape_baseline(sub, shared, spec, config, level, above)
    base['fields'] = pick.tolist()
    base['nfjax_iou_on_same_fields'] = float(np.mean(iou[pick]))
    base['nfjax_iou'] = iou[pick].tolist()
    result['baseline'] = base
    result['speedup_vs_baseline'] = result['fields_per_sec'] / base['fields_per_sec']
    result['iou_vs_baseline'] = base['nfjax_iou_on_same_fields'] - base['iou_mean']
  print(json.dumps(result))


def main_image(args):
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import mnist as mnist_cfg
  config = mnist_cfg.get_config('quick')
  with config.unlocked():
    config.data.num_fields = args.num_fields
    config.fit.steps = args.steps
    config.fit.lr = args.lr if args.lr > 0 else 0.04
    config.fit.chunk_size = args.chunk_size
    config.fit.block_fields = args.block_fields
    config.fit.matmul_precision = args.matmul_precision
  spec = mlp.FieldSpec.from_config(config.field)
  data = image_data.load(config)
  images = data.images
  if len(images) < args.num_fields:  # e.g. 60,000 fields from the offline 5,000 images, for a throughput figure
    print(f"{args.num_fields} fields from {len(images)} distinct images (repeated)", flush=True)
    images = np.resize(images, (args.num_fields,) + images.shape[1:])
  n = len(images)
  targets = images.reshape(n, 784, 1)
  mesh = sharding.make_mesh(config.mesh, per_core=True)
  fitters = _fitters(lambda c, m: stack.StackFitter(
      spec, c, m, psnr_score(spec), feats=mlp.encode(spec, jnp.asarray(mlp.pixel_centres(28, 28))),
      per_step=int(c.fit.pixels_per_step)), config, mesh, args.formulation)
  fitter = fitters['new']

  peak = perf.matmul_peak_flops(precision=args.matmul_precision) / 1e9
  print(f"matmul peak {peak:.0f} GFLOP/s", flush=True)

  # One-off shared init, chosen exactly as the fit stage does (best of fit.shared_init_candidates
  # on probe fits); timed separately: it is paid once per dataset, not per field.
  t0 = time.perf_counter()
  shared, init_info = stack.search_shared_init(fitter, config, targets, 0, modalities.get('images').quality)
  init_seconds = time.perf_counter() - t0
  init_psnr = [init_info['candidate_psnr'][init_info['chosen']]]

  chunk = min(args.chunk_size, n)
  timed, calls = _time_chunks(fitters, args.steps, targets, n, chunk, shared, reference_fields=args.baseline_vmap_fields)
  psnr, seconds = timed['new']
  # Analytic FLOPs (XLA's cost analysis counts a scan body once): per field and step, the forward
  # pass is 2 * pixels * sum(out * in) over the layers, the backward pass about twice that.
  flops_per_call = 3 * 2 * 784 * sum(o * i for o, i, _ in spec.layer_dims) * args.steps * fitter.padded_size(chunk)
  result = {
      'num_fields': n, 'distinct_images': len(data.images), 'steps': args.steps, 'lr': float(config.fit.lr),
      'chunk_size': chunk, 'formulation': fitter.formulation,
      'fields_per_sec': n / seconds, 'seconds': seconds,
      'psnr_mean': float(np.nanmean(psnr)), 'psnr_min': float(np.nanmin(psnr)),
      'psnr_p10': float(np.nanpercentile(psnr, 10)),
      'gflops_achieved': flops_per_call * calls / seconds / 1e9, 'gflops_peak': peak,
      'shared_init_seconds': init_seconds, 'shared_init_psnr': float(init_psnr[0]),
      'fields_per_sec_incl_init': n / (seconds + init_seconds),
      'compile_seconds': fitter.compile_seconds,
      'device_kind': jax.devices()[0].device_kind, 'num_devices': mesh.size,
      'jax': jax.__version__, 'matmul_precision': args.matmul_precision,
  }
  result['mfu'] = result['gflops_achieved'] / peak
  _vmap_baseline(result, timed, flops_per_call / fitter.padded_size(chunk), peak, 'psnr')

  kind = _pick_baseline(args.baseline)
  if kind != 'none' and args.baseline_fields > 0:
    print(f"baseline ({kind}) on {args.baseline_fields} field(s) ...", flush=True)
    fn = torch_baseline if kind == 'torch' else jax_per_field_baseline
    # Fields spread over the set, never field 0 (the shared init was fitted on it).
    pick = np.unique(np.linspace(1, n - 1, args.baseline_fields).astype(int))
    base = fn(images[pick], shared, spec)
    base['fields'] = pick.tolist()
    base['nfjax_psnr_on_same_fields'] = float(np.mean(psnr[pick]))
    result['baseline'] = base
    result['speedup_vs_baseline'] = result['fields_per_sec'] / base['fields_per_sec']
    # On the same fields: a handful of baseline fields is not the 1,000-field mean's sample.
    result['psnr_vs_baseline_db'] = base['nfjax_psnr_on_same_fields'] - base['psnr_mean']
  print(json.dumps(result))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--kind', choices=('image', 'shape'), default='image')
  ap.add_argument('--field', choices=('nefgpt3d', 'hyperdiffusion'), default='nefgpt3d', help='--kind=shape only')
  ap.add_argument('--num_fields', type=int, default=1000)
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--lr', type=float, default=-1.0, help='-1: 0.04 for images, 1e-2 (both references) for shapes')
  ap.add_argument('--chunk_size', type=int, default=50)   # = the quick preset's fit.chunk_size
  ap.add_argument('--formulation', default='auto', help="the new path's fit.formulation (auto: what the fit stage runs)")
  ap.add_argument('--matmul_precision', default='highest', choices=fitting.MATMUL_PRECISIONS,
                  help="fit.matmul_precision of both paths and the peak's matmul ('default': JAX's, TF32 on a GPU)")
  ap.add_argument('--block_fields', type=int, default=0, help="fit.block_fields of 'blocked' (0: from the cache size)")
  ap.add_argument('--baseline_fields', type=int, default=5)
  ap.add_argument('--baseline', choices=('auto', 'torch', 'jax', 'none'), default='auto')
  ap.add_argument('--baseline_vmap_fields', type=int, default=-1,
                  help='time the vmap reference on the first N fields only (whole chunks; -1 = all)')
  # --kind=shape only:
  ap.add_argument('--points_per_step', type=int, default=-1, help='-1: the field\'s reference (8192 / 2048)')
  ap.add_argument('--shared_init_steps', type=int, default=1000)
  ap.add_argument('--points', type=int, default=20000, help='training points per shape (synthetic data)')
  ap.add_argument('--heldout', type=int, default=20000, help='held-out IoU points per shape (synthetic data)')
  ap.add_argument('--data', choices=('procedural', 'synthetic'), default='procedural',
                  help='procedural: nfjax.data.shapes; synthetic: analytic spheres and boxes')
  ap.add_argument('--cache_dir', default='/tmp/nfjax_fit_benchmark', help='procedural point cache')
  ap.add_argument('--cpu_devices', type=int, default=0,
                  help='on a CPU: devices to make of it, as the launcher\'s --cpu_devices (0 = one per core)')
  args = ap.parse_args()
  sharding.split_cpu(args.cpu_devices)
  if args.kind == 'shape':
    main_shape(args)
  else:
    main_image(args)


if __name__ == '__main__':
  main()
