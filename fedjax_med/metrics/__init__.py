"""Evaluation metrics (NumPy, on host), one file per kind of task."""

from fedjax_med.metrics.classification import accuracy, nanmean, roc_auc
from fedjax_med.metrics.multitask import mean_roc_auc, per_task_roc_auc
from fedjax_med.metrics.regression import mae, rmse
from fedjax_med.metrics.segmentation import (dice, multiclass_dice, pixel_accuracy,
                                             pixel_roc_auc, segmentation_scores,
                                             volume_dice_scores)
from fedjax_med.metrics.survival import c_index

__all__ = ["accuracy", "roc_auc", "nanmean", "c_index", "mae", "rmse", "per_task_roc_auc",
           "mean_roc_auc", "dice", "pixel_accuracy", "pixel_roc_auc", "segmentation_scores",
           "multiclass_dice", "volume_dice_scores"]
