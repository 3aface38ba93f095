"""The five stages, each a module with `run(config, workdir) -> summary dict` (nfjax/pipeline.py runs them).

  fit       the modality's data -> fields/
  tokenize  fields/ -> tokenizer/ + tokens/
  train     tokens/ (or fields/) -> transformer/
  sample    transformer/ + tokenizer/ -> samples/
  evaluate  samples/ + fields/ -> eval/
No stage imports another or names a modality: they ask nfjax.modalities for what differs.
"""
