"""The regression transformer: NeF-GPT's first experiment, done properly.

It reads continuous weights instead of tokens and predicts the next weight as one scalar.
Input sequence for a field with weights w_0..w_{P-1} (normalised):

    [start(class), w_0, w_1, ..., w_{P-2}]   ->   predictions of   [w_0, w_1, ..., w_{P-1}]

so every weight is a target (block_size >= P). Each input value goes through a real input
embedding `value * value_kernel + value_bias` (NeF-GPT computed `in_to_emb(x)` and then discarded
it, adding the raw scalar to every channel of the position embedding). The first input is a learned
start embedding per class (one shared start when unconditional). Blocks, positions and ln_f are
the GPT's; the head is Linear(D, 1, no bias). Loss: L1 (NeF-GPT's code) or MSE (its report).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import gpt
from nfjax.models.gpt import TransformerConfig, layer_norm, param

LOSSES = ('l1', 'mse')


@dataclasses.dataclass(frozen=True)
class RegressionConfig(TransformerConfig):
  num_classes: int = 0      # 0 = unconditional (one start embedding)
  loss: str = 'l1'          # l1 | mse

  def __post_init__(self):
    super().__post_init__()
    if self.loss not in LOSSES:
      raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")

  @property
  def kind(self) -> str:
    return 'regression'


class RegressionTransformer(nnx.Module):

  def __init__(self, cfg: RegressionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.value_kernel = param(gpt.normal(rngs.params(), (d,), 1.0), 'embed')
    self.value_bias = param(jnp.zeros((d,), jnp.float32), 'embed')
    self.start = param(gpt.normal(rngs.params(), (max(1, cfg.num_classes), d), cfg.init_std), 'classes', 'embed')
    if cfg.position == 'learned':
      self.wpe = param(gpt.normal(rngs.params(), (cfg.block_size, d), cfg.init_std), None, 'embed')
    self.blocks = gpt.Blocks(cfg, rngs=rngs)
    self.ln_f_scale = param(jnp.ones((d,), jnp.float32), 'norm')
    self.ln_f_bias = param(jnp.zeros((d,), jnp.float32), 'norm') if cfg.bias else None
    self.head = param(gpt.normal(rngs.params(), (d,), cfg.init_std), 'embed')

  def __call__(self, values: jax.Array, labels: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    """values float [B, T] (inputs after the start), labels int [B] -> predictions float32 [B, T+1]."""
    cfg = self.cfg
    b, t = values.shape
    if labels is None or cfg.num_classes == 0:
      labels = jnp.zeros((b,), jnp.int32)
    start = jnp.take(self.start[...], labels, axis=0)[:, None, :]                       # [B, 1, D]
    emb = values.astype(jnp.float32)[..., None] * self.value_kernel[...] + self.value_bias[...]
    x = jnp.concatenate([start, emb], axis=1)                                           # [B, T+1, D]
    positions = jnp.broadcast_to(jnp.arange(t + 1, dtype=jnp.int32), (b, t + 1))
    if cfg.position == 'learned':
      x = x + jnp.take(self.wpe[...], positions, axis=0)
    x = gpt.dropout(x.astype(cfg.compute_dtype), cfg.dropout,
                       None if rng is None else jax.random.fold_in(rng, 1 << 20))
    x, _ = self.blocks(x, positions, rng=rng)
    x = layer_norm(x, self.ln_f_scale[...], None if self.ln_f_bias is None else self.ln_f_bias[...], cfg.ln_eps)
    return jnp.einsum('btd,d->bt', x, self.head[...].astype(x.dtype), preferred_element_type=jnp.float32)


def regression_error(pred: jax.Array, target: jax.Array, loss: str) -> jax.Array:
  d = pred - target.astype(jnp.float32)
  return jnp.abs(d) if loss == 'l1' else jnp.square(d)
