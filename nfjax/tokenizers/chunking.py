"""How a flat weight vector is cut into the pieces that become tokens, and which codebook codes each.

A *chunk* is the unit one token (or Q tokens, for residual VQ) stands for:

  scalar   every weight is its own chunk (D = 1): NeF-GPT's tokenization.
  neuron   one neuron's incoming weights and its bias: row r of `layers.i.weight` followed by
           `layers.i.bias[r]` (D = fan_in + 1; fan_in for a layer without bias).
  fixed    `chunk_size` consecutive weights of one codebook group (the last chunk of a group is
           zero-padded).

Chunks are ordered by the flat offset of their first element, so scalar chunks are exactly the
PyTorch state_dict order and neuron chunks go layer by layer, neuron by neuron.

A *group* is a set of chunks that share one codebook:

  per_layer='off'     one codebook (neuron chunks of different widths: one per width)
  per_layer='layer'   one per layer (`layers.i.weight` + `layers.i.bias`)
  per_layer='tensor'  one per tensor of the layout (scalar / fixed chunking only)

Every group uses the same token ids 0..K-1; what a token means depends on the position it
appears at, which the sequence layout fixes.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from nfjax.errors import ConfigError

CHUNKS = ('scalar', 'neuron', 'fixed')
PER_LAYER = ('off', 'layer', 'tensor')
_NAME = re.compile(r'^(.*)\.(weight|bias)$')


@dataclasses.dataclass(frozen=True)
class Chunking:
  index: np.ndarray        # int64 [C, D]: flat weight index of each chunk element, -1 = padding
  group: np.ndarray        # int32 [C]: codebook group of each chunk
  group_names: tuple[str, ...]
  kind: str

  @property
  def num_chunks(self) -> int:
    return int(self.index.shape[0])

  @property
  def dim(self) -> int:
    return int(self.index.shape[1])

  @property
  def num_groups(self) -> int:
    return len(self.group_names)

  def gather(self, flat: np.ndarray) -> np.ndarray:
    """[N, P] -> [N, C, D] (padding = 0)."""
    flat = np.asarray(flat)
    out = flat[:, np.maximum(self.index, 0)]
    return np.where(self.index >= 0, out, 0).astype(flat.dtype)

  def scatter(self, chunks: np.ndarray, num_params: int) -> np.ndarray:
    """[N, C, D] -> [N, P] (padding dropped)."""
    chunks = np.asarray(chunks)
    out = np.zeros((chunks.shape[0], num_params), chunks.dtype)
    valid = self.index >= 0
    out[:, self.index[valid]] = chunks[:, valid]
    return out


def _layer_of(name: str) -> str:
  m = _NAME.match(name)
  return m.group(1) if m else name


def make(layout: list[dict], kind: str = 'scalar', per_layer: str = 'off', chunk_size: int = 8) -> Chunking:
  """Chunking of a flat vector with this layout (list of {name, shape, offset, size})."""
  if kind not in CHUNKS:
    raise ConfigError(f"config key tokenize.chunk={kind!r} is not one of {CHUNKS}")
  if per_layer not in PER_LAYER:
    raise ConfigError(f"config key tokenize.per_layer={per_layer!r} is not one of {PER_LAYER}")
  if kind == 'neuron' and per_layer == 'tensor':
    raise ConfigError("tokenize.per_layer='tensor' cannot be used with tokenize.chunk='neuron' (a neuron "
                      "chunk holds a weight row and its bias: two tensors); use per_layer='layer'")
  layers: dict[str, list[dict]] = {}
  for e in layout:
    layers.setdefault(_layer_of(e['name']), []).append(e)

  def group_key(e) -> str:
    if per_layer == 'tensor':
      return e['name']
    if per_layer == 'layer':
      return _layer_of(e['name'])
    return 'all'

  rows: list[list[int]] = []
  keys: list[str] = []
  if kind == 'scalar':
    for e in layout:
      for j in range(int(e['size'])):
        rows.append([int(e['offset']) + j])
        keys.append(group_key(e))
  elif kind == 'neuron':
    for lname, entries in layers.items():
      w = [e for e in entries if e['name'].endswith('.weight')]
      b = [e for e in entries if e['name'].endswith('.bias')]
      if len(w) != 1 or len(w[0]['shape']) != 2:
        raise ConfigError(f"tokenize.chunk='neuron' needs one 2-D weight per layer; layer {lname!r} has "
                          f"{[(e['name'], e['shape']) for e in entries]}")
      out_dim, in_dim = w[0]['shape']
      for r in range(out_dim):
        row = list(range(int(w[0]['offset']) + r * in_dim, int(w[0]['offset']) + (r + 1) * in_dim))
        if b:
          row.append(int(b[0]['offset']) + r)
        rows.append(row)
        keys.append(lname if per_layer == 'layer' else f'dim{len(row)}')
  else:
    if chunk_size < 1:
      raise ConfigError(f"config key tokenize.chunk_size={chunk_size} must be >= 1")
    by_group: dict[str, list[int]] = {}
    for e in layout:
      by_group.setdefault(group_key(e), []).extend(range(int(e['offset']), int(e['offset']) + int(e['size'])))
    for g, idx in by_group.items():
      for s in range(0, len(idx), chunk_size):
        rows.append(idx[s:s + chunk_size])
        keys.append(g)
  dim = max(len(r) for r in rows)
  index = np.full((len(rows), dim), -1, np.int64)
  for i, r in enumerate(rows):
    index[i, :len(r)] = r
  order = np.argsort(np.array([r[0] for r in rows]), kind='stable')
  index = index[order]
  keys = [keys[i] for i in order]
  names = tuple(dict.fromkeys(keys))  # first-appearance order
  group = np.array([names.index(k) for k in keys], np.int32)
  return Chunking(index=index, group=group, group_names=names, kind=kind)
