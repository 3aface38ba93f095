"""PNG helpers (PIL only): labelled grids of images."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nfjax.io import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  return (np.clip(np.nan_to_num(np.asarray(images, np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid(rows: Sequence[np.ndarray], row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, scale: int = 3, pad: int = 2,
         label_width: int = 90) -> Image.Image:
  """rows: list of [C, H, W] arrays in [0, 1] -> one image, a labelled row per array."""
  rows = [to_uint8(r) for r in rows]
  ncol = max(len(r) for r in rows)
  h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
  top = 14 if col_labels else 0
  left = label_width if row_labels else 0
  canvas = Image.new('L', (left + ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), 40)
  draw = ImageDraw.Draw(canvas)
  for i, r in enumerate(rows):
    y = top + pad + i * (h + pad)
    if row_labels:
      draw.text((4, y + h // 2 - 6), row_labels[i], fill=255)
    for j, img in enumerate(r):
      x = left + pad + j * (w + pad)
      canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, y))
      if col_labels and i == 0 and j < len(col_labels):
        draw.text((x + 1, 1), col_labels[j], fill=255)
  return canvas


def save_png(image: Image.Image, path: str) -> None:
  files.write_png(path, image)
