"""The vocabulary layout and the token dataset (what `tokenize` writes and `train`/`sample` read).

Vocabulary (one place defines it; overlap is impossible by construction):

  ids [0, num_codes)                      codebook entries (weight values / residual codes)
  ids num_codes, num_codes+1, ...         the special tokens in `specials` order (e.g. pad, sos)
  next num_classes ids                    one conditioning token per class (class c -> class_token(c))

  vocab_size = num_codes + len(specials) + num_classes

NeF-GPT MNIST parity: 245 codes, specials ('sos',), 10 classes -> 256.

Token dataset directory (``WORKDIR/tokens``), numpy-readable:

  tokens.npy        int32 [N, L]  one sequence per field: prefix (e.g. [SOS, class]) + P weight tokens
  field_index.npy   int64 [N]     row of each sequence in WORKDIR/fields
  labels.npy        int32 [N]     class of each sequence (with tokenize.condition='prototype' the
                                  sequence's conditioning token names its prototype instead: see below)
  train_idx.npy     int64 [Nt]    rows of tokens.npy in the train split (seeded, recorded)
  val_idx.npy       int64 [Nv]    rows in the val split
  vocab.json        Vocab.to_dict() plus seq_len, prefix_len, num_sequences and what the tokenize stage
                    adds (nfjax/tokenizers/codebook.py Tokenizer.sequence_meta): tokenizer (method),
                    tokens_per_field, tokens_per_weight (tokens_per_field / params_per_field: 1 for
                    scalar tokenizers), params_per_field, num_quantizers (Q tokens per chunk), chunk
                    (scalar | neuron | fixed), chunk_dim, num_chunks, token_order (chunk-major,
                    quantizer-minor), codebook_groups, token_segments ([{group, start, length}]:
                    which codebook decodes which token positions, counted after the prefix),
                    residual, normalize, prefix (['sos', 'class']), split_seed, val_fraction,
                    tokenizer (path of the tokenizer file, relative to this directory)
  summary.json      written last; marks the dataset complete

Conditioning on prototypes (tokenize.condition='prototype', with fit.prototypes > 0): the conditioning
token of a sequence names the prototype its field started from (fields/prototypes.npz `of_field`), not
its class; vocab.json's num_classes counts the prototypes and its `condition_class` [num_classes] gives
each prototype's class. A class is sampled by drawing one of its prototypes with the frequency of its
training sequences (`TokenDataset.conditions_for`): the model is p(prototype | class) p(w | prototype).

Decoding sampled sequences back to weights: `nfjax.tokenizers.restore(WORKDIR/tokenizer)
.decode_sequences(seqs, vocab, prefix_len)`; a special or class token in a weight slot raises
TokenError (NeF-GPT clamped it to the last code).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nfjax.errors import ArtifactError, DataError
from nfjax.io import files


class TokenError(ValueError):
  """A token id that is not valid where it appears (e.g. a special token in a weight slot)."""


@dataclasses.dataclass(frozen=True)
class Vocab:
  num_codes: int
  num_classes: int = 0
  specials: tuple[str, ...] = ('pad', 'sos')

  def __post_init__(self):
    if self.num_codes < 1:
      raise ValueError(f"a vocabulary needs at least one code, got num_codes={self.num_codes}")
    if len(set(self.specials)) != len(self.specials):
      raise ValueError(f"duplicate special tokens: {self.specials}")

  @property
  def vocab_size(self) -> int:
    return self.num_codes + len(self.specials) + self.num_classes

  def special(self, name: str) -> int:
    if name not in self.specials:
      raise KeyError(f"vocabulary has no special token {name!r}; it has {self.specials}")
    return self.num_codes + self.specials.index(name)

  @property
  def sos(self) -> int:
    return self.special('sos')

  def class_token(self, c) -> np.ndarray | int:
    c_arr = np.asarray(c)
    if np.any((c_arr < 0) | (c_arr >= self.num_classes)):
      raise ValueError(f"class {c} out of range: the vocabulary has {self.num_classes} classes")
    out = self.num_codes + len(self.specials) + c_arr
    return int(out) if out.ndim == 0 else out

  def is_code(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= 0) & (ids < self.num_codes)

  def check_codes(self, ids, where: str = 'weight slots') -> np.ndarray:
    """Return ids as codes, or raise naming the first offending position and token."""
    ids = np.asarray(ids)
    bad = ~self.is_code(ids)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      tok = int(ids[pos])
      raise TokenError(f"token {tok} ({self.describe(tok)}) at position {pos} in {where}: only codes "
                       f"0..{self.num_codes - 1} can be decoded to weights")
    return ids

  def describe(self, tok: int) -> str:
    if 0 <= tok < self.num_codes:
      return f"code {tok}"
    s = tok - self.num_codes
    if s < len(self.specials):
      return self.specials[s].upper()
    c = s - len(self.specials)
    if c < self.num_classes:
      return f"class {c}"
    return "out of vocabulary"

  def to_dict(self) -> dict:
    return {'num_codes': self.num_codes, 'num_classes': self.num_classes, 'specials': list(self.specials),
            'vocab_size': self.vocab_size}

  @classmethod
  def from_dict(cls, d: dict) -> 'Vocab':
    return cls(num_codes=int(d['num_codes']), num_classes=int(d['num_classes']), specials=tuple(d['specials']))


@dataclasses.dataclass
class TokenDataset:
  tokens: np.ndarray
  field_index: np.ndarray
  labels: np.ndarray
  train_idx: np.ndarray
  val_idx: np.ndarray
  vocab: Vocab
  meta: dict

  @property
  def seq_len(self) -> int:
    return int(self.tokens.shape[1])

  @property
  def prefix_len(self) -> int:
    return int(self.meta['prefix_len'])

  @property
  def tokens_per_field(self) -> int:
    """Weight tokens per sequence (seq_len - prefix_len)."""
    return int(self.meta.get('tokens_per_field', self.seq_len - self.prefix_len))

  @property
  def condition_class(self) -> np.ndarray | None:
    """The class of every conditioning token [num_classes of the vocabulary] when the sequences are
    conditioned on prototypes (tokenize.condition='prototype'); None when the token is the class."""
    cc = self.meta.get('condition_class')
    return None if cc is None else np.asarray(cc, np.int32)

  @property
  def num_label_classes(self) -> int:
    """How many classes a sample can be asked for (the vocabulary's conditioning tokens, or with
    prototype conditions the classes they belong to); at least 1."""
    cc = self.condition_class
    return max(1, self.vocab.num_classes if cc is None else int(cc.max()) + 1)

  def label_classes(self) -> np.ndarray:
    """The classes a sample can be conditioned on: all of the vocabulary's, or with prototype
    conditions those with a prototype (a class without fields has none)."""
    cc = self.condition_class
    return np.arange(self.num_label_classes, dtype=np.int32) if cc is None else np.unique(cc).astype(np.int32)

  def conditions(self) -> np.ndarray:
    """The conditioning index of every sequence [N] (its class, or its prototype)."""
    if self.condition_class is None:
      return np.asarray(self.labels, np.int32)
    col = list(self.meta.get('prefix', ['sos', 'class'])).index('class')
    return (np.asarray(self.tokens[:, col]) - self.vocab.class_token(0)).astype(np.int32)

  def class_of(self, conditions: np.ndarray) -> np.ndarray:
    """The class of conditioning indices."""
    cc = self.condition_class
    return np.asarray(conditions, np.int32) if cc is None else cc[np.asarray(conditions)]

  def conditions_for(self, classes: np.ndarray, seed: int) -> np.ndarray:
    """A conditioning index for every wanted class [n]: the class itself, or (prototype conditions)
    one of the class's prototypes, drawn with the frequency of its training sequences. Seeded: entry i
    depends only on `seed`, i and its class."""
    classes = np.asarray(classes, np.int32)
    cc = self.condition_class
    if cc is None:
      return classes
    counts = np.bincount(self.conditions()[np.asarray(self.train_idx)], minlength=len(cc)).astype(np.float64)
    u = np.random.default_rng([int(seed), CONDITION_STREAM]).random(len(classes))
    out = np.empty(len(classes), np.int32)
    for c in np.unique(classes):
      mine = np.nonzero(cc == c)[0]
      if len(mine) == 0:
        raise ValueError(f"class {c} has no prototype in the token dataset (classes with one: "
                         f"{self.label_classes().tolist()})")
      weight = counts[mine] + (counts[mine].sum() == 0)   # a class without training sequences: uniform
      which = np.nonzero(classes == c)[0]
      pick = np.searchsorted(np.cumsum(weight) / weight.sum(), u[which], side='right')
      out[which] = mine[np.minimum(pick, len(mine) - 1)]
    return out


CONDITION_STREAM = 0xC0D
ARRAYS = ('tokens', 'field_index', 'labels', 'train_idx', 'val_idx')


def write(directory: str, tokens, field_index, labels, train_idx, val_idx, vocab: Vocab, prefix_len: int,
          extra_meta: dict | None = None) -> None:
  """Write every file but summary.json (the stage writes that last)."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [N, L], got shape {tokens.shape}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab.vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
  arrays = dict(tokens=tokens, field_index=np.asarray(field_index, np.int64), labels=np.asarray(labels, np.int32),
                train_idx=np.asarray(train_idx, np.int64), val_idx=np.asarray(val_idx, np.int64))
  for k, v in arrays.items():
    files.write_npy(files.join(directory, f'{k}.npy'), v)
  meta = {**vocab.to_dict(), 'seq_len': int(tokens.shape[1]), 'prefix_len': int(prefix_len),
          'num_sequences': int(tokens.shape[0]), **(extra_meta or {})}
  files.write_json(files.join(directory, 'vocab.json'), meta)


def load(directory: str) -> TokenDataset:
  """Read a finished token dataset, checked: integer token ids inside the vocabulary of vocab.json
  (never negative), one label and field index per sequence, split indices in range."""
  if not files.exists(files.join(directory, 'summary.json')):
    raise DataError(f"no finished token dataset at {directory}: run the tokenize stage first")
  meta_path = files.join(directory, 'vocab.json')
  meta = files.read_json(meta_path)
  try:
    vocab = Vocab.from_dict(meta)
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f"{meta_path} is not a vocabulary ({type(e).__name__}: {e})", meta_path) from None
  arrays = {k: files.read_npy(files.join(directory, f'{k}.npy')) for k in ARRAYS}
  _check(directory, arrays, vocab)
  return TokenDataset(vocab=vocab, meta=meta, **arrays)


def _check(directory: str, arrays: dict, vocab: Vocab) -> None:
  tokens = arrays['tokens']
  where = files.join(directory, 'tokens.npy')
  if tokens.dtype.kind not in 'iu' or tokens.ndim != 2:
    raise ArtifactError(f"{where} holds {tokens.dtype} {list(tokens.shape)}, not integer sequences [N, L]", where)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab.vocab_size):
    bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
    raise ArtifactError(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab.vocab_size}) of "
                        f"{files.join(directory, 'vocab.json')}", where)
  n = len(tokens)
  for k in ('labels', 'field_index'):
    if arrays[k].shape != (n,):
      p = files.join(directory, f'{k}.npy')
      raise ArtifactError(f"{p} has shape {list(arrays[k].shape)}, expected [{n}] (one per sequence)", p)
  for k in ('train_idx', 'val_idx'):
    idx = arrays[k]
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
      p = files.join(directory, f'{k}.npy')
      raise ArtifactError(f"{p} holds rows outside the {n} sequences of tokens.npy", p)
