"""Models that the train stage (nfjax/training/) trains: the GPT (token sequences) and the regression transformer.

`ModelDef` is the functional view of an NNX model used on every hot path: parameters live in a
plain nested dict of arrays (what Orbax saves and a user can open), and `bind(params)` rebuilds the
NNX module around them inside a trace (`nnx.merge`), so jitted code never closes over arrays.

    mdef = models.build(cfg)                       # GPTConfig | RegressionConfig, or its dict
    params = jax.jit(mdef.init, out_shardings=mdef.shardings(mesh))(key)
    logits = mdef.bind(params)(tokens)             # inside or outside jit
    models.to_dict(cfg) / models.config_from_dict(d)   # what WORKDIR/transformer/model.json holds
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import Mesh

from nfjax import sharding
from nfjax.models.gpt import GPT, GPTConfig, KVCache, TransformerConfig
from nfjax.models.regression import RegressionConfig, RegressionTransformer

KINDS = {'gpt': (GPTConfig, GPT), 'regression': (RegressionConfig, RegressionTransformer)}

# What each parameter is, by its name (the last key of its path): the weight-decay mask uses it.
KERNELS = ('qkv_kernel', 'out_kernel', 'mlp_in_kernel', 'mlp_out_kernel', 'lm_head', 'head')
EMBEDDINGS = ('wte', 'wpe', 'wce', 'wcb', 'start', 'value_kernel')


def param_kind(path: tuple) -> str:
  """'kernel' | 'embedding' | 'bias' | 'norm' for a parameter path like ('blocks', 'qkv_kernel')."""
  name = str(path[-1])
  if name in KERNELS:
    return 'kernel'
  if name in EMBEDDINGS:
    return 'embedding'
  if name.startswith('ln'):
    return 'norm'
  if name.endswith('bias'):
    return 'bias'
  raise ValueError(f"unclassified parameter {'/'.join(map(str, path))}: add it to nfjax.models.KERNELS/EMBEDDINGS")

__all__ = ['GPT', 'GPTConfig', 'KVCache', 'ModelDef', 'RegressionConfig', 'RegressionTransformer',
           'TransformerConfig', 'build', 'config_from_dict', 'param_kind', 'to_dict']


def to_dict(cfg: TransformerConfig) -> dict:
  """The model config as saved (model.json, checkpoint meta). `attention` is left out: how attention
  is computed is not part of the model (all ways agree to float rounding), so a model trained with
  cuDNN attention on a GPU loads with the default ('auto') on a CPU. A GPT's `null_class` is there only
  when set (>= 0)."""
  d = {'kind': cfg.kind, **dataclasses.asdict(cfg)}
  d.pop('attention')
  if d.get('null_class') == -1:   # no classifier-free guidance: the dict of a model made before it existed
    d.pop('null_class')
  return d


def config_from_dict(d: dict) -> TransformerConfig:
  d = dict(d)
  cls = KINDS[d.pop('kind')][0]
  return cls(**d)


def _flat(tree) -> dict[tuple, object]:
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(prefix + (k,), v)
    else:
      out[prefix] = node
  walk((), tree)
  return out


def _unflat(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


class ModelDef:
  """A model config + its NNX graph; parameters as a nested dict of arrays."""

  def __init__(self, cfg: TransformerConfig):
    self.cfg = cfg
    self.module_cls = KINDS[cfg.kind][1]
    abstract = nnx.eval_shape(lambda: self.module_cls(cfg, rngs=nnx.Rngs(0)))
    self.graphdef, self._template = nnx.split(abstract)
    for path, var in nnx.to_flat_state(self._template):
      if not isinstance(var, nnx.Param):
        raise TypeError(f"{'/'.join(map(str, path))} is a {type(var).__name__}; models hold only nnx.Param")
    self.abstract_params = nnx.to_pure_dict(self._template)
    self.logical_axes = {tuple(path): var.get_metadata()['logical'] for path, var in nnx.to_flat_state(self._template)}

  @property
  def kind(self) -> str:
    return self.cfg.kind

  def init(self, key: jax.Array) -> dict:
    """Fresh parameters (call under jax.jit with out_shardings=self.shardings(mesh))."""
    return nnx.to_pure_dict(nnx.state(self.module_cls(self.cfg, rngs=nnx.Rngs(params=key))))

  def bind(self, params: dict):
    """The NNX module holding `params` (arrays or tracers)."""
    state = jax.tree.map(lambda v: v, self._template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def shardings(self, mesh: Mesh) -> dict:
    """NamedShardings of the parameters from their logical axes (`nfjax.sharding.fitted`)."""
    flat = _flat(self.abstract_params)
    return _unflat({p: sharding.fitted(mesh, self.logical_axes[p], a.shape) for p, a in flat.items()})

  def paths(self) -> list[tuple]:
    return list(_flat(self.abstract_params))

  def tree_from_paths(self, fn) -> dict:
    """A tree shaped like the parameters with fn(path) at every leaf."""
    return _unflat({p: fn(p) for p in _flat(self.abstract_params)})

  @property
  def num_params(self) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(self.abstract_params))

  @property
  def num_non_embedding_params(self) -> int:
    """nanoGPT's count (excludes the position table), for comparing with NeF-GPT's printed sizes."""
    wpe = self.abstract_params.get('wpe')
    return self.num_params - (math.prod(wpe.shape) if wpe is not None else 0)


def build(cfg: TransformerConfig | dict) -> ModelDef:
  return ModelDef(config_from_dict(cfg) if isinstance(cfg, dict) else cfg)
