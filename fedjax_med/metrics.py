"""Evaluation metrics (NumPy, on host): accuracy, ROC-AUC and the C-index.

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
  # Average rank (1-based) over each run of tied scores.
  boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [s.size]])
  for a, b in zip(starts, ends):
    ranks[order[a:b]] = 0.5 * (a + 1 + b)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def c_index(time, event, risk) -> float:
  """Harrell's concordance index of risk scores (higher risk = earlier event).

      C = (#concordant + 0.5 #tied-risk) / #admissible

  over ordered pairs (i, j) where i has an event (E_i = 1) and
    * j has an event and T_i < T_j, or
    * j is censored and T_i <= T_j (censored at the time of i's event or
      later: still at risk when i's event happened);
  two events at the same time, and pairs without an event, are not
  admissible. A pair is concordant when risk_i > risk_j and tied when
  risk_i = risk_j (counted 0.5). These are exactly the conventions of
  `lifelines.utils.concordance_index(time, -risk, event)`, FLamby's
  Fed-TCGA-BRCA metric.

  Plain O(n^2) NumPy (n up to a few thousand).

  Args:
    time: `[n]` event or censoring times.
    event: `[n]` event indicators, 1 = event observed, 0 = censored.
    risk: `[n]` predicted risk scores (e.g. Cox log-hazards).

  Returns:
    C in [0, 1]; NaN when there is no admissible pair (no event, no row
    still at risk at any event time, n < 2). lifelines raises
    ZeroDivisionError ("No admissable pairs in the dataset") there instead.

  Raises:
    ValueError when the shapes differ or an input holds NaN (as lifelines),
    or when event holds values other than 0 and 1.
  """
  t = np.asarray(time, dtype=np.float64).reshape(-1)
  e = np.asarray(event, dtype=np.float64).reshape(-1)
  r = np.asarray(risk, dtype=np.float64).reshape(-1)
  if not t.shape == e.shape == r.shape:
    raise ValueError(
        f"c_index: time, event and risk must have the same length, got"
        f" {t.size}, {e.size} and {r.size}")
  for name, a in (("time", t), ("event", e), ("risk", r)):
    if np.isnan(a).any():
      raise ValueError(f"c_index: {name} contains NaN")
  if not np.isin(e, (0.0, 1.0)).all():
    raise ValueError("c_index: event must hold indicators in {0, 1}")
  died = e.astype(bool)
  t_i, t_j = t[:, None], t[None, :]
  admissible = died[:, None] & np.where(died[None, :], t_i < t_j, t_i <= t_j)
  num_pairs = int(admissible.sum())
  if num_pairs == 0:
    return float("nan")
  r_i, r_j = r[:, None], r[None, :]
  correct = int((admissible & (r_i > r_j)).sum())
  tied = int((admissible & (r_i == r_j)).sum())
  return float((correct + tied / 2) / num_pairs)


def nanmean(values) -> float:
  """Mean over the defined values (NaN where none is defined)."""
  v = np.asarray(values, dtype=np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


__all__ = ["accuracy", "roc_auc", "c_index", "nanmean"]
