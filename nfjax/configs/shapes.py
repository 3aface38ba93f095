r"""3D shapes: occupancy fields of meshes -> tokens -> GPT -> sampled fields -> meshes.

The same five stages as configs/mnist.py, on the same shared sections (nfjax/configs/common.py);
shapes (nfjax/modalities/shapes/) only change the data source, the field architecture, the fit
targets and the evaluator.

Presets (pick one with `--config=shapes:PRESET` from anywhere, or `--config=configs/shapes.py:PRESET` in a checkout):

  smoke   Seconds on any CPU: 16 procedural shapes, tiny field, a few steps per stage. What the
          tests use; its numbers mean nothing.

  quick   The whole pipeline on the offline procedural family (4 classes: plane, chair, table,
          lamp; nfjax/data/procedural.py) on a 2-core laptop/CI CPU, within 20 minutes:
            python -m nfjax.main --config=configs/shapes.py:quick --workdir=/tmp/nfjax_shapes
          A small occupancy field (2 x 24 ReLU, 1,297 parameters) keeps the token sequences short
          enough for a CPU GPT. Measured figures: README and benchmarks/RESULTS.md.

  parity  NeF-GPT's ShapeNet setting: its 3,712-parameter field (sin/cos at 1, 2 + raw input -> 15
          features, 4 x 32 GELU, tanh output without bias, MSE on -1 inside / +1 outside), residual
          scalar VQ with 127 codes (vocabulary 127 + SOS = 128: one category, no class token), the medium GPT (width 384, 16 heads,
          7 layers, context 3,712). Real meshes: ShapeNet planes (synset 02691156) under data.mesh_dir:
            python -m nfjax.main --config=configs/shapes.py:parity --workdir=DIR \
                --config.data.mesh_dir=/data/ShapeNetCore.v2 --config.data.split_file=train_split.lst
          Sized for one GPU / TPU host. `--config.data.source=procedural` runs it offline.
          HyperDiffusion's 36,737-parameter field: `--config=configs/shapes.py:parity_hd`.

Any key can be overridden: `--config.data.num_fields=64 --config.fit.steps=200`.
"""

import ml_collections

from nfjax.configs import common

PRESETS = ('smoke', 'quick', 'parity', 'parity_hd')


def _field(freqs, hidden, activation='relu', output_bias=True, output_activation='none'):
  f = ml_collections.ConfigDict()
  f.in_dims = 3
  f.freqs = tuple(freqs)
  f.use_pi = False
  f.include_input = True
  f.hidden = tuple(hidden)
  f.activation = activation
  f.siren_w0 = 30.0
  f.out_dims = 1
  f.output_bias = output_bias
  f.output_activation = output_activation
  f.init = 'torch_default'
  return f


def get_config(arg=None):
  preset = arg or 'quick'
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/shapes.py; use {', '.join(PRESETS)}")
  c = common.get_config('parity' if preset.startswith('parity') else preset, modality='shapes')
  c.preset = preset

  # data: nfjax/data/shapes.py, docs/shapes_data.md (the shapes modality: nfjax/modalities/shapes/).
  c.data.source = 'procedural'     # procedural (offline, nfjax/data/procedural.py) | meshes (a directory)
  c.data.mesh_dir = ''             # meshes: OBJ/PLY/OFF files, class folders or ShapeNet's synset layout
  c.data.synsets = ()              # meshes: synset ids / names to use (procedural: class names); () = all
  c.data.split_file = ''           # HyperDiffusion-style list of model ids to keep ('' = all)
  c.data.num_fields = 512          # shapes to fit; -1 = all meshes (procedural needs a count)
  c.data.normalize = 'mean'        # mean (HyperDiffusion/NeF-GPT: vertex mean, max |x| = 0.475) | bbox
  c.data.num_uniform = 16_384      # uniform points in [-0.5, 0.5]^3 per shape (parity: 100k)
  c.data.num_surface = 16_384      # surface samples + N(0, surface_sigma^2) per shape (parity: 100k)
  c.data.surface_sigma = 0.01
  c.data.num_heldout = 8192        # extra uniform points per shape for the held-out IoU
  c.data.label = 'occupancy'       # occupancy (winding number > 0.5) | sdf | pm1 (NeF-GPT: -1 inside)
  c.data.pm1_shell = 0.005         # pm1: -1 also within this distance outside the surface (NeF-GPT's sd <= 0.005)
  c.data.cache_dir = ''            # '' = WORKDIR/shape_data (points computed once, reused)
  c.data.cache_chunk = 32

  # 1,297 params: (1, 2, 4, 8) + raw -> 27 features, 2 x 24 ReLU, occupancy logit. Short enough
  # token sequences for a CPU GPT; thin parts (chair legs, wing tips) are where it loses IoU. The
  # 2 x 32 field (1,985 params) fits no better (IoU 0.73 against 0.74) and costs 1.4x per GPT step.
  c.field = _field((1.0, 2.0, 4.0, 8.0), (24, 24))

  fit = c.fit
  fit.steps = 1000
  fit.lr = 1e-2
  fit.points_per_step = 1024
  fit.loss = 'bce'
  fit.l2 = 0.0
  fit.sdf_clamp = 0.0
  fit.shared_init_l2 = -1.0        # lambda for the shared-init fit only (NeF-GPT: 5.0); -1 = fit.l2
  fit.shared_init_steps = 2000
  fit.shared_init_candidates = 4
  fit.shared_init_probe = 32
  fit.refit_below = 0.0
  fit.refit_steps_factor = 2
  fit.chunk_size = 64
  fit.iou_floor = 0.3              # fields under this held-out IoU are flagged, never mixed in
  fit.num_reconstructions = 16
  fit.render_resolution = 64

  c.sample.num_samples = 100       # per setting; classes cycle
  c.sample.batch_size = 100
  c.sample.mesh_resolution = 64    # marching-cubes grid of sampled fields (parity: 256)
  c.sample.mesh_files = 16         # PLY files per setting (samples/<setting>/meshes/); 0 = none
  c.sample.meshes_npz = True       # every sample's mesh in samples/<setting>/meshes.npz (the evaluate
                                   # stage reuses them when evaluate.mesh_resolution is the same)

  # evaluate (shapes): HyperDiffusion's protocol (nfjax/modalities/shapes/evaluate.py,
  # nfjax/evaluate/shape_metrics.py, docs/shapes_eval.md). evaluate.num_reference -1 = floor(samples / 1.1).
  c.evaluate.points_per_cloud = 2048
  c.evaluate.normalize = 'shape_unit'   # HyperDiffusion: per-cloud mean and std
  c.evaluate.mesh_resolution = 64       # grid for meshing sampled and reference fields (HD: 356 at logit 1.386)
  c.evaluate.occupancy_level = 0.5      # logit fields: mesh where p = this (0.5 = the fields' surface; HD: 0.8)
  c.evaluate.bootstrap = False          # NeF-GPT's 32-vs-32 bootstrap as well
  c.evaluate.pointnet_weights = ''      # FPD: PointNet++ SSG ModelNet40 checkpoint (best_model.pth of
                                        # yanx27/Pointnet_Pointnet2_pytorch, pointnet2_ssg_wo_normals;
                                        # read without torch); '' = not computed (said in the summary)
  c.evaluate.num_neighbours = 8

  c.tokenize.num_codes = 255
  c.tokenize.encoder = 'nearest'   # 'compensated' measures errors on image pixels (image fields only)

  if preset == 'smoke':
    c.data.num_fields = 16
    c.data.num_uniform = 2048
    c.data.num_surface = 2048
    c.data.num_heldout = 1024
    c.data.cache_chunk = 8
    c.field = _field((1.0, 2.0), (16,))          # 273 params
    fit.steps = 150
    fit.points_per_step = 512
    fit.shared_init_steps = 150
    fit.shared_init_index = 11       # shape 0 (a thin plane) fits empty with this tiny field
    fit.shared_init_candidates = 1
    fit.chunk_size = 8
    fit.iou_floor = 0.0
    fit.num_reconstructions = 4
    fit.render_resolution = 24
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.sample.mesh_resolution = 24
    c.evaluate.mesh_resolution = 24
    c.evaluate.points_per_cloud = 256
    c.evaluate.num_neighbours = 4
    c.tokenize.num_codes = 63
  elif preset == 'quick':
    # 512-point clouds: a Chamfer pair costs ~0.26 ms on a 2-core CPU (2048 points: ~4.4 ms, which
    # would make the evaluate stage ~30 minutes); HyperDiffusion's 2048 in the other presets.
    c.evaluate.points_per_cloud = 512
    # 1,299-token sequences: ~1.2 steps/s (13k tokens/s) on 2 cores with block-causal attention. 360
    # steps: MMD-CD 29.8 +- 1.4 over four training seeds against 34.9 for 200 steps of the 2 x 32
    # field in more minutes; 480 were not better in two seeds (benchmarks/RESULTS.md, issue 15).
    c.train.steps = 360
    c.train.batch_size = 8
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    # 460 training sequences: the GPT memorises them (train loss 2.3, eval 2.9) and, from a zero
    # class x position bias, never gets near the per-slot histograms in its few steps (COV 0.10).
    # Started at those histograms (the no_structure row), with dropout, and sampled plainly (top-k
    # 0, T 1: top-k 3 / T 0.8 trade coverage for sharpness here) it covers the references as well
    # as no_structure does, with a better 1-NNA (benchmarks/RESULTS.md, issue 15).
    c.model.class_bias_init = 'histogram'
    c.model.dropout = 0.1
    # Then (issue 15) 8 prototype starts per class (fit.prototypes: each class's shapes clustered on
    # their voxelised occupancy, a field fitted to every cluster's medoid), the GPT conditioned on the
    # prototype: fields IoU 0.82 instead of 0.71, and at top-k 5, T 1 over three draws COV 0.51,
    # 1-NNA 0.79, MMD-CD 15.4 against 0.48 / 0.87 / 29.6 for the preset before at top-k 0, T 1
    # (benchmarks/RESULTS.md, issue 15). The no_structure row is drawn per prototype too, and is
    # as strong: 0.53 / 0.71 / 15.6.
    # Then every slot limited to the codes its prototype's training sequences hold there
    # (sample.support='training', the support the no_structure row draws from): the full distribution
    # no longer draws the tail codes that ruined fields (top-k 0, T 1 MMD-CD 29 before), so it can be
    # sampled whole. Top-k 0, T 0.85 over four draws: COV 0.58, 1-NNA 0.72, MMD-CD 15.1; T 0.9 over
    # six 0.55 / 0.74 / 15.5; top-k 5, T 1 (the headline before) 0.50 / 0.77 / 15.9; no_structure over
    # six draws 0.53 / 0.71 / 15.4 (benchmarks/RESULTS.md, issue 15).
    c.fit.prototypes = 8
    c.tokenize.condition = 'prototype'
    c.sample.support = 'training'
    c.sample.settings = ((0, 0.85, 1.0), (0, 0.9, 1.0), (5, 1.0, 1.0), (3, 0.8, 1.0))
    c.evaluate.headline_top_k = 0
    c.evaluate.headline_temperature = 0.85
    c.sample.num_samples = 64        # per setting (4 settings: 256 samples)
    c.sample.batch_size = 64
  elif preset.startswith('parity'):
    c.data.source = 'meshes'
    c.data.synsets = ('02691156',)   # ShapeNet planes
    c.data.num_fields = -1
    c.data.num_uniform = 100_000
    c.data.num_surface = 100_000
    c.data.num_heldout = 20_000
    fit.steps = 7200
    fit.chunk_size = 1024
    fit.shared_init_candidates = 1
    fit.iou_floor = 0.5
    c.sample.num_samples = 1000
    c.sample.mesh_resolution = 256
    c.sample.meshes_npz = False      # ~1 MB per plane mesh at 256^3: the evaluate stage meshes again
    c.evaluate.mesh_resolution = 256
    if preset == 'parity':
      # NeF-GPT's field and loss.
      c.field = _field((1.0, 2.0), (32, 32, 32, 32), 'gelu', output_bias=False, output_activation='tanh')
      c.data.label = 'pm1'
      fit.loss = 'mse'
      fit.points_per_step = 8192
      fit.shared_init_l2 = 5.0
      fit.shared_init_steps = 7200
      # NeF-GPT ShapeNet tokens: residual scalar VQ, 127 codes + SOS = vocabulary 128 (no class
      # tokens: one category).
      c.tokenize.residual = True
      c.tokenize.num_codes = 127
      # NeF-GPT's medium GPT: width 384, 16 heads, 7 layers, context = 3,712 weights.
      c.model.embed_dim = 384
      c.model.num_heads = 16
      c.model.num_layers = 7
    else:
      # HyperDiffusion's field: sin/cos at 1, 2, 4, 8 + raw -> 27, 3 x 128 ReLU, occupancy logit, BCE.
      c.field = _field((1.0, 2.0, 4.0, 8.0), (128, 128, 128))
      fit.points_per_step = 2048
      fit.chunk_size = 512
      # HyperDiffusion's test meshes: 356^3 at p = 0.8 (logit 1.386).
      c.evaluate.mesh_resolution = 356
      c.evaluate.occupancy_level = 0.8
  c.lock()
  return c
