"""Survival metrics (NumPy, on host): Harrell's C-index."""

from __future__ import annotations

import numpy as np


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


__all__ = ["c_index"]
