"""Per-pixel segmentation losses: BCE + soft Dice inside a validity (FOV) mask.

Labels are per-pixel: `y [B, H, W, 2]` = (target in {0, 1}, valid in {0, 1}),
the layout of `fedjax_med.data.chase_db1` (valid = field of view), or
`y [B, H, W]` / `[B, H, W, 1]` = target alone (every pixel valid). The model
gives logits `[B, H, W]` or `[B, H, W, 1]`. With p = sigmoid(z), t the
target and v the validity mask, over the pixels j of one patch i:

    BCE_i  = sum_j v_j bce(z_j, t_j) / max(sum_j v_j, 1)
    Dice_i = (2 sum_j v_j p_j t_j + s) / (sum_j v_j p_j + sum_j v_j t_j + s)
    f_i    = BCE_i + lambda (1 - Dice_i)

(soft Dice: Milletari, Navab & Ahmadi, V-Net, 3DV 2016, with the additive
smoothing s used by most implementations so that a patch without vessels
has a defined, minimal loss when it predicts none). `reduction="example"`
returns `[B]`, the core's per-example contract (a batch's loss is the mean
over its real rows). `reduction="batch"` is a `fedjax_med.batch_loss`: the
sums run over every valid pixel of the batch's real rows at once (one BCE
mean, one Dice), which weighs patches by their number of valid pixels and
gives a less noisy Dice when patches hold few vessel pixels.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.objective import batch_loss
from fedjax_med.core.options import (OptionError, check_choice, check_nonnegative_float,
                                     check_positive_int)

ApplyFn = Callable[[Any, jax.Array], jax.Array]
REDUCTIONS = ("example", "batch")


def pixel_logits(logits: jax.Array) -> jax.Array:
  """`[B, H, W, 1]` or `[B, H, W]` -> `[B, H, W]`."""
  if logits.ndim == 4 and logits.shape[-1] == 1:
    logits = logits[..., 0]
  if logits.ndim != 3:
    raise ValueError(
        f"segmentation loss: the model must output one logit per pixel ([B, H, W] or"
        f" [B, H, W, 1]), got shape {logits.shape}")
  return logits


def split_labels(y: jax.Array, spatial_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(target [B, H, W], valid [B, H, W]) from y `[B, H, W, 2]`, `[B, H, W, 1]` or `[B, H, W]`."""
  if y.ndim == 4 and y.shape[-1] == 2:
    target, valid = y[..., 0], y[..., 1]
  elif y.ndim == 4 and y.shape[-1] == 1:
    target, valid = y[..., 0], jnp.ones(y.shape[:3], y.dtype)
  elif y.ndim == 3:
    target, valid = y, jnp.ones(y.shape, y.dtype)
  else:
    raise ValueError(
        f"segmentation loss: y must be [B, H, W, 2] (target, valid), [B, H, W, 1] or"
        f" [B, H, W], got shape {y.shape}")
  if target.shape != tuple(spatial_shape):
    raise ValueError(f"segmentation loss: labels have shape {target.shape} but the"
                     f" logits {tuple(spatial_shape)}")
  return target, valid


def _terms(logits, target, valid, axes):
  """(BCE numerator, valid count, p.t, p, t) summed over `axes`, masked by valid."""
  bce = optax.sigmoid_binary_cross_entropy(logits, target)
  p = jax.nn.sigmoid(logits)
  return (jnp.sum(valid * bce, axes), jnp.sum(valid, axes), jnp.sum(valid * p * target, axes),
          jnp.sum(valid * p, axes), jnp.sum(valid * target, axes))


def bce_dice(apply_fn: ApplyFn, *, dice_weight: float = 1.0, smooth: float = 1.0,
             reduction: str = "example") -> Callable:
  """BCE + lambda (1 - soft Dice) inside the validity mask (see module docstring).

  Args:
    apply_fn: `apply(params, x [B, H, W, C]) -> logits [B, H, W(, 1)]`.
    dice_weight: lambda >= 0 (0 gives masked BCE alone).
    smooth: s >= 0, the Dice smoothing.
    reduction: "example" -> `loss_fn(params, x, y) -> [B]`; "batch" ->
      `loss_fn(params, x, y, mask) -> ()`, a `fedjax_med.batch_loss`.

  Returns:
    The loss, with `label_type = "binary"` (targets and validity in {0, 1}).
  """
  dice_weight = check_nonnegative_float("bce_dice", "dice_weight", dice_weight)
  smooth = check_nonnegative_float("bce_dice", "smooth", smooth)
  check_choice("bce_dice", "reduction", reduction, REDUCTIONS)

  def prepare(params, x, y):
    logits = pixel_logits(apply_fn(params, x)).astype(jnp.float32)
    target, valid = split_labels(y, logits.shape)
    return logits, target.astype(logits.dtype), valid.astype(logits.dtype)

  if reduction == "example":

    def loss_fn(params, x, y):
      logits, target, valid = prepare(params, x, y)
      bce, count, pt, p, t = _terms(logits, target, valid, (1, 2))
      dice = (2.0 * pt + smooth) / (p + t + smooth)
      return bce / jnp.maximum(count, 1.0) + dice_weight * (1.0 - dice)

  else:

    @batch_loss
    def loss_fn(params, x, y, mask):
      logits, target, valid = prepare(params, x, y)
      valid = valid * mask.astype(valid.dtype)[:, None, None]
      bce, count, pt, p, t = _terms(logits, target, valid, (0, 1, 2))
      dice = (2.0 * pt + smooth) / (p + t + smooth)
      return bce / jnp.maximum(count, 1.0) + dice_weight * (1.0 - dice)

  loss_fn.label_type = "binary"
  return loss_fn


def class_labels(y: jax.Array, spatial_shape: tuple[int, ...]
                 ) -> tuple[jax.Array, jax.Array]:
  """(class [B, ...] int32, valid [B, ...] bool) from per-voxel multi-class labels.

  `spatial_shape` is the logits' shape without the class axis, `(B, ...)`.
  y `[B, ..., 2]` = (class, valid) (valid: nonzero inside the real image),
  `[B, ..., 1]` or `[B, ...]` = class alone (every voxel valid). Classes
  stored as floats are rounded to the nearest integer.
  """
  spatial_shape = tuple(spatial_shape)
  if y.shape == spatial_shape + (2,):
    target, valid = y[..., 0], y[..., 1] != 0
  elif y.shape == spatial_shape + (1,):
    target, valid = y[..., 0], jnp.ones(spatial_shape, bool)
  elif y.shape == spatial_shape:
    target, valid = y, jnp.ones(spatial_shape, bool)
  else:
    raise ValueError(
        f"segmentation loss: y must be {spatial_shape + (2,)} (class, valid),"
        f" {spatial_shape + (1,)} or {spatial_shape} for logits of shape"
        f" {spatial_shape + ('C',)}, got shape {y.shape}")
  if jnp.issubdtype(target.dtype, jnp.floating):
    target = jnp.round(target)
  return target.astype(jnp.int32), valid


def softmax_dice(apply_fn: ApplyFn, *, num_classes: int, dice_weight: float = 1.0,
                 smooth: float = 1.0, include_background: bool = False) -> Callable:
  """Masked softmax cross-entropy + lambda (1 - mean soft Dice over the classes).

  For volumes (or images) with C classes, class 0 the background. The model
  gives logits z `[B, X, Y, Z, C]` (any number of spatial axes); y is
  `[B, X, Y, Z, 2]` = (class t in {0, ..., C-1}, valid v in {0, 1}) or the
  class alone (`[B, X, Y, Z]` / `[..., 1]`, every voxel valid). With
  p_jc = softmax(z_j)_c, over the voxels j of one example i:

      CE_i     = - sum_j v_j log p_{j t_j} / max(sum_j v_j, 1)
      Dice_ic  = (2 sum_j v_j p_jc [t_j = c] + s) / (sum_j v_j p_jc + sum_j v_j [t_j = c] + s)
      f_i      = CE_i + lambda (1 - (1/|C'|) sum_{c in C'} Dice_ic)

  with C' = {1, ..., C-1} (the foreground classes) or {0, ..., C-1} when
  `include_background`; soft Dice as in Milletari et al. (V-Net, 3DV 2016),
  per class and per example, with additive smoothing s (so a class absent
  from an example has a defined loss, minimal when it is not predicted).
  The loss is per example, `loss_fn(params, x, y) -> [B]`; the core
  averages f_i over the batch's real rows (mask = True).

  Padding never counts: a voxel with v_j = 0 contributes nothing, and its
  logits and class are replaced by constants (0) before any arithmetic, so
  whatever they hold (even NaN or a class out of range) changes neither the
  loss nor its gradient, and the gradient reaching its logits is exactly 0.
  (The model's logits at real voxels near padding still see the padded
  input through the convolutions.) A class value outside {0, ..., C-1} at a
  valid voxel gives a zero one-hot vector: keep labels in range.

  Args:
    apply_fn: `apply(params, x [B, X, Y, Z, C_in]) -> logits [B, X, Y, Z, C]`.
    num_classes: C >= 2, the logits' last axis, background included.
    dice_weight: lambda >= 0 (0 gives masked cross-entropy alone).
    smooth: s >= 0, the Dice smoothing (s = 0 gives NaN for a class absent
      from an example and not predicted).
    include_background: average the Dice over every class, background too.

  Returns:
    `loss_fn(params, x, y) -> [B]`, with `label_type = "multiclass"`.
  """
  num_classes = check_positive_int("softmax_dice", "num_classes", num_classes)
  if num_classes < 2:
    raise OptionError(f"softmax_dice: num_classes must be >= 2 (background and at least"
                      f" one class), got {num_classes}")
  dice_weight = check_nonnegative_float("softmax_dice", "dice_weight", dice_weight)
  smooth = check_nonnegative_float("softmax_dice", "smooth", smooth)
  first = 0 if include_background else 1

  def loss_fn(params, x, y):
    logits = apply_fn(params, x).astype(jnp.float32)
    if logits.ndim < 3 or logits.shape[-1] != num_classes:
      raise ValueError(f"softmax_dice: the model must output [B, ..., {num_classes}] logits,"
                       f" got shape {logits.shape}")
    target, valid = class_labels(y, logits.shape[:-1])
    logits = jnp.where(valid[..., None], logits, 0.0)
    target = jnp.where(valid, target, 0)
    axes = tuple(range(1, logits.ndim - 1))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(target, num_classes, dtype=log_p.dtype)
    v = valid.astype(log_p.dtype)
    ce = -jnp.sum(v * jnp.sum(onehot * log_p, -1), axes)
    count = jnp.sum(v, axes)
    p = jnp.exp(log_p) * v[..., None]
    pt = jnp.sum(p * onehot, axes)  # [B, C]
    p_sum = jnp.sum(p, axes)
    t_sum = jnp.sum(onehot * v[..., None], axes)
    dice = (2.0 * pt + smooth) / (p_sum + t_sum + smooth)
    return ce / jnp.maximum(count, 1.0) + dice_weight * (1.0 - jnp.mean(dice[:, first:], -1))

  loss_fn.label_type = "multiclass"
  return loss_fn


__all__ = ["bce_dice", "softmax_dice", "class_labels", "pixel_logits", "split_labels",
           "REDUCTIONS"]
