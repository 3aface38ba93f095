"""The one I/O layer: every artifact under a workdir is read and written here.

  files.py    atomic writes and reads of JSON, .npy/.npz, PNG/GIF bytes; listings and removal
  workdir.py  stage directories, config fingerprints, the upstream digests a stage consumed
  fields.py   the weight dataset (WORKDIR/fields)
  tokens.py   the vocabulary and the token dataset (WORKDIR/tokens)
  samples.py  the samples/ contract (settings, per-setting arrays, packed meshes)
The tokenizer (tokenizer.npz) and the transformer (Orbax checkpoints) keep their formats beside
their code (nfjax/tokenizers/codebook.py, nfjax/checkpoint.py) and write through files.py.
"""
