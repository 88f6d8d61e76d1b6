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
from fedjax_med.core.options import check_choice, check_nonnegative_float

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


__all__ = ["bce_dice", "pixel_logits", "split_labels", "REDUCTIONS"]
