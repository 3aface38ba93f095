"""The no-structure row: weight tokens drawn independently per position from each class's per-slot
histogram of the training tokens.

It keeps everything a model could learn one slot at a time (which codes a class uses where) and
nothing of how the slots go together. The GPT conditions on the class and learns these per-slot
histograms first (with `model.class_bias` directly), so its numbers mean something only where
they beat this row. The frame (nfjax/evaluate/protocol.py) decodes the drawn tokens with the
tokenizer exactly as the sample stage decodes a GPT's samples and scores them with the headline
setting's labels, set size and metrics.

With tokenize.condition='prototype' the model conditions on the prototype a field started from, and
so does this row: per-prototype histograms, each row's prototype drawn from its class's as the sample
stage draws them (`TokenDataset.conditions_for`). Such a workdir gets a second row, NAME_CLASS, drawn
from the per-class histograms as without prototypes: between the two rows is what the prototypes buy,
between the first row and a setting what the transformer buys on top of them.

Inputs: WORKDIR/tokens (the training split `train_idx`, its conditions, the weight tokens after the
prefix) and WORKDIR/tokenizer. Seed: config seed + STREAM.
"""

from __future__ import annotations

import numpy as np

from nfjax import tokenizers
from nfjax.errors import DataError
from nfjax.io import tokens as token_io
from nfjax.io import workdir as wd

STREAM = 0x5107
NAME = 'no_structure'
NAME_CLASS = 'no_structure_class'


def histogram_tokens(tokens: np.ndarray, labels: np.ndarray, classes: np.ndarray, seed: int
                     ) -> tuple[np.ndarray, list[int]]:
  """Draw one sequence per entry of `classes`: slot j of a class-c sequence is slot j of a uniformly
  drawn class-c training sequence, independently for every slot -- a draw from the empirical
  histogram of class c's training tokens at slot j.

  tokens int [N, T] (weight tokens of the training sequences), labels int [N], classes int [n].
  A class without training sequences draws from the histograms of all of them; those classes are
  returned. Returns (tokens [n, T] of tokens' dtype, classes drawn from all sequences).
  """
  tokens = np.asarray(tokens)
  labels = np.asarray(labels)
  classes = np.asarray(classes)
  if tokens.ndim != 2 or labels.shape != (len(tokens),):
    raise ValueError(f"tokens [N, T] and labels [N] expected, got {tokens.shape} and {labels.shape}")
  if len(tokens) == 0:
    raise DataError("no training sequences to draw the no-structure row from")
  rng = np.random.default_rng(seed)
  slots = np.arange(tokens.shape[1])
  out = np.empty((len(classes), tokens.shape[1]), tokens.dtype)
  pooled = []
  for c in np.unique(classes):
    rows = np.nonzero(labels == c)[0]
    if len(rows) == 0:
      rows = np.arange(len(tokens))
      pooled.append(int(c))
    which = np.nonzero(classes == c)[0]
    pick = rows[rng.integers(len(rows), size=(len(which), len(slots)))]
    out[which] = tokens[pick, slots]
  return out, pooled


def available(workdir: str) -> bool:
  """Whether the workdir has finished tokens/ and tokenizer/ (a pipeline's; fake samples have none)."""
  return wd.finished(workdir, wd.TOKENS) and wd.finished(workdir, wd.TOKENIZER)


def _inputs(workdir: str, stage: str):
  """(token dataset, tokenizer) of the workdir, read once and checked against each other."""
  for d in (wd.TOKENS, wd.TOKENIZER):
    wd.require(workdir, d, stage)
  data = token_io.load(wd.path(workdir, wd.TOKENS))
  tokenizer = tokenizers.restore(wd.path(workdir, wd.TOKENIZER))
  if tokenizer.tokens_per_field != data.tokens_per_field:
    raise DataError(f"the tokenizer in {workdir}/tokenizer makes {tokenizer.tokens_per_field} tokens per field but "
                    f"{workdir}/tokens has {data.tokens_per_field}: re-run the tokenize stage")
  return data, tokenizer


def draw_rows(workdir: str, labels: np.ndarray, seed: int, params_per_field: int, stage: str = 'evaluate'
              ) -> dict[str, tuple[np.ndarray, dict]]:
  """{row name: `draw`'s (weights, info)} of every no-structure row of the workdir, its tokens and tokenizer
  read once: NAME (the model's conditioning) and, where the model conditions on prototypes, NAME_CLASS."""
  data, tokenizer = _inputs(workdir, stage)
  per_class = [False] + ([True] if data.condition_class is not None else [])
  return {NAME_CLASS if pc else NAME: _draw(workdir, data, tokenizer, labels, seed, params_per_field, pc)
          for pc in per_class}


def draw(workdir: str, labels: np.ndarray, seed: int, params_per_field: int, stage: str = 'evaluate',
         per_class: bool = False) -> tuple[np.ndarray, dict]:
  """Weights [n, P] float32 of histogram-drawn token sequences, one per label (the conditioning
  classes), decoded as the sample stage decodes; and what the summary says about them. per_class: the
  class's histograms even where the model conditions on prototypes (the NAME_CLASS row)."""
  return _draw(workdir, *_inputs(workdir, stage), labels, seed, params_per_field, per_class)


def _draw(workdir: str, data, tokenizer, labels: np.ndarray, seed: int, params_per_field: int,
          per_class: bool) -> tuple[np.ndarray, dict]:
  train = np.asarray(data.train_idx, np.int64)
  prefix = data.prefix_len
  # The model's conditioning: per class, or (tokenize.condition='prototype') per prototype, each row's
  # prototype drawn from its class's with their shares of the training fields, as the sample stage does.
  by_prototype = data.condition_class is not None and not per_class
  if per_class:
    wanted, conditions = np.asarray(labels, np.int32), np.asarray(data.labels, np.int32)[train]
  else:
    wanted, conditions = data.conditions_for(labels, seed), data.conditions()[train]
  drawn, pooled = histogram_tokens(data.tokens[train, prefix:], conditions, wanted, seed)
  weights = np.asarray(tokenizer.decode(drawn, data.vocab), np.float32)   # as samples are decoded
  if weights.shape[1] != params_per_field:
    raise DataError(f"{workdir}/tokenizer decodes {weights.shape[1]} parameters per field but fields/ has "
                    f"{params_per_field}: re-run the tokenize stage")
  info = {'what': f"weight tokens drawn independently per position from each "
                  f"{'prototype' if by_prototype else 'class'}'s per-slot histogram of the "
                  f"{len(train)} training sequences (tokens/ train split), decoded with the tokenizer "
                  f"(no structure between positions)",
          'num_train_sequences': int(len(train))}
  if pooled:
    info['classes_without_training_sequences'] = pooled
  if by_prototype:
    info['conditioning'] = ("per prototype (tokenize.condition='prototype'): each row's prototype drawn from its "
                            "class's with their shares of the training fields, as the sample stage draws them")
  elif per_class and data.condition_class is not None:
    info['conditioning'] = (f"per class, though the model conditions on prototypes: what the prototypes add over "
                            f"the class histograms is the difference from the {NAME} row")
  return weights, info
