"""Classification metrics (NumPy, on host): accuracy and ROC-AUC.

These run once per evaluation on a few thousand predictions, so they are
plain NumPy for exactness and readability.
"""

from __future__ import annotations

import numpy as np


def _binary_inputs(y_true, scores, name):
  y = np.asarray(y_true).reshape(-1)
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"{name}: y_true has {y.size} entries, scores has {s.size}")
  if not np.isin(y, (0, 1)).all():
    raise ValueError(f"{name}: y_true must hold labels in {{0, 1}}")
  if not np.isfinite(s).all():
    raise ValueError(f"{name}: scores contain NaN or inf")
  return y.astype(bool), s


def accuracy(y_true, probabilities, threshold: float = 0.5) -> float:
  """Share of rows with (p > threshold) == y (FLamby's heart-disease metric).

  NaN for an empty set.
  """
  y, p = _binary_inputs(y_true, probabilities, "accuracy")
  if y.size == 0:
    return float("nan")
  return float(np.mean((p > threshold) == y))


def roc_auc(y_true, scores) -> float:
  """Area under the ROC curve, ties counted one half (Mann-Whitney U).

  AUC = P(score_pos > score_neg) + 0.5 P(score_pos = score_neg), computed from
  average ranks. NaN when y_true holds a single class (AUC is undefined).
  """
  y, s = _binary_inputs(y_true, scores, "roc_auc")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  sorted_s = s[order]
  ranks = np.empty(s.size, np.float64)
  # Average rank (1-based) over each run of tied scores, vectorised (an image
  # has ~10^6 pixels and as many distinct scores).
  boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [s.size]])
  ranks[order] = np.repeat(0.5 * (starts + 1 + ends), ends - starts)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def nanmean(values) -> float:
  """Mean over the defined values (NaN where none is defined)."""
  v = np.asarray(values, dtype=np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


__all__ = ["accuracy", "roc_auc", "nanmean"]
