"""Choosing examples to show: k of them spread over the classes."""

from __future__ import annotations

import numpy as np


def per_class(labels, k: int, candidates=None, sort: bool = True) -> np.ndarray:
  """k indices spread over the classes: the first candidate of each class in turn (classes in
  increasing order), then the second, ... `candidates` (default: all rows) are taken in their
  order; the result is sorted unless sort=False (then in the order picked)."""
  labels = np.asarray(labels)
  candidates = np.arange(len(labels)) if candidates is None else np.asarray(candidates, np.int64)
  lists = [list(candidates[labels[candidates] == c]) for c in np.unique(labels[candidates])]
  out = []
  while len(out) < k and any(lists):
    for lst in lists:
      if lst and len(out) < k:
        out.append(int(lst.pop(0)))
  out = np.asarray(out, np.int64)
  return np.sort(out) if sort else out


def class_rows(labels: np.ndarray, num_classes: int, k: int) -> list[tuple[int, np.ndarray]]:
  """(class, its first k indices) for every class 0..num_classes-1 that has any: one picture row each."""
  rows = []
  for c in range(num_classes):
    idx = np.nonzero(np.asarray(labels) == c)[0][:k]
    if len(idx):
      rows.append((c, idx))
  return rows
