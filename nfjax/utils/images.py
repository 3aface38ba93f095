"""PNG helpers (PIL only): labelled grids of images, titles and captions that explain them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nfjax.io import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  return (np.clip(np.nan_to_num(np.asarray(images, np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


LINE = 12      # pixels per line of PIL's default bitmap font (about 6 pixels per character)
CELL_TEXT = 12  # pixels under every tile when a grid has cell labels


def grid(rows: Sequence[np.ndarray], row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, scale: int = 3, pad: int = 2,
         label_width: int = 90, cell_labels: Sequence[Sequence[str]] | None = None) -> Image.Image:
  """rows: list of [C, H, W] arrays in [0, 1] -> one image, a labelled row per array.

  cell_labels[i][j] (optional) is written under tile j of row i (rows get CELL_TEXT pixels taller)."""
  rows = [to_uint8(r) for r in rows]
  ncol = max(len(r) for r in rows)
  h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
  top = 14 if col_labels else 0
  left = label_width if row_labels else 0
  below = CELL_TEXT if cell_labels else 0
  canvas = Image.new('L', (left + ncol * (w + pad) + pad, top + len(rows) * (h + below + pad) + pad), 40)
  draw = ImageDraw.Draw(canvas)
  for i, r in enumerate(rows):
    y = tile_box(i, 0, h, w, pad, left, top, below)[1]
    if row_labels:
      lines = str(row_labels[i]).count('\n') + 1
      draw.text((4, y + h // 2 - 6 * lines), row_labels[i], fill=255)
    for j, img in enumerate(r):
      x = tile_box(i, j, h, w, pad, left, top, below)[0]
      canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, y))
      if col_labels and i == 0 and j < len(col_labels):
        draw.text((x + 1, 1), col_labels[j], fill=255)
      if cell_labels and i < len(cell_labels) and j < len(cell_labels[i]) and cell_labels[i][j]:
        draw.text((x + 1, y + h), cell_labels[i][j], fill=255)
  return canvas


def tile_box(i: int, j: int, h: int, w: int, pad: int = 2, left: int = 0, top: int = 0, below: int = 0
             ) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1), inclusive, of tile j of row i of a `grid` (tiles h x w pixels once scaled; `left`
  = its label width where it has row labels, `top` = 14 where it has column labels, `below` = CELL_TEXT
  where it has cell labels)."""
  x = left + pad + j * (w + pad)
  y = top + pad + i * (h + below + pad)
  return x, y, x + w - 1, y + h - 1


MARK = (230, 40, 40)   # the frame of a marked tile (e.g. a misclassified sample)


def mark_tiles(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], texts: Sequence[str] = (),
               color=MARK, width: int = 2) -> Image.Image:
  """An RGB copy of `image` with a `width`-pixel frame of `color` drawn inside each box (`tile_box`) and
  texts[k] (if given and not empty) in the top-left corner of box k: only those boxes' pixels change."""
  out = image.convert('RGB')
  draw = ImageDraw.Draw(out)
  for k, (x0, y0, x1, y1) in enumerate(boxes):
    draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
    text = texts[k] if k < len(texts) else ''
    font = ImageFont.load_default()
    while text and font.getlength(text) + 3 > x1 - x0 - 2 * width:   # stays inside the tile
      text = text[:-1]
    if text:
      tw = int(font.getlength(text)) + 3
      draw.rectangle((x0 + width, y0 + width, x0 + width + tw, min(y1 - width, y0 + width + 11)), fill=color)
      draw.text((x0 + width + 1, y0 + width), text, fill=(255, 255, 255))
  return out


def wrap(text: str, width: int) -> list[str]:
  """`text` broken at spaces into lines of at most `width` pixels of the default font ('\n' kept)."""
  font = ImageFont.load_default()
  out = []
  for para in str(text).split('\n'):
    line = ''
    for word in para.split(' '):
      trial = f"{line} {word}" if line else word
      if line and font.getlength(trial) > width:
        out.append(line)
        line = word
      else:
        line = trial
    out.append(line)
  return out


def captioned(image: Image.Image, title: str | Sequence[str] = (), caption: str | Sequence[str] = (),
              min_width: int = 240) -> Image.Image:
  """`image` with title lines above it and caption lines (what its labels mean) below it, wrapped to
  its width (widened to `min_width` so that a narrow grid keeps a legible title)."""
  title = [title] if isinstance(title, str) else list(title)
  caption = [caption] if isinstance(caption, str) else list(caption)
  if not title and not caption:
    return image
  width = max(image.width, min_width)
  heads = [ln for t in title if t for ln in wrap(t, width - 8)]
  notes = [ln for t in caption if t for ln in wrap(t, width - 8)]
  top = LINE * len(heads) + (4 if heads else 0)
  bottom = LINE * len(notes) + (4 if notes else 0)
  bg = 40 if image.mode == 'L' else (40, 40, 40)
  fg = 255 if image.mode == 'L' else (255, 255, 255)
  canvas = Image.new(image.mode, (width, image.height + top + bottom), bg)
  canvas.paste(image, (0, top))
  draw = ImageDraw.Draw(canvas)
  for k, ln in enumerate(heads):
    draw.text((4, 2 + k * LINE), ln, fill=fg)
  for k, ln in enumerate(notes):
    draw.text((4, top + image.height + 2 + k * LINE), ln, fill=fg)
  return canvas


def setting_title(setting: dict) -> str:
  """The sampling setting of a grid in words: 'sampling topk3_t0.8: top-k 3, temperature 0.8, top-p
  off (1)' ('off' where the filter is switched off); a guidance scale (', classifier-free guidance 2'),
  the training support (sample.support), beam search and other fields are named too."""
  name = setting.get('name', '')
  if int(setting.get('beam_width', 0) or 0) > 0:
    parts = [f"beam search, width {int(setting['beam_width'])} (the most likely field per class)"]
  else:
    k, t, p = int(setting.get('top_k', 0)), float(setting.get('temperature', 1.0)), float(setting.get('top_p', 1.0))
    parts = [f"top-k {k}" if k > 0 else "top-k off (0)",
             f"temperature {t:g}" + (" (greedy)" if t == 0 else ''),
             f"top-p {p:g}" if p < 1.0 else "top-p off (1)"]
    if 'guidance' in setting:
      parts.append(f"classifier-free guidance {float(setting['guidance']):g}")
    if setting.get('support', 'all') == 'training':
      parts.append("each slot inside its training codes (support training)")
  known = {'name', 'top_k', 'temperature', 'top_p', 'beam_width', 'guidance', 'support'}
  parts += [f"{k.replace('_', ' ')} {v}" for k, v in setting.items() if k not in known]
  return f"sampling {name}: " + ', '.join(parts) if name else 'sampling: ' + ', '.join(parts)


def save_png(image: Image.Image, path: str) -> None:
  files.write_png(path, image)
