"""Evaluation metrics (NumPy, on host), one file per kind of task."""

from fedjax_med.metrics.classification import accuracy, nanmean, roc_auc
from fedjax_med.metrics.survival import c_index

__all__ = ["accuracy", "roc_auc", "nanmean", "c_index"]
