"""Evaluation of generated neural fields: the protocol every modality shares, and metric libraries.

  protocol.py       the frame: settings, the reference split, ceiling, baseline, no-structure rows, per-sample
                    files, headline (the modality's Evaluator plugs its metrics in)
  image_metrics.py  SSIM (pairwise, tiled), NeF-GPT's MMD / COV / 1-NNA, Fréchet distance, PSNR
  classifier.py     nfjax's own small MNIST CNN (class consistency, FD features)
  shape_metrics.py  point clouds, squared Chamfer (JAX, tiled), MMD-CD / COV / 1-NNA, bootstrap
  pointnet2.py      HyperDiffusion's PointNet++ SSG in JAX (FPD features)
  novelty.py        nearest training example / weight vector, histogram and neighbour PNGs
  no_structure.py   the no-structure row: tokens drawn per slot from each class's training-token histogram
The modalities' evaluators: nfjax/modalities/images/evaluate.py, nfjax/modalities/shapes/evaluate.py.
"""
