"""Weight tokenizers: scalar / vector / residual VQ and uniform / quantile bins over neural-field weights.

  settings = tokenizers.Settings(method='scalar_vq', num_codes=245, residual=True)
  tok = tokenizers.fit(settings, train_weights, layout, shared_init=init)
  tokens = tokenizers.encode(tok, weights)        # [N, tokens_per_field] code ids (the configured encoder)
  weights_q = tok.decode(tokens)                  # [N, P]; special tokens in weight slots raise TokenError
  tok.save(path); tok = tokenizers.restore(path)  # one numpy-readable .npz (see codebook.py)

The vocabulary around the codes (specials, class tokens) is `nfjax.io.tokens.Vocab`.
"""

from nfjax.errors import ConfigError
from nfjax.fields import mlp
from nfjax.tokenizers import compensate
from nfjax.tokenizers.build import ENCODERS, METHODS, NORMALIZE, Settings, fit
from nfjax.tokenizers.chunking import CHUNKS, PER_LAYER, Chunking
from nfjax.tokenizers.codebook import FORMAT, Tokenizer, TokenizerMismatch, describe_layout, restore


def encode(tok: Tokenizer, weights, encoder: str | None = None):
  """Weights [N, P] -> tokens [N, tok.tokens_per_field] with the tokenizer's configured encoder (or
  `encoder` if given); positions the tokenizer drops as constant are left out (Tokenizer.select).

  'nearest': each chunk's nearest code (Tokenizer.encode). 'compensated': GPTQ-style rounding that
  spreads each weight's rounding error over the weights not yet rounded (image fields, scalar
  codebooks; see compensate.py)."""
  return tok.select(encode_full(tok, weights, encoder))


def encode_full(tok: Tokenizer, weights, encoder: str | None = None):
  """`encode` at every token position [N, tok.full_tokens_per_field], dropped ones included."""
  encoder = encoder or tok.meta.get('encoder', 'nearest')
  if encoder == 'nearest':
    return tok.encode_full(weights)
  if encoder == 'compensated':
    if not tok.meta.get('field') or not tok.meta.get('image_shape'):
      raise ConfigError("tokenize.encoder='compensated' needs the field architecture and image shape "
                        "(image fields); use encoder='nearest'")
    return compensate.encode(tok, weights, mlp.FieldSpec.from_dict(tok.meta['field']), tok.meta['image_shape'],
                             damp=float(tok.meta.get('compensate_damp', 1e-2)))
  raise ValueError(f"unknown encoder {encoder!r}; encoders: {ENCODERS}")


__all__ = ['CHUNKS', 'ENCODERS', 'FORMAT', 'METHODS', 'NORMALIZE', 'PER_LAYER', 'Chunking', 'Settings', 'Tokenizer',
           'TokenizerMismatch', 'describe_layout', 'encode', 'encode_full', 'fit', 'restore']
