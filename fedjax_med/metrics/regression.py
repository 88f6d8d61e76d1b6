"""Regression metrics (NumPy, on host): mean absolute error and root mean squared error.

    MAE  = (1/n) sum_i |y_i - yhat_i|
    RMSE = sqrt((1/n) sum_i (y_i - yhat_i)^2)

Both in the units of the target (UPDRS points for Parkinson's telemonitoring),
computed in float64; NaN for an empty set (e.g. a site without test rows).
"""

from __future__ import annotations

import numpy as np


def _regression_inputs(y_true, y_pred, name):
  y = np.asarray(y_true, dtype=np.float64).reshape(-1)
  p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
  if y.shape != p.shape:
    raise ValueError(f"{name}: y_true has {y.size} entries, y_pred has {p.size}")
  if not np.isfinite(y).all():
    raise ValueError(f"{name}: y_true contains NaN or inf")
  if not np.isfinite(p).all():
    raise ValueError(f"{name}: y_pred contains NaN or inf")
  return y, p


def mae(y_true, y_pred) -> float:
  """Mean absolute error; NaN for an empty set."""
  y, p = _regression_inputs(y_true, y_pred, "mae")
  if y.size == 0:
    return float("nan")
  return float(np.mean(np.abs(y - p)))


def rmse(y_true, y_pred) -> float:
  """Root mean squared error; NaN for an empty set."""
  y, p = _regression_inputs(y_true, y_pred, "rmse")
  if y.size == 0:
    return float("nan")
  return float(np.sqrt(np.mean((y - p) ** 2)))


__all__ = ["mae", "rmse"]
