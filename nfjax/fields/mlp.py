"""Functional neural-field MLPs over stacked parameter pytrees.

A field's parameters are a list of layers, each `{'weight': (out, in), 'bias': (out,)}`, i.e.
PyTorch `nn.Linear` orientation. Flattening walks the layers in order and writes each weight
row-major, then its bias: exactly PyTorch's `state_dict` order (`layers.0.weight`,
`layers.0.bias`, `layers.1.weight`, ...). A weight vector therefore means the same thing in nfjax
and in NeF-GPT. Every function accepts any number of leading (field) axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.errors import ConfigError

ACTIVATIONS = ('relu', 'gelu', 'silu', 'tanh', 'sine')
OUTPUT_ACTIVATIONS = ('none', 'sigmoid', 'tanh')
INITS = ('xavier_relu', 'torch_default', 'siren')

Params = list  # list[dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """Architecture of one neural field."""
  in_dims: int = 2
  freqs: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
  use_pi: bool = False
  include_input: bool = False
  hidden: tuple[int, ...] = (16, 16)
  activation: str = 'relu'
  siren_w0: float = 30.0
  out_dims: int = 1
  output_bias: bool = True
  output_activation: str = 'none'
  init: str = 'xavier_relu'

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"config key field.activation={self.activation!r} is not one of {ACTIVATIONS}")
    if self.output_activation not in OUTPUT_ACTIVATIONS:
      raise ConfigError(
          f"config key field.output_activation={self.output_activation!r} is not one of {OUTPUT_ACTIVATIONS}")
    if self.init not in INITS:
      raise ConfigError(f"config key field.init={self.init!r} is not one of {INITS}")
    if self.in_dims < 1 or self.out_dims < 1 or any(h < 1 for h in self.hidden):
      raise ConfigError("field.in_dims, field.out_dims and every field.hidden width must be >= 1")
    if not self.include_input and not self.freqs:
      raise ConfigError("field has no input features: set field.include_input=True or give field.freqs")

  @classmethod
  def from_config(cls, cfg) -> 'FieldSpec':
    return cls(in_dims=int(cfg.in_dims), freqs=tuple(float(f) for f in cfg.freqs),
               use_pi=bool(cfg.use_pi), include_input=bool(cfg.include_input),
               hidden=tuple(int(h) for h in cfg.hidden), activation=str(cfg.activation),
               siren_w0=float(cfg.siren_w0), out_dims=int(cfg.out_dims),
               output_bias=bool(cfg.output_bias), output_activation=str(cfg.output_activation),
               init=str(cfg.init))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['freqs'] = list(self.freqs)
    d['hidden'] = list(self.hidden)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> 'FieldSpec':
    d = dict(d)
    d['freqs'] = tuple(d['freqs'])
    d['hidden'] = tuple(d['hidden'])
    return cls(**d)

  @property
  def encoded_dims(self) -> int:
    return self.in_dims * (int(self.include_input) + 2 * len(self.freqs))

  @property
  def layer_dims(self) -> list[tuple[int, int, bool]]:
    """(out, in, has_bias) per Linear layer."""
    dims = [self.encoded_dims, *self.hidden, self.out_dims]
    n = len(dims) - 1
    return [(dims[i + 1], dims[i], self.output_bias or i < n - 1) for i in range(n)]

  @property
  def layout(self) -> list[dict]:
    """Name, shape, offset and size of every tensor in the flat vector (state_dict order)."""
    out, offset = [], 0
    for i, (o, n_in, has_bias) in enumerate(self.layer_dims):
      entries = [(f'layers.{i}.weight', (o, n_in))]
      if has_bias:
        entries.append((f'layers.{i}.bias', (o,)))
      for name, shape in entries:
        size = int(np.prod(shape))
        out.append({'name': name, 'shape': list(shape), 'offset': offset, 'size': size})
        offset += size
    return out

  @property
  def num_params(self) -> int:
    return sum(e['size'] for e in self.layout)


# ---------------------------------------------------------------------------------------------
# Encoding and forward pass.

def encode(spec: FieldSpec, x: jax.Array, axis: int = -1) -> jax.Array:
  """[..., in_dims] coordinates -> [..., encoded_dims] features (along `axis`: -2 takes [..., in_dims, n]
  to [..., encoded_dims, n], the stacked fit's layout).

  Order (nerf-pytorch / NeF-GPT): [x] if include_input, then for each frequency f:
  sin(f x) (all input dims), cos(f x) (all input dims). f is multiplied by pi if use_pi.
  """
  feats = [x] if spec.include_input else []
  scale = math.pi if spec.use_pi else 1.0
  for f in spec.freqs:
    feats.append(jnp.sin(f * scale * x))
    feats.append(jnp.cos(f * scale * x))
  return jnp.concatenate(feats, axis=axis)


def _act(spec: FieldSpec, h: jax.Array, first: bool) -> jax.Array:
  if spec.activation == 'relu':
    return jax.nn.relu(h)
  if spec.activation == 'gelu':
    return jax.nn.gelu(h, approximate=False)
  if spec.activation == 'silu':
    return jax.nn.silu(h)
  if spec.activation == 'tanh':
    return jnp.tanh(h)
  return jnp.sin(spec.siren_w0 * h if first else h)


def dense(layer: dict, h: jax.Array) -> jax.Array:
  """One layer's pre-activation on points-major inputs: h [n, in] -> [n, out]."""
  z = h @ layer['weight'].T
  return z + layer['bias'] if 'bias' in layer else z


def apply_encoded(spec: FieldSpec, params: Params, feats: jax.Array) -> jax.Array:
  """One field (no leading field axis) on encoded features [n, encoded_dims] -> raw [n, out]."""
  h = feats
  n = len(params)
  for i, layer in enumerate(params):
    h = dense(layer, h)
    if i < n - 1:
      h = _act(spec, h, first=(i == 0))
  return h


def output(spec: FieldSpec, raw: jax.Array) -> jax.Array:
  """Raw network output -> field value (after output_activation)."""
  if spec.output_activation == 'sigmoid':
    return jax.nn.sigmoid(raw)
  if spec.output_activation == 'tanh':
    return jnp.tanh(raw)
  return raw


def apply(spec: FieldSpec, params: Params, x: jax.Array) -> jax.Array:
  """One field on coordinates [n, in_dims] -> field values [n, out] (after output_activation)."""
  return output(spec, apply_encoded(spec, params, encode(spec, x)))


# ---------------------------------------------------------------------------------------------
# Initialisation.

def init(spec: FieldSpec, key: jax.Array) -> Params:
  """Parameters of one field.

  xavier_relu: NeF-GPT's MNIST scratch init (xavier_uniform with gain sqrt(2) on weights, PyTorch's
  default U(+-1/sqrt(fan_in)) on biases). torch_default: PyTorch nn.Linear's default on both.
  siren: Sitzmann et al. (first layer U(+-1/fan_in), others U(+-sqrt(6/fan_in)/w0)).
  """
  params = []
  keys = jax.random.split(key, 2 * len(spec.layer_dims))
  for i, (o, n_in, has_bias) in enumerate(spec.layer_dims):
    kw, kb = keys[2 * i], keys[2 * i + 1]
    if spec.init == 'xavier_relu':
      lim = math.sqrt(2.0) * math.sqrt(6.0 / (n_in + o))
    elif spec.init == 'torch_default':
      lim = 1.0 / math.sqrt(n_in)
    else:
      lim = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in) / spec.siren_w0
    layer = {'weight': jax.random.uniform(kw, (o, n_in), jnp.float32, -lim, lim)}
    if has_bias:
      blim = 1.0 / math.sqrt(n_in)
      layer['bias'] = jax.random.uniform(kb, (o,), jnp.float32, -blim, blim)
    params.append(layer)
  return params


# ---------------------------------------------------------------------------------------------
# Flat vectors <-> parameter pytrees.

def flatten(spec: FieldSpec, params: Params) -> jax.Array:
  """Params with leading axes [...] -> [..., P] in PyTorch state_dict order."""
  parts = []
  for i, (o, n_in, has_bias) in enumerate(spec.layer_dims):
    w = params[i]['weight']
    lead = w.shape[:-2]
    parts.append(w.reshape(*lead, o * n_in))
    if has_bias:
      parts.append(params[i]['bias'])
  return jnp.concatenate(parts, axis=-1)


def unflatten(spec: FieldSpec, vec: Any) -> Params:
  """[..., P] -> params with leading axes [...]. Works on numpy and JAX arrays."""
  if vec.shape[-1] != spec.num_params:
    raise ValueError(f"weight vectors have {vec.shape[-1]} entries, the field has {spec.num_params}")
  lead = vec.shape[:-1]
  params, offset = [], 0
  for o, n_in, has_bias in spec.layer_dims:
    layer = {'weight': vec[..., offset:offset + o * n_in].reshape(*lead, o, n_in)}
    offset += o * n_in
    if has_bias:
      layer['bias'] = vec[..., offset:offset + o]
      offset += o
    params.append(layer)
  return params


def stack(params: Params, n: int) -> Params:
  """Broadcast one field's params to a stack of n fields."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), params)


# ---------------------------------------------------------------------------------------------
# Images.

def pixel_centres(height: int, width: int) -> np.ndarray:
  """[H*W, 2] coordinates (x = column, y = row) of pixel centres in [0, 1], row-major.

  Fitting and rendering both use these (NeF-GPT trained on x/28 and rendered on linspace(0,1,28)).
  """
  xs = (np.arange(width, dtype=np.float64) + 0.5) / width
  ys = (np.arange(height, dtype=np.float64) + 0.5) / height
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def render_images(spec: FieldSpec, params: Params, height: int, width: int) -> jax.Array:
  """Stacked params [F, ...] -> images [F, H, W] in [0, 1] (sigmoid of the logit for logit fields)."""
  feats = encode(spec, jnp.asarray(pixel_centres(height, width)))

  def one(p):
    raw = apply_encoded(spec, p, feats)[:, 0]
    return jax.nn.sigmoid(raw) if spec.output_activation == 'none' else output(spec, raw)

  return jax.vmap(one)(params).reshape(-1, height, width)


def render_weights(spec: FieldSpec, weights: np.ndarray, height: int, width: int,
                   batch: int = 1024) -> np.ndarray:
  """Flat weight vectors [N, P] -> images [N, H, W] (numpy), in jitted batches."""
  weights = np.asarray(weights, np.float32)
  fn = jax.jit(lambda w: render_images(spec, unflatten(spec, w), height, width))
  out = [np.asarray(fn(weights[i:i + batch])) for i in range(0, len(weights), batch)]
  return np.concatenate(out) if out else np.zeros((0, height, width), np.float32)


def psnr(pred: jax.Array, target: jax.Array, axis: Sequence[int] | int = -1) -> jax.Array:
  """PSNR in dB for values in [0, 1]."""
  mse = jnp.mean((pred - target) ** 2, axis=axis)
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))
