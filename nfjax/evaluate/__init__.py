"""Evaluation of generated neural fields (the evaluate stage and its metrics).

  stage.py          the stage: samples/ + fields/ -> eval/ (run, validate); dispatches on fields' kind
  shapes.py         the stage's shape branch: meshes, HyperDiffusion's protocol, novelty, context
  shape_metrics.py  point clouds, squared Chamfer (JAX, tiled), MMD-CD / COV / 1-NNA, bootstrap
  image_metrics.py  SSIM (pairwise, tiled), NeF-GPT's MMD / COV / 1-NNA, Fréchet distance
  classifier.py     nfjax's own small MNIST CNN (class consistency, FD features)
  novelty.py        nearest training image / weight vector, histogram and neighbour PNGs
  samples.py        the samples/ contract reader; perturbed training fields (baseline, fakes)
"""
