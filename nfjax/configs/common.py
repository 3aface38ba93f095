"""What every pipeline config shares: mesh, the modality-free fit keys, tokenize, model, train, sample,
and the frame of evaluate. configs/mnist.py (images) and configs/shapes.py (shapes) build on it:

  c = common.get_config(preset, modality='images')   # 'smoke' | 'quick' | 'parity' presets of the shared sections
  c.data.source = ...; c.field = ...; c.fit.psnr_floor = ...; c.evaluate.classifier = ...
  c.lock()

Keys that exist in every pipeline config (../DESIGN.md): seed, data.modality, data.source,
data.num_fields, fit.steps, train.steps, sample.num_samples. Validation of the whole config, once
per launch: nfjax/configs/checks.py.
"""

import ml_collections

PRESETS = ('smoke', 'quick', 'parity')


def get_config(preset: str, modality: str) -> ml_collections.ConfigDict:
  """The shared sections for `preset` (one of PRESETS), unlocked: the caller adds its modality's keys."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; shared presets are {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0

  # Devices: one mesh for every stage. -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.model = 1

  c.data = ml_collections.ConfigDict()
  c.data.modality = modality       # the kind of field (nfjax/modalities/): images | shapes | a registered plug-in
  c.data.source = ''               # the modality's data source
  c.data.num_fields = -1           # how many examples to fit; -1 = all

  # fit: data -> fields/ (nfjax/stages/fit.py, nfjax/fields/). The modality adds its own keys
  # (images: pixels_per_step, psnr_floor; shapes: points_per_step, iou_floor, ...).
  c.fit = ml_collections.ConfigDict()
  c.fit.steps = 1000               # Adam steps per field
  c.fit.lr = 3e-2
  c.fit.schedule = 'cosine'        # cosine | constant
  c.fit.warmup_steps = 0
  c.fit.end_lr_factor = 0.01       # cosine ends at lr * end_lr_factor
  c.fit.b1 = 0.9
  c.fit.b2 = 0.999
  c.fit.loss = 'bce'               # bce (logits) | mse | l1 (after output_activation)
  c.fit.l2 = 0.0                   # NeF-GPT's penalty l2 * ||theta||_2 / P
  # A pull back to where each field's fit started (the shared init): anchor * mean((theta - theta_0)^2)
  # added to the loss. Weights the data does not need stay at the init, where every field's tokens
  # agree. 0 = off (on the quick preset 0.03 cost 0.7 dB and made the samples worse: benchmarks/RESULTS.md).
  c.fit.anchor = 0.0
  c.fit.init = 'shared'            # shared (NeF-GPT's "conditioned" init) | random
  # Prototype inits: each class's images (shapes: their voxelised occupancy) are clustered (k-means, this
  # many clusters per class), a field is fitted to every cluster's mean (shapes: the member nearest it)
  # from the shared init, and every field starts from its own cluster's prototype instead of the one
  # shared init (fields/prototypes.npz). With 1 per class
  # a class's fields stay in one class-shaped basin: on MNIST quick the samples' class consistency went
  # from 0.73 to 0.97. More per class pay only with the GPT conditioned on the prototype
  # (tokenize.condition='prototype'; without it 3 or 10 per class were worse than none): 8 per class,
  # each fitted to a real digit (fit.prototype_target='medoid' below), give the quick preset its
  # coverage (benchmarks/RESULTS.md, issue 15). The tokenizer still codes
  # w - shared init. 0 = off: every field starts from the shared init.
  c.fit.prototypes = 0
  # What each prototype field is fitted to: 'mean' (the cluster's mean target: a blurred average image),
  # 'medoid' (the member of the cluster's class nearest that mean: a real example) or 'auto' (the mean
  # where the modality can fit one: images; shapes always the medoid, a mean occupancy is no shape). On
  # MNIST quick the medoid took class consistency from 0.91 to 0.95 and FD from 41 to 20 at the same
  # grid (benchmarks/RESULTS.md, issue 15).
  c.fit.prototype_target = 'auto'
  c.fit.shared_init_index = 0      # which field (position in the dataset) seeds the init
  c.fit.shared_init_steps = 3000
  # The shared init matters (+-1 dB mean PSNR between random seeds on MNIST): fit this many
  # candidates from different seeds and keep the one whose probe fits (fit.steps on a seeded subset
  # of fields) reach the best mean quality. 1 = NeF-GPT's single init.
  c.fit.shared_init_candidates = 8
  c.fit.shared_init_probe = 64
  # Second chance for hard fields: refit those under this quality with refit_steps_factor x steps
  # (from the shared init, new optimiser run) and keep whichever result is better. 0 = off.
  c.fit.refit_below = 24.0
  c.fit.refit_steps_factor = 4
  c.fit.formulation = 'auto'       # auto | stacked (a chunk in big matrix products, nfjax/fields/stacked.py) |
                                   # blocked (a cache-sized block of fields at a time; point fields by
                                   # stacked.fit_point_field, the backward written out) | vmap (the reference)
  # Precision of the fit's float32 matrix products. 'highest' = true float32 everywhere. 'default'
  # lets a GPU use TF32 tensor cores (10-bit mantissas): 1.3x faster on an H200, but it moved single
  # fields' PSNR by 0.35 dB on average (up to 9.7) between two formulations of the same fit, against
  # 0.03 dB in float32, and cost 0.3 dB of mean PSNR (benchmarks/RESULTS.md, GPU runs). CPUs compute
  # float32 either way.
  c.fit.matmul_precision = 'highest'  # highest | high | default
  c.fit.block_fields = 0           # fields per block of 'blocked' on each device; 0 = from the cache size
  c.fit.chunk_size = 50            # fields per resumable chunk and compiled call (2-core CPU: 50 keeps the
                                   # activations in cache, 1.25x the fields/s of 500; GPUs want thousands)
  c.fit.num_reconstructions = 20   # fields shown in the fit stage's picture

  # tokenize: fields/ -> tokenizer/ + tokens/ (nfjax/stages/tokenize.py, nfjax/tokenizers/, docs/tokenize.md).
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
  # Leave out of the sequences every token position that holds one token in all training fields (the
  # weights of neurons dead in the shared init never move: 99 of MNIST's 561 slots); they decode to
  # that token. Shorter sequences, the same tokens elsewhere. docs/tokenize.md.
  c.tokenize.drop_constant = False
  # What each sequence's conditioning token names: 'class', or 'prototype' (needs fit.prototypes > 0):
  # the prototype its field started from, so the transformer learns p(w | prototype) and a class is
  # sampled by drawing one of its prototypes with its share of the training fields. Several prototypes
  # per class then stop competing inside one sample (benchmarks/RESULTS.md, issue 15).
  c.tokenize.condition = 'class'
  c.tokenize.num_examples = 16        # fields shown in tokenizer/reconstructions.png

  # model + train: tokens/ -> transformer/ (nfjax/stages/train.py, nfjax/training/, nfjax/models/, docs/train.md).
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
  # How that table starts: zeros | histogram (each class's per-slot log token frequencies in the
  # training split: the model starts at the no-structure row and learns the joint structure on top).
  c.model.class_bias_init = 'zeros'
  # With 'histogram': how thin counts are smoothed. 0 = add 0.1 to every code's count; > 0 = that many
  # pseudo-counts spread as the pooled histogram of all classes at the slot (a hierarchical prior: on
  # the MNIST quick preset's 80 prototypes of ~56 training sequences each, 30 takes the table's
  # held-out cross-entropy from 4.21 to 3.88 nats per token and the trained GPT's from 3.83 to 3.74, its
  # samples the same within their spread; no preset sets it: benchmarks/RESULTS.md, issue 15).
  c.model.class_bias_prior = 0.0
  c.model.position = 'learned'     # learned | rope
  c.model.rope_base = 10000.0
  c.model.bias = True
  c.model.ln_eps = 1e-5
  c.model.init_std = 0.02
  c.model.dtype = 'float32'        # compute dtype: float32 | bfloat16 (params stay float32)
  # How attention is computed: auto (cuDNN flash attention for training on a GPU in bf16, else einsum) |
  # einsum (the reference; the faster on CPU) | xla | cudnn (jax.nn.dot_product_attention). All agree to
  # float rounding: not in the train stage's fingerprint, nor in checkpoints (nfjax/models/gpt.py).
  c.model.attention = 'auto'
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
  # Classifier-free guidance: the share of training sequences whose class token (the input; targets
  # keep it) is replaced by a learned null class, drawn per sequence from (seed, step). > 0 adds the
  # null class to the model (one token id, + a class_bias row) and lets sample.settings carry a
  # guidance scale. 0 = off (the model and every artifact as without the key). Typical: 0.1.
  c.train.class_dropout = 0.0
  c.train.eval_every = 250         # eval loss on the val split every N steps (and at the end)
  c.train.eval_batches = 8         # val batches per eval; -1 = the whole val split
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = True
  c.train.init_from = ''           # a checkpoints/ dir to start the parameters from (fresh optimiser)
  # A jax.profiler trace of train steps [profile_start_step, + profile_num_steps) into
  # WORKDIR/transformer/profile (TensorBoard's profile plugin, Perfetto); 0 steps = off.
  c.train.profile_start_step = 10
  c.train.profile_num_steps = 0

  # sample: transformer/ + tokenizer/ -> samples/ (nfjax/stages/sample.py, nfjax/sampling.py).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 250       # per setting (4 settings: 1,000 samples); classes cycle 0, 1, 2, ...
  c.sample.batch_size = 250        # rows per compiled call (one compile for the whole grid)
  # (top_k, temperature, top_p): NeF-GPT's grid, top-k {3, 5} x T {0.8, 1.0}. top_k 0 = off,
  # temperature 0 = greedy, top_p 1 = off. An optional 4th element is the classifier-free guidance
  # scale g (default 1 = plain conditional sampling): logits = uncond + g * (cond - uncond), before
  # temperature and filters; g != 1 needs a model trained with train.class_dropout > 0 and names the
  # setting with a suffix (topk3_t0.8_g2); g = 0 samples unconditionally.
  c.sample.settings = ((3, 0.8, 1.0), (3, 1.0, 1.0), (5, 0.8, 1.0), (5, 1.0, 1.0))
  c.sample.use_cache = True        # False: recompute the whole prefix per token (NeF-GPT's way)
  c.sample.beam_width = 0          # > 0 adds a setting 'beam<W>': the most likely field per class
  # Which codes a weight slot may take: 'all' (every code) or 'training' (only the codes the training
  # sequences of the sample's class -- or prototype, tokenize.condition -- use at that slot, the support
  # the no_structure row draws from; before temperature and filters, every setting of the grid).
  c.sample.support = 'all'


  # evaluate: samples/ + fields/ -> eval/ (nfjax/stages/evaluate.py, nfjax/evaluate/protocol.py); the
  # modality adds its metrics' keys.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_samples = -1      # samples per setting to evaluate; -1 = all the sample stage wrote
  c.evaluate.num_reference = -1    # training examples the sets are compared with; -1 = the modality's default
  c.evaluate.baseline_noise = 0.1  # trivial baseline: training fields + N(0, (noise * std_j)^2)
  c.evaluate.headline_top_k = 3    # the setting whose numbers are the summary's headline
  c.evaluate.headline_temperature = 0.8
  c.evaluate.headline_guidance = 1.0   # ... and guidance scale (1 = none; a setting's 4th element)
  c.evaluate.num_neighbours = 16   # samples shown beside their nearest neighbours per PNG
  # Presets of the shared sections (the modality's config adds its own).
  if preset == 'smoke':
    c.sample.num_samples = 20
    c.sample.batch_size = 20
    c.sample.settings = ((3, 0.8, 1.0), (0, 1.0, 1.0))
  elif preset == 'parity':
    c.sample.num_samples = 1000

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

  return c
