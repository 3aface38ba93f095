"""Config validation: every check that needs neither data nor compilation, once per launch.

`validate(config, stages)` runs the checks of the shared sections (mesh, fit, tokenize, model,
train, sample, evaluate) for the selected stages and the modality's own checks (its data, field
and metric keys: `Modality.validate`). The pipeline runner calls it before any stage reads data;
each stage's `run` calls it too, which is free inside the launch that already did (`launch`).
"""

from __future__ import annotations

import contextlib

import jax

from nfjax import checkpoint as ckpt_lib
from nfjax import config as config_lib
from nfjax import modalities, sharding, tokenizers
from nfjax.errors import ConfigError
from nfjax.evaluate import protocol
from nfjax.fields import fitting
from nfjax.io import files
from nfjax.models import gpt as gpt_lib
from nfjax.models.regression import LOSSES

STAGES = ('fit', 'tokenize', 'train', 'sample', 'evaluate')
MODEL_KINDS = ('gpt', 'regression')
CLASS_TOKEN = ('auto', 'yes', 'no')
CONDITION = ('class', 'prototype')   # tokenize.condition: what the sequences' conditioning token names
# (config JSON, stage) pairs validated by the launch in progress (`launch`); empty between launches.
_launch: set[tuple[str, str]] = set()


def validate(config, stages=STAGES) -> None:
  """Check the config for `stages` (names); ConfigError naming the key. Inside
  `launch(config, stages)` the stages it covers are not checked again."""
  key = config_lib.to_json(config)
  todo = frozenset(s for s in stages if (key, s) not in _launch)
  if not todo:
    return
  sharding.mesh_shape(config.mesh)
  modalities.for_config(config).validate(config, todo)
  for stage in STAGES:
    if stage in todo:
      _CHECKS[stage](config)
  if {'train', 'sample'} <= todo:
    _guidance_needs_a_null_class(config)
  if {'fit', 'evaluate'} <= todo:
    _enough_fields_to_evaluate(config)


@contextlib.contextmanager
def launch(config, stages):
  """Validate once for the whole launch: every stage's own `validate` call inside is free."""
  validate(config, stages)
  key = config_lib.to_json(config)
  added = {(key, s) for s in stages} - _launch
  _launch.update(added)
  try:
    yield
  finally:
    _launch.difference_update(added)


def _fit(config) -> None:
  fitting.validate(config)
  config_lib.check_positive(config, 'fit.num_reconstructions', allow_zero=True)


def _tokenize(config) -> None:
  if 'tokenize' not in config:
    raise ConfigError("the config has no 'tokenize' section (see nfjax/configs/common.py)")
  tokenizers.Settings.from_config(config.tokenize).validate()
  specials = tuple(config.tokenize.specials)
  if 'sos' not in specials:
    raise ConfigError(f"config key tokenize.specials={specials!r} must contain 'sos' (sequences start with it)")
  if len(set(specials)) != len(specials):
    raise ConfigError(f"config key tokenize.specials={specials!r} has duplicates")
  vf = float(config.tokenize.val_fraction)
  if not 0.0 <= vf < 1.0:
    raise ConfigError(f"config key tokenize.val_fraction={vf!r} must be in [0, 1)")
  config_lib.check_positive(config, 'tokenize.num_examples', allow_zero=True)
  config_lib.check_choice(config, 'tokenize.class_token', CLASS_TOKEN)
  if 'drop_constant' in config.tokenize:
    config_lib.check_choice(config, 'tokenize.drop_constant', (True, False))
  if 'condition' in config.tokenize:
    config_lib.check_choice(config, 'tokenize.condition', CONDITION)
    if config.tokenize.condition == 'prototype':
      if 'fit' in config and fitting.prototypes_of(config.fit) == 0:
        raise ConfigError("config key tokenize.condition='prototype' conditions the transformer on the prototype "
                          "each field started from: set fit.prototypes > 0 (e.g. 3), or tokenize.condition='class'")
      if config.tokenize.class_token == 'no':
        raise ConfigError("config key tokenize.condition='prototype' needs the conditioning token: set "
                          "tokenize.class_token='auto' (or 'yes'), or tokenize.condition='class'")


def _train(config) -> None:
  m, t = config.model, config.train
  config_lib.check_choice(config, 'model.kind', MODEL_KINDS)
  for key in ('model.num_layers', 'model.num_heads', 'model.embed_dim', 'model.mlp_ratio'):
    config_lib.check_positive(config, key)
  for key in ('model.vocab_size', 'model.block_size'):
    config_lib.check_positive(config, key, allow_minus_one=True)
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config key model.dropout={m.dropout!r} must be in [0, 1)")
  if m.embed_dim % m.num_heads:
    raise ConfigError(f"config key model.embed_dim={m.embed_dim} is not a multiple of model.num_heads={m.num_heads}")
  config_lib.check_choice(config, 'model.position', gpt_lib.POSITIONS)
  if m.position == 'rope' and (m.embed_dim // m.num_heads) % 2:
    raise ConfigError(f"model.position='rope' needs an even head dimension; embed_dim/num_heads = "
                      f"{m.embed_dim // m.num_heads}")
  config_lib.check_choice(config, 'model.dtype', tuple(gpt_lib.DTYPES))
  if 'attention' in m:
    config_lib.check_choice(config, 'model.attention', gpt_lib.ATTENTION)
    if m.attention == 'cudnn':
      head_dim = m.embed_dim // m.num_heads
      if jax.default_backend() != 'gpu':
        raise ConfigError(f"config key model.attention='cudnn' needs a GPU (this backend is "
                          f"{jax.default_backend()}); use 'auto', 'xla' or 'einsum'")
      if m.dtype != 'bfloat16':
        raise ConfigError(f"config key model.attention='cudnn' needs model.dtype='bfloat16' (it is {m.dtype!r}); "
                          f"set --config.model.dtype=bfloat16 or use model.attention='auto'")
      if head_dim > gpt_lib.CUDNN_MAX_HEAD_DIM:
        raise ConfigError(f"config key model.attention='cudnn' takes heads of at most {gpt_lib.CUDNN_MAX_HEAD_DIM} "
                          f"(model.embed_dim / model.num_heads = {head_dim}); use more heads or "
                          f"model.attention='auto'")
  config_lib.check_choice(config, 'model.regression_loss', LOSSES)
  for key in ('train.steps', 'train.batch_size', 'train.lr', 'train.grad_accum', 'train.eval_every',
              'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints'):
    config_lib.check_positive(config, key)
  for key in ('train.warmup_steps', 'train.end_lr', 'train.weight_decay', 'train.grad_clip', 'train.eps') + tuple(
      k for k in ('train.profile_start_step', 'train.profile_num_steps') if k.split('.')[1] in t):
    config_lib.check_positive(config, key, allow_zero=True)
  config_lib.check_positive(config, 'train.decay_steps', allow_minus_one=True)
  config_lib.check_positive(config, 'train.eval_batches', allow_minus_one=True)
  for key in ('train.b1', 'train.b2'):
    if not 0.0 <= config_lib.get(config, key) < 1.0:
      raise ConfigError(f"config key {key}={config_lib.get(config, key)!r} must be in [0, 1)")
  decay = t.steps if t.decay_steps == -1 else t.decay_steps
  if decay <= t.warmup_steps:
    raise ConfigError(f"train.decay_steps ({decay}, -1 = train.steps) must exceed train.warmup_steps "
                      f"({t.warmup_steps})")
  if 'class_bias_init' in m:
    config_lib.check_choice(config, 'model.class_bias_init', ('zeros', 'histogram'))
    if m.class_bias_init == 'histogram' and (m.kind != 'gpt' or not m.class_bias):
      raise ConfigError("config key model.class_bias_init='histogram' starts the class x position bias of "
                        "model.kind='gpt' with model.class_bias=True; set it to 'zeros' or turn model.class_bias on")
  if 'class_bias_prior' in m:
    config_lib.check_positive(config, 'model.class_bias_prior', allow_zero=True)
    if m.class_bias_prior > 0 and m.get('class_bias_init', 'zeros') != 'histogram':
      raise ConfigError(f"config key model.class_bias_prior={m.class_bias_prior!r} smooths the histograms of "
                        f"model.class_bias_init='histogram'; set model.class_bias_init='histogram' or the prior to 0")
  init_from = str(t.get('init_from', '') or '')
  if init_from and not files.is_remote(init_from) and not files.isdir(files.absolute(init_from)):
    raise ConfigError(ckpt_lib.init_from_error(init_from))   # a bucket's is looked at by the train stage
  p_drop = float(t.get('class_dropout', 0.0))
  if not 0.0 <= p_drop < 1.0:
    raise ConfigError(f"config key train.class_dropout={p_drop!r} must be in [0, 1)")
  if p_drop > 0 and m.kind != 'gpt':
    raise ConfigError(f"config key train.class_dropout={p_drop!r} is for model.kind='gpt' (classifier-free "
                      f"guidance of its sampler); set it to 0")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.grad_accum={t.grad_accum}")
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh)))
  shards = shape['data'] * shape['fsdp']
  micro = t.batch_size // t.grad_accum
  if micro % shards:
    raise ConfigError(f"the micro-batch (train.batch_size / train.grad_accum = {micro}) must be a multiple of the "
                      f"{shards} batch shards of mesh {shape} (data x fsdp)")


def _sample(config) -> None:
  config_lib.check_choice(config, 'sample.support', ('all', 'training'))
  config_lib.check_positive(config, 'sample.num_samples')
  config_lib.check_positive(config, 'sample.batch_size')
  settings = config_lib.get(config, 'sample.settings')
  if not settings:
    raise ConfigError("config key sample.settings is empty: give (top_k, temperature, top_p) triples")
  for s in settings:
    if len(s) not in (3, 4):
      raise ConfigError(f"config key sample.settings: {s!r} is not a (top_k, temperature, top_p) triple "
                        f"(or (top_k, temperature, top_p, guidance))")
    k, t, p = s[:3]
    if int(k) < 0 or float(t) < 0 or not 0 < float(p) <= 1:
      raise ConfigError(f"config key sample.settings: {s!r} needs top_k >= 0, temperature >= 0, 0 < top_p <= 1")
    if len(s) == 4 and not 0 <= float(s[3]) < float('inf'):
      raise ConfigError(f"config key sample.settings: {s!r} needs a finite guidance scale >= 0 (its 4th element)")


def _guidance_needs_a_null_class(config) -> None:
  """A launch that trains the GPT and samples it: guided settings need the null class that only
  train.class_dropout > 0 gives it. Refused here, before the fit, rather than at the sample stage after
  the training (which checks a model trained in another launch itself)."""
  if float(config.train.get('class_dropout', 0.0)) > 0 or config.model.kind != 'gpt':
    return
  guided = [s for s in config_lib.get(config, 'sample.settings') if len(s) == 4 and float(s[3]) != 1.0]
  if guided:
    verb = 'uses' if len(guided) == 1 else 'use'
    raise ConfigError(f"config key sample.settings: {', '.join(map(repr, guided))} {verb} classifier-free guidance "
                      f"(a 4th element != 1), but train.class_dropout=0 trains the GPT without a null class: set "
                      f"--config.train.class_dropout=0.1 (for example), or drop the guidance scales")


def _enough_fields_to_evaluate(config) -> None:
  """A launch that fits the fields and evaluates: refused before the fit when it fits fewer fields than
  the evaluation needs (it stopped at the evaluate stage, after everything else)."""
  n = int(config.data.get('num_fields', -1))
  if 0 < n < protocol.MIN_GOOD_FIELDS:
    raise ConfigError(f"config key data.num_fields={n}: the evaluate stage needs at least {protocol.MIN_GOOD_FIELDS} "
                      f"good fields; fit {protocol.MIN_GOOD_FIELDS} or more, or leave it out "
                      f"(--stages=fit,tokenize,train,sample)")


def _evaluate(config) -> None:
  config_lib.check_positive(config, 'evaluate.num_samples', allow_minus_one=True)
  config_lib.check_positive(config, 'evaluate.num_reference', allow_minus_one=True)
  config_lib.check_positive(config, 'evaluate.baseline_noise', allow_zero=True)
  config_lib.check_positive(config, 'evaluate.num_neighbours', allow_zero=True)
  for key in ('evaluate.headline_top_k', 'evaluate.headline_temperature'):
    config_lib.get(config, key)
  config_lib.check_positive(config, 'evaluate.headline_guidance', allow_zero=True)


_CHECKS = {'fit': _fit, 'tokenize': _tokenize, 'train': _train, 'sample': _sample, 'evaluate': _evaluate}
