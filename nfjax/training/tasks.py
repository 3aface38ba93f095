"""What the trainer trains: a `Task` is a model, its loss and its train/val arrays.

  gpt_task(config, workdir)         the GPT on WORKDIR/tokens (next-token cross-entropy)
  regression_task(config, workdir)  NeF-GPT's regression transformer on WORKDIR/fields (normalised weights)
  model_config(config, ...)         the model config for the data; NfjaxError when the model cannot hold it
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import jax.numpy as jnp
import numpy as np

from nfjax import models
from nfjax.errors import DataError, NfjaxError
from nfjax.io import fields as field_io
from nfjax.io import tokens as token_data
from nfjax.io import workdir as wd
from nfjax.models.gpt import cross_entropy
from nfjax.models.regression import regression_error
from nfjax.utils.logging import log

STAGE = 'train'


def model_config(config, *, vocab_size: int | None = None, seq_len: int | None = None,
                 num_params: int | None = None, num_classes: int = 0,
                 prefix: tuple = ('sos', 'class'), class_token0: int = -1) -> models.TransformerConfig:
  """The model config for this data; raises NfjaxError when the model cannot hold the data.

  GPT: sequences of seq_len tokens give seq_len-1 inputs, every one a training target, so
  block_size must be >= seq_len-1 and vocab_size >= the data's vocabulary (-1 = exactly that).
  train.class_dropout > 0 adds the null class: token id vocab_size (one more class token after the
  data's), so the vocabulary needs one id more, and class_bias one row more.
  Regression: a field of num_params weights gives num_params inputs (start + P-1 weights).
  """
  m = config.model
  common = dict(num_layers=int(m.num_layers), num_heads=int(m.num_heads), embed_dim=int(m.embed_dim),
                mlp_ratio=int(m.mlp_ratio), dropout=float(m.dropout), block_norm=not bool(m.nef_gpt_parity),
                position=str(m.position), rope_base=float(m.rope_base), bias=bool(m.bias),
                ln_eps=float(m.ln_eps), init_std=float(m.init_std), dtype=str(m.dtype),
                attention=str(m.get('attention', 'auto')))
  if m.kind == 'gpt':
    need = seq_len - 1
    block = need if m.block_size == -1 else int(m.block_size)
    if block < need:
      raise NfjaxError(
          f"model.block_size={block} is too short for the token sequences: they have {seq_len} tokens "
          f"(prefix + weights), i.e. {need} model inputs, and every weight must be a training target. "
          f"Set model.block_size={need} or -1 (= fit the data). (NeF-GPT's 561 never trained on the last weight.)")
    conditioned = 'class' in prefix
    p_drop = float(config.train.get('class_dropout', 0.0))
    null = -1
    if p_drop > 0:
      if not conditioned or num_classes < 1:
        raise NfjaxError(f"train.class_dropout={p_drop:g} needs class tokens in the sequences, but their prefix is "
                         f"{list(prefix)} (one class, or tokenize.class_token='no'): set train.class_dropout=0")
      null = vocab_size   # the class token after the last one: the data never holds it
    need_vocab = vocab_size + (null >= 0)
    vocab = need_vocab if m.vocab_size == -1 else int(m.vocab_size)
    if vocab < need_vocab:
      raise NfjaxError(f"model.vocab_size={vocab} is smaller than the token vocabulary ({vocab_size} ids: codes, "
                       f"specials, classes; see tokens/vocab.json"
                       + (f"; + 1 for the null class of train.class_dropout={p_drop:g}" if null >= 0 else '')
                       + "). Set model.vocab_size=-1 to fit it.")
    cond = -1
    if not conditioned and (bool(m.class_embedding) or bool(m.class_bias)):
      log(STAGE, f"the tokens' prefix is {list(prefix)} (no class token: one class, or tokenize.class_token='no'): "
                 f"model.class_embedding / class_bias have nothing to condition on and are off")
    if bool(m.class_embedding) and conditioned:
      cond = list(prefix).index('class')
    classes = 0
    if bool(m.class_bias) and conditioned:
      if cond < 0 or num_classes < 1 or class_token0 < 0:
        raise NfjaxError("model.class_bias=True needs model.class_embedding=True and class tokens in the sequences")
      classes = int(num_classes) + (null >= 0)   # the null class has its own bias row
    return models.GPTConfig(**common, block_size=block, vocab_size=vocab, tie_embeddings=bool(m.tie_embeddings),
                            cond_position=cond, cond_classes=classes,
                            cond_first_token=class_token0 if classes else 0, null_class=null)
  need = num_params
  block = need if m.block_size == -1 else int(m.block_size)
  if block < need:
    raise NfjaxError(f"model.block_size={block} is too short for fields of {num_params} weights (the regression "
                     f"transformer reads start + {num_params - 1} weights). Set model.block_size=-1.")
  return models.RegressionConfig(**common, block_size=block, num_classes=num_classes, loss=str(m.regression_loss))


@dataclasses.dataclass
class Task:
  """What the Trainer trains.

  loss(module, batch, rng) returns sums over the batch: {'loss_sum', 'count', ...more sums}; the
  training loss is loss_sum / count. rng is None for evaluation (no dropout). Batches are dicts of
  numpy arrays with a leading example axis, plus 'weight' [B] (0 marks eval padding).
  """
  name: str
  model: models.ModelDef
  loss: Callable
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  tokens_per_example: int
  info: dict = dataclasses.field(default_factory=dict)
  # augment(batch, seed, step) -> batch: a change to each training batch that is a pure function of
  # (seed, step) like the data order (class dropout); None = the batches as they are. Not applied to eval.
  augment: Callable | None = None
  # init_params() -> {top-level parameter name: host array}: values that replace those parameters'
  # fresh initialisation (not a resumed run's, nor train.init_from's); None = the model's init as is.
  init_params: Callable[[], dict[str, np.ndarray]] | None = None


def gpt_loss(prefix_len: int, loss_on_prefix: bool, class_column: int = -1, null_class: int = -1) -> Callable:
  """Next-token cross-entropy. Inputs tokens[:, :-1], targets tokens[:, 1:]; targets inside the
  prefix (e.g. the class token after SOS) count only with loss_on_prefix (NeF-GPT: yes).

  Class dropout: a batch with 'null_rows' (bool [B], see `class_dropout`) has the class token of
  those rows (input column class_column) replaced by null_class in the inputs only: the targets
  keep the true class, so loss_on_prefix still trains P(class | SOS)."""
  first = 0 if loss_on_prefix else max(0, prefix_len - 1)

  def loss(module, batch, rng):
    tokens = batch['tokens']
    x, y = tokens[:, :-1], tokens[:, 1:]
    if 'null_rows' in batch:
      x = x.at[:, class_column].set(jnp.where(batch['null_rows'], null_class, x[:, class_column]))
    logits = module(x, rng=rng)
    ce = cross_entropy(logits, y)
    w = (jnp.arange(y.shape[1]) >= first).astype(jnp.float32)[None, :] * batch['weight'][:, None]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {'loss_sum': jnp.sum(ce * w), 'count': jnp.sum(w), 'correct': jnp.sum(correct * w)}
  return loss


def class_dropout(p: float) -> Callable:
  """Task.augment of classifier-free training: 'null_rows' bool [B], each row True with probability p,
  drawn from numpy's generator seeded by (seed, 0xC1A55, step): a pure function of (seed, step), so
  a resumed run drops the same rows."""
  def augment(batch, seed, step):
    n = len(batch['tokens'])
    return {**batch, 'null_rows': np.random.default_rng([int(seed), 0xC1A55, int(step)]).random(n) < p}
  return augment


def class_histogram_bias(tokens: np.ndarray, cfg, class_column: int, smoothing: float = 0.1,
                         prior: float = 0.0) -> np.ndarray:
  """model.class_bias_init='histogram': the [cond_classes, block_size, vocab] logit bias `wcb` set to each
  class's per-slot log token frequencies in the training sequences `tokens` [N, T] (add-`smoothing`
  counts), so the model starts where the no-structure row is (nfjax/evaluate/no_structure.py) and its
  steps go to how the slots go together. Input position t predicts token t + 1; the null class's row
  (classifier-free guidance) pools every class. Positions the data does not reach stay 0.

  prior > 0 (model.class_bias_prior): instead of add-`smoothing`, each class's counts at a slot get
  `prior` pseudo-counts spread as the pooled histogram of every class there (itself add-0.01), a
  hierarchical estimate: a class with few sequences leans on what all classes do at that slot, one
  with many on its own counts."""
  tokens = np.asarray(tokens, np.int64)
  classes, block, v = int(cfg.cond_classes), int(cfg.block_size), int(cfg.vocab_size)
  counts = np.zeros((classes, block, v), np.float64)
  cls = tokens[:, class_column] - int(cfg.cond_first_token)
  real = classes - (cfg.null_class >= 0)
  if np.any((cls < 0) | (cls >= real)):
    raise DataError(f"class tokens outside [{cfg.cond_first_token}, {cfg.cond_first_token + real}) in the "
                    f"training sequences: re-run the tokenize stage")
  targets = tokens[:, 1:]                                # [N, T-1]: what input position t predicts
  t = targets.shape[1]
  pos = np.broadcast_to(np.arange(t), targets.shape)
  np.add.at(counts, (np.broadcast_to(cls[:, None], targets.shape), pos, targets), 1.0)
  if cfg.null_class >= 0:
    counts[real] = counts[:real].sum(0)
  out = np.zeros((classes, block, v), np.float32)
  if prior > 0:
    pooled = counts[:real, :t].sum(0) + 0.01
    c = counts[:, :t] + prior * (pooled / pooled.sum(-1, keepdims=True))[None]
  else:
    c = counts[:, :t] + smoothing
  out[:, :t] = np.log(c / c.sum(-1, keepdims=True))
  return out


def regression_loss(kind: str) -> Callable:
  def loss(module, batch, rng):
    values = batch['values']
    pred = module(values[:, :-1], batch['labels'], rng=rng)
    err = regression_error(pred, values, kind)
    w = jnp.broadcast_to(batch['weight'][:, None], err.shape)
    return {'loss_sum': jnp.sum(err * w), 'count': jnp.sum(w)}
  return loss


def _hash_arrays(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def gpt_task(config, workdir: str) -> Task:
  directory = wd.path(workdir, wd.TOKENS)
  ds = token_data.load(directory)
  n, seq_len = ds.tokens.shape
  if seq_len < 2:
    raise DataError(f"token sequences in {directory} have length {seq_len}; need at least 2")
  num_classes = ds.vocab.num_classes
  # The vocabulary comes from tokens/vocab.json alone (token_data.load checked every id against it).
  cfg = model_config(config, vocab_size=ds.vocab.vocab_size, seq_len=seq_len, num_classes=num_classes,
                     prefix=tuple(ds.meta.get('prefix', ['sos', 'class'][:ds.prefix_len])),
                     class_token0=ds.vocab.class_token(0) if num_classes else -1)
  mdef = models.build(cfg)
  tokens = np.asarray(ds.tokens, np.int32)
  train = {'tokens': tokens[ds.train_idx]}
  val = {'tokens': tokens[ds.val_idx]}
  info = {'data': 'tokens', 'vocab': ds.vocab.to_dict(), 'seq_len': int(seq_len), 'prefix_len': ds.prefix_len,
          'num_train': int(len(ds.train_idx)), 'num_val': int(len(ds.val_idx)),
          'data_hash': _hash_arrays(tokens, ds.train_idx, ds.val_idx)}
  prefix = list(ds.meta.get('prefix', ['sos', 'class'][:ds.prefix_len]))
  init_params = None
  if cfg.cond_classes > 0 and str(config.model.get('class_bias_init', 'zeros')) == 'histogram':
    prior = float(config.model.get('class_bias_prior', 0.0))
    init_params = lambda: {'wcb': class_histogram_bias(train['tokens'], cfg, prefix.index('class'), prior=prior)}
  if cfg.null_class < 0:
    loss = gpt_loss(ds.prefix_len, bool(config.train.loss_on_prefix))
    return Task('gpt', mdef, loss, train, val, tokens_per_example=seq_len - 1, info=info, init_params=init_params)
  loss = gpt_loss(ds.prefix_len, bool(config.train.loss_on_prefix), prefix.index('class'), cfg.null_class)
  info['class_dropout'] = float(config.train.class_dropout)
  return Task('gpt', mdef, loss, train, val, tokens_per_example=seq_len - 1, info=info,
              augment=class_dropout(float(config.train.class_dropout)), init_params=init_params)


def regression_task(config, workdir: str) -> Task:
  fds = field_io.load(wd.path(workdir, wd.FIELDS))
  if wd.finished(workdir, wd.TOKENS):  # the GPT's split, for comparable numbers
    tds = token_data.load(wd.path(workdir, wd.TOKENS))
    train_rows, val_rows = tds.field_index[tds.train_idx], tds.field_index[tds.val_idx]
    split = 'tokens'
  else:
    good = fds.good()
    rng = np.random.default_rng([int(config.seed), 0x5B117])
    perm = good[rng.permutation(len(good))]
    n_val = max(1, len(perm) // 10) if len(perm) > 1 else 0
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    split = 'seeded 90/10 of the unflagged fields'
  w = np.asarray(fds.weights, np.float32)
  mean, std = float(w[train_rows].mean()), float(w[train_rows].std() + 1e-8)
  norm = (w - mean) / std
  num_classes = int(fds.meta.get('num_classes', 0) or 0)
  labels = np.asarray(fds.labels, np.int32) if num_classes else np.zeros(len(w), np.int32)
  cfg = model_config(config, num_params=w.shape[1], num_classes=num_classes)
  mdef = models.build(cfg)
  train = {'values': norm[train_rows], 'labels': labels[train_rows]}
  val = {'values': norm[val_rows], 'labels': labels[val_rows]}
  info = {'data': 'fields', 'split': split, 'num_params': int(w.shape[1]), 'value_mean': mean, 'value_std': std,
          'num_train': int(len(train_rows)), 'num_val': int(len(val_rows)),
          'data_hash': _hash_arrays(norm, train_rows, val_rows)}
  return Task('regression', mdef, regression_loss(cfg.loss), train, val, tokens_per_example=w.shape[1], info=info)


def make_task(config, workdir: str) -> Task:
  return gpt_task(config, workdir) if config.model.kind == 'gpt' else regression_task(config, workdir)


