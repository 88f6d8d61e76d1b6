"""Multi-task classification metrics with missing labels (NumPy, on host).

Labels come as (labels [n, T], observed [n, T]) (or y [n, T, 2], the layout
of `fedjax_med.data.tox21`). Each task is scored on its observed rows only,
with `fedjax_med.metrics.classification.roc_auc` (Mann-Whitney, ties 1/2):

    AUC_t = roc_auc(labels[o_t, t], scores[o_t, t]),   o_t = rows where task t is observed

AUC_t is NaN when task t has no observed row or only one class among them;
`mean_roc_auc` averages the defined AUC_t (MoleculeNet's and DeepChem's
convention for Tox21: mean ROC-AUC over the 12 assays).
"""

from __future__ import annotations

import numpy as np

from fedjax_med.metrics.classification import nanmean, roc_auc


def _inputs(labels, observed, scores, name):
  labels = np.asarray(labels)
  observed = np.asarray(observed)
  scores = np.asarray(scores, dtype=np.float64)
  if labels.ndim != 2 or labels.shape != observed.shape or labels.shape != scores.shape:
    raise ValueError(
        f"{name}: labels, observed and scores must all be [n, T]; got shapes"
        f" {labels.shape}, {observed.shape}, {scores.shape}")
  if not np.isin(observed, (0, 1)).all():
    raise ValueError(f"{name}: observed must hold 0/1 (or bool) flags")
  return labels, observed.astype(bool), scores


def per_task_roc_auc(labels, observed, scores) -> np.ndarray:
  """`[T]` ROC-AUC of every task on its observed rows (NaN where undefined)."""
  labels, observed, scores = _inputs(labels, observed, scores, "per_task_roc_auc")
  return np.asarray([roc_auc(labels[observed[:, t], t], scores[observed[:, t], t])
                     for t in range(labels.shape[1])], np.float64)


def mean_roc_auc(labels, observed, scores) -> float:
  """Mean over the tasks whose ROC-AUC is defined (NaN when none is)."""
  return nanmean(per_task_roc_auc(labels, observed, scores))


def split_observed(y) -> tuple[np.ndarray, np.ndarray]:
  """y `[n, T, 2]` = (label, observed) -> (labels [n, T], observed [n, T])."""
  y = np.asarray(y)
  if y.ndim != 3 or y.shape[2] != 2:
    raise ValueError(f"split_observed: y must be [n, T, 2] = (label, observed), got"
                     f" shape {y.shape}")
  return y[..., 0], y[..., 1]


__all__ = ["per_task_roc_auc", "mean_roc_auc", "split_observed"]
