"""The tokenizer: codebooks over chunks of (normalised) weights, with encode / decode / save / restore.

Every method (scalar VQ, vector VQ, residual VQ, uniform and quantile bins) produces the same
object; they differ only in how the codebooks were fitted (`nfjax.tokenizers.fit`).

Coding space. A weight vector w [P] is first mapped to z = (w - center) / scale:
  center = shared init (residual mode) or 0, plus the per-slot mean if normalize='slot';
  scale  = the per-slot standard deviation if normalize='slot', else 1.
z is cut into chunks (`nfjax.tokenizers.chunking`), and each chunk x [D] becomes Q tokens t_0..t_{Q-1}
with x ~ sum_q codebooks[group, q, t_q] (greedy residual quantization; Q = 1 is plain VQ).

Token layout of one field: chunk-major, quantizer-minor: token c*Q + q is quantizer q of chunk c,
chunks in flat order of their first weight. Scalar chunking with Q = 1 gives NeF-GPT's layout:
token j codes weight j (PyTorch state_dict order).

Constant positions (`drop_constant`, tokenize.drop_constant): positions whose token is the same in
every training field (the weights of neurons that are dead in the shared init never move, so their
residual codes never change) can be left out of the sequences. `keep` marks the positions that
stay; the others decode to their `fixed` token. encode() returns only the kept positions and
decode() takes only them; without `keep` every position stays (the default).

File (`save`/`restore`): one `.npz`, readable with numpy alone (no pickle):
  codebooks  float32 [G, Q, K, D]  code vectors (group, quantizer, code id, dim)
  index      int64   [C, D]        flat weight index of every chunk element (-1 = padding)
  group      int32   [C]           codebook group of every chunk
  center     float32 [P]           see above
  scale      float32 [P]
  meta       str (0-d)             JSON: format, method, num_codes, layout, field spec, fit info, ...
  keep       bool    [C*Q]         only with dropped constant positions: the positions in the sequences
  fixed      int32   [C*Q]         ... and the token every dropped position decodes to
Decode without nfjax: t = fixed; t[keep] = the sequence's weight tokens (when keep is present);
z[index[c, :]] = sum_q codebooks[group[c], q, t[c*Q + q]] (skip -1), w = center + scale * z.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json

import numpy as np

from nfjax.io import files
from nfjax.io.tokens import TokenError, Vocab
from nfjax.errors import DataError, NfjaxError
from nfjax.tokenizers import kmeans
from nfjax.tokenizers.chunking import Chunking

FORMAT = 'nfjax.tokenizer/v1'


class TokenizerMismatch(NfjaxError):
  """A tokenizer used on weights of a different architecture / layout than it was fitted on."""


def describe_layout(layout: list[dict]) -> str:
  return ', '.join(f"{e['name']} {'x'.join(map(str, e['shape']))}" for e in layout)


def _layout_key(layout: list[dict]) -> list[tuple]:
  return [(e['name'], tuple(int(s) for s in e['shape']), int(e['offset']), int(e['size'])) for e in layout]


@dataclasses.dataclass
class Tokenizer:
  codebooks: np.ndarray   # float32 [G, Q, K, D]
  chunking: Chunking
  center: np.ndarray      # float32 [P]
  scale: np.ndarray       # float32 [P]
  meta: dict              # method, layout, residual, normalize, encoder, field, image_shape, fit info
  keep: np.ndarray | None = None    # bool [C*Q]: positions in the sequences (None = all)
  fixed: np.ndarray | None = None   # int32 [C*Q]: the token of every position left out

  def __post_init__(self):
    self.codebooks = np.asarray(self.codebooks, np.float32)
    self.center = np.asarray(self.center, np.float32)
    self.scale = np.asarray(self.scale, np.float32)
    g, q, k, d = self.codebooks.shape
    if g != self.chunking.num_groups or d != self.chunking.dim:
      raise ValueError(f"codebooks {self.codebooks.shape} do not match the chunking "
                       f"({self.chunking.num_groups} groups, chunk dim {self.chunking.dim})")
    if self.center.shape != (self.params_per_field,) or self.scale.shape != (self.params_per_field,):
      raise ValueError("center/scale must have one entry per weight")
    if (self.keep is None) != (self.fixed is None):
      raise ValueError("keep and fixed come together")
    if self.keep is not None:
      self.keep = np.asarray(self.keep, bool)
      self.fixed = np.asarray(self.fixed, np.int32)
      if self.keep.shape != (self.full_tokens_per_field,) or self.fixed.shape != self.keep.shape:
        raise ValueError(f"keep/fixed must have one entry per token position ({self.full_tokens_per_field})")
    self._sorted = None

  # ----------------------------------------------------------------------------------------------
  # Shape of the token space.

  @property
  def method(self) -> str:
    return self.meta['method']

  @property
  def layout(self) -> list[dict]:
    return self.meta['layout']

  @property
  def params_per_field(self) -> int:
    return int(self.meta['params_per_field'])

  @property
  def num_groups(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def num_quantizers(self) -> int:
    return int(self.codebooks.shape[1])

  @property
  def num_codes(self) -> int:
    return int(self.codebooks.shape[2])

  @property
  def full_tokens_per_field(self) -> int:
    """Token positions of a field before constant ones are dropped: chunks x quantizers."""
    return self.chunking.num_chunks * self.num_quantizers

  @property
  def tokens_per_field(self) -> int:
    """Weight tokens per sequence (the kept positions)."""
    return self.full_tokens_per_field if self.keep is None else int(self.keep.sum())

  @property
  def num_dropped(self) -> int:
    return self.full_tokens_per_field - self.tokens_per_field

  def select(self, full: np.ndarray) -> np.ndarray:
    """Tokens at every position [N, full_tokens_per_field] -> the kept positions [N, tokens_per_field]."""
    full = np.asarray(full, np.int32)
    return full if self.keep is None else full[:, self.keep]

  def expand(self, tokens: np.ndarray) -> np.ndarray:
    """Kept positions [N, tokens_per_field] -> every position, dropped ones at their fixed token."""
    if self.keep is None:
      return tokens
    out = np.broadcast_to(self.fixed, (len(tokens), len(self.fixed))).copy()
    out[:, self.keep] = tokens
    return out

  def drop_constant(self, train_tokens: np.ndarray) -> 'Tokenizer':
    """This tokenizer with every position whose token is the same in all `train_tokens` (every
    position, [N, full_tokens_per_field], N >= 1) left out of the sequences."""
    t = np.asarray(train_tokens, np.int32)
    if self.keep is not None or t.ndim != 2 or t.shape[1] != self.full_tokens_per_field or len(t) == 0:
      raise ValueError("drop_constant takes the training fields' tokens at every position, once")
    keep = ~(t == t[:1]).all(0)
    if not keep.any():
      raise DataError(f"tokenize.drop_constant=True: every token position holds one token in all {len(t)} training "
                      f"field(s), so nothing would be left to generate; fit more (or more varied) fields, or set "
                      f"tokenize.drop_constant=False")
    return dataclasses.replace(self, keep=keep, fixed=np.where(keep, 0, t[0]).astype(np.int32))

  def vocab(self, num_classes: int, specials: tuple[str, ...] = ('pad', 'sos')) -> Vocab:
    return Vocab(num_codes=self.num_codes, num_classes=num_classes, specials=tuple(specials))

  def token_groups(self) -> np.ndarray:
    """int32 [tokens_per_field]: the codebook group each token position is decoded with."""
    return self._kept(np.repeat(self.chunking.group, self.num_quantizers).astype(np.int32))

  def token_quantizers(self) -> np.ndarray:
    """int32 [tokens_per_field]: the quantizer (residual stage) of each token position."""
    return self._kept(np.tile(np.arange(self.num_quantizers, dtype=np.int32), self.chunking.num_chunks))

  def _kept(self, per_position: np.ndarray) -> np.ndarray:
    return per_position if self.keep is None else per_position[self.keep]

  def sequence_meta(self) -> dict:
    """What a token sequence means (written into tokens/vocab.json)."""
    segments = []  # consecutive token positions decoded by the same codebook group
    tg = self.token_groups()
    start = 0
    for i in range(1, len(tg) + 1):
      if i == len(tg) or tg[i] != tg[start]:
        segments.append({'group': self.chunking.group_names[tg[start]], 'start': start, 'length': i - start})
        start = i
    return {
        'tokenizer': self.method, 'tokens_per_field': self.tokens_per_field,
        'tokens_per_weight': self.tokens_per_field / self.params_per_field,
        'params_per_field': self.params_per_field, 'num_quantizers': self.num_quantizers,
        'chunk': self.chunking.kind, 'chunk_dim': self.chunking.dim, 'num_chunks': self.chunking.num_chunks,
        'token_order': 'chunk-major, quantizer-minor: token c*Q+q = quantizer q of chunk c',
        'codebook_groups': list(self.chunking.group_names), 'token_segments': segments,
        'residual': bool(self.meta.get('residual', False)), 'normalize': self.meta.get('normalize', 'none'),
        **({'dropped_constant': self.num_dropped,
            'dropped_positions': np.nonzero(~self.keep)[0].tolist()} if self.keep is not None else {}),
    }

  # ----------------------------------------------------------------------------------------------
  # Checks.

  def check_layout(self, layout: list[dict], params_per_field: int, where: str = 'the dataset') -> None:
    """Raise TokenizerMismatch naming both layouts if weights of `layout` cannot use this tokenizer."""
    if int(params_per_field) != self.params_per_field or _layout_key(layout) != _layout_key(self.layout):
      raise TokenizerMismatch(
          f"tokenizer ({self.method}) was fitted on fields with {self.params_per_field} parameters "
          f"[{describe_layout(self.layout)}] but {where} has {params_per_field} parameters "
          f"[{describe_layout(layout)}]; fit a tokenizer on these fields (re-run the tokenize stage "
          f"in a fresh workdir)")

  def _check_weights(self, w) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if w.ndim == 1:
      w = w[None]
    if w.ndim != 2 or w.shape[1] != self.params_per_field:
      raise TokenizerMismatch(f"weights of shape {tuple(np.shape(w))} given to a tokenizer for fields with "
                              f"{self.params_per_field} parameters [{describe_layout(self.layout)}]")
    if not np.isfinite(w).all():
      bad = np.argwhere(~np.isfinite(w))[0]
      raise NfjaxError(f"cannot tokenize non-finite weights (row {bad[0]}, weight {bad[1]})")
    return w

  # ----------------------------------------------------------------------------------------------
  # Coding space.

  def to_code_space(self, w: np.ndarray) -> np.ndarray:
    return (np.asarray(w, np.float32) - self.center) / self.scale

  def from_code_space(self, z: np.ndarray) -> np.ndarray:
    return (self.center + self.scale * np.asarray(z, np.float32)).astype(np.float32)

  def _sorted_scalar(self):
    """Per (group, quantizer): sorted code values, their ids, and the cell boundaries (D = 1)."""
    if self._sorted is None:
      cb = self.codebooks[..., 0].astype(np.float64)
      order = np.argsort(cb, axis=-1, kind='stable')
      vals = np.take_along_axis(cb, order, -1)
      self._sorted = (vals, order, 0.5 * (vals[..., 1:] + vals[..., :-1]))
    return self._sorted

  # ----------------------------------------------------------------------------------------------
  # Encode / decode.

  def encode(self, w, batch: int = 65536) -> np.ndarray:
    """Weights [N, P] (or [P]) -> weight tokens int32 [N, tokens_per_field], nearest codes."""
    return self.select(self.encode_full(w, batch))

  def encode_full(self, w, batch: int = 65536) -> np.ndarray:
    """Weights [N, P] (or [P]) -> tokens int32 [N, full_tokens_per_field] (dropped positions too)."""
    w = self._check_weights(w)
    x = self.chunking.gather(self.to_code_space(w)).astype(np.float64)  # [N, C, D]
    n, c, d = x.shape
    q_count = self.num_quantizers
    out = np.zeros((n, c, q_count), np.int32)
    for g in range(self.num_groups):
      sel = np.nonzero(self.chunking.group == g)[0]
      r = x[:, sel].reshape(-1, d)
      ids = np.zeros((len(r), q_count), np.int32)
      for q in range(q_count):
        ids[:, q] = self._nearest(g, q, r, batch)
        r = r - self.codebooks[g, q][ids[:, q]]
      out[:, sel] = ids.reshape(n, len(sel), q_count)
    return out.reshape(n, c * q_count)

  def _nearest(self, g: int, q: int, r: np.ndarray, batch: int) -> np.ndarray:
    if r.shape[1] == 1:
      vals, order, mids = self._sorted_scalar()
      pos = np.searchsorted(mids[g, q], r[:, 0], side='left')
      return order[g, q][pos].astype(np.int32)
    return kmeans.assign(r.astype(np.float32), self.codebooks[g, q], batch=batch)

  def decode(self, tokens, vocab: Vocab | None = None, where: str = 'weight slots') -> np.ndarray:
    """Weight tokens [N, tokens_per_field] (or [tokens_per_field]) -> weights float32 [N, P].

    A token that is not a code (a special or class token sampled in a weight slot) raises
    TokenError naming its position (and, given the sequences' `vocab`, what the token is);
    nothing is clamped.
    """
    t = np.asarray(tokens)
    if t.ndim == 1:
      t = t[None]
    if t.ndim != 2 or t.shape[1] != self.tokens_per_field:
      raise TokenizerMismatch(f"token array of shape {tuple(np.shape(tokens))} given to a tokenizer whose fields "
                              f"have {self.tokens_per_field} tokens each ({self.method}, "
                              f"{self.params_per_field} parameters)")
    if vocab is not None and vocab.num_codes != self.num_codes:
      raise TokenizerMismatch(f"vocabulary has {vocab.num_codes} codes, the tokenizer {self.num_codes}")
    bad = (t < 0) | (t >= self.num_codes)
    if bad.any():
      pos = tuple(int(i) for i in np.argwhere(bad)[0])
      tok = int(t[pos])
      what = vocab.describe(tok) if vocab is not None else 'a special or class token, not a code'
      raise TokenError(f"token {tok} ({what}) at position {pos} in {where}: only codes 0..{self.num_codes - 1} "
                       f"decode to weights")
    n = t.shape[0]
    t = self.expand(t).reshape(n, self.chunking.num_chunks, self.num_quantizers)
    g = self.chunking.group[None, :, None]
    q = np.arange(self.num_quantizers)[None, None, :]
    x = self.codebooks[g, q, t].sum(axis=2)  # [N, C, D]
    z = self.chunking.scatter(x, self.params_per_field)
    return self.from_code_space(z)

  def decode_sequences(self, seqs, vocab: Vocab, prefix_len: int) -> np.ndarray:
    """Full sequences [N, prefix_len + tokens_per_field] (e.g. [SOS, class, w...]) -> weights [N, P].

    Special or class tokens in weight slots raise TokenError (position counted from the start of
    the sequence)."""
    seqs = np.asarray(seqs)
    if seqs.ndim == 1:
      seqs = seqs[None]
    if seqs.shape[1] != prefix_len + self.tokens_per_field:
      raise TokenizerMismatch(f"sequences of length {seqs.shape[1]}; this tokenizer expects {prefix_len} prefix "
                              f"tokens + {self.tokens_per_field} weight tokens")
    body = seqs[:, prefix_len:]
    bad = ~vocab.is_code(body)
    if bad.any():
      row, col = (int(i) for i in np.argwhere(bad)[0])
      tok = int(body[row, col])
      raise TokenError(f"token {tok} ({vocab.describe(tok)}) in a weight slot (sequence {row}, position "
                       f"{prefix_len + col}): only codes 0..{vocab.num_codes - 1} decode to weights")
    return self.decode(body, vocab)

  def quantize(self, w) -> np.ndarray:
    """decode(encode(w))."""
    return self.decode(self.encode(w))

  # ----------------------------------------------------------------------------------------------
  # Save / restore.

  def save(self, path: str) -> None:
    meta = {**self.meta, 'format': FORMAT, 'group_names': list(self.chunking.group_names),
            'chunk': self.chunking.kind}
    buf = _io.BytesIO()
    extra = {} if self.keep is None else {'keep': self.keep, 'fixed': self.fixed}
    np.savez(buf, codebooks=self.codebooks, index=self.chunking.index, group=self.chunking.group,
             center=self.center, scale=self.scale, meta=np.array(json.dumps(meta, sort_keys=True, default=_json)),
             **extra)
    files.write_bytes(path, buf.getvalue())


def _json(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, (np.ndarray, tuple)):
    return np.asarray(o).tolist()
  raise TypeError(type(o))


def restore(path: str) -> Tokenizer:
  """Read a tokenizer file (or WORKDIR/tokenizer, the directory holding tokenizer.npz)."""
  if files.isdir(path):
    path = files.join(path, 'tokenizer.npz')
  if not files.exists(path):
    raise FileNotFoundError(f"no tokenizer at {path}: run the tokenize stage first")
  arrays = files.read_npz(path)
  meta = json.loads(str(arrays['meta']))
  if meta.get('format') != FORMAT:
    raise NfjaxError(f"{path} is not an nfjax tokenizer (format {meta.get('format')!r}, expected {FORMAT!r})")
  chunking = Chunking(index=arrays['index'].astype(np.int64), group=arrays['group'].astype(np.int32),
                      group_names=tuple(meta['group_names']), kind=meta['chunk'])
  return Tokenizer(codebooks=arrays['codebooks'], chunking=chunking, center=arrays['center'], scale=arrays['scale'],
                   meta=meta, keep=arrays.get('keep'), fixed=arrays.get('fixed'))
