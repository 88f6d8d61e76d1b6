"""Losses built from a model's `apply(params, x)`, one file per kind of task.

Per-example losses return `loss_fn(params, x, y) -> [B]`; batch-level ones
(e.g. the Cox partial likelihood) are marked with `fedjax_med.batch_loss`.
Every loss carries `label_type`, checked against the data at the first round.
"""

from fedjax_med.losses.supervised import (mean_squared_error, sigmoid_binary_cross_entropy,
                                          softmax_cross_entropy)
from fedjax_med.losses.multitask import masked_multitask_bce, observed_fraction, observed_mean_bce
from fedjax_med.losses.segmentation import bce_dice, softmax_dice
from fedjax_med.losses.survival import COX_TIES, cox_loss, cox_partial_likelihood

__all__ = ["sigmoid_binary_cross_entropy", "softmax_cross_entropy", "mean_squared_error",
           "cox_partial_likelihood", "cox_loss", "COX_TIES", "masked_multitask_bce",
           "observed_mean_bce", "observed_fraction", "bce_dice", "softmax_dice"]
