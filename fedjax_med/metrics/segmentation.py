"""Segmentation metrics on binary masks (NumPy, on host), inside an optional mask.

For a predicted mask P, a target mask T and a region M (e.g. the field of
view; the whole image when `mask=None`), counting only pixels in M:

    dice(P, T)      = 2 |P & T| / (|P| + |T|)          (= F1 of the pixel labels)
    pixel_accuracy  = |P == T| / |M|
    pixel_roc_auc   = ROC-AUC of the scores against T  (fedjax_med.metrics.roc_auc)

Dice is NaN when P and T are both empty in M (0/0: undefined, like
`roc_auc` on one class); accuracy is NaN on an empty region.

Multi-class label volumes (e.g. MSD Hippocampus, classes 0/1/2):
`multiclass_dice` gives per-case, per-class Dice [N, C-1] inside a validity
mask, with the empty-empty case defined as 1.0; `volume_dice_scores`
averages it per case, then over cases.
"""

from __future__ import annotations

import numpy as np

from fedjax_med.metrics.classification import roc_auc


def _binary(values, name: str, field: str) -> np.ndarray:
  a = np.asarray(values)
  if a.dtype == np.bool_:
    return a
  if not (np.issubdtype(a.dtype, np.number)) or not np.isin(a, (0, 1)).all():
    raise ValueError(f"{name}: {field} must be a binary mask (bool or values in {{0, 1}})")
  return a.astype(bool)


def _region(mask, shape, name: str) -> np.ndarray | None:
  if mask is None:
    return None
  m = _binary(mask, name, "mask")
  if m.shape != shape:
    raise ValueError(f"{name}: mask has shape {m.shape}, expected {shape}")
  return m


def _pair(pred, target, mask, name):
  p = _binary(pred, name, "pred")
  t = _binary(target, name, "target")
  if p.shape != t.shape:
    raise ValueError(f"{name}: pred has shape {p.shape} but target {t.shape}")
  m = _region(mask, p.shape, name)
  if m is not None:
    p, t = p[m], t[m]
  return p.reshape(-1), t.reshape(-1)


def dice(pred, target, mask=None) -> float:
  """Dice = 2 |P & T| / (|P| + |T|) over the pixels in `mask` (all when None).

  Args:
    pred, target: binary masks of the same shape (bool or {0, 1}).
    mask: optional region of the same shape (e.g. the FOV).

  Returns:
    Dice in [0, 1]; NaN when both masks are empty in the region.
  """
  p, t = _pair(pred, target, mask, "dice")
  denominator = int(p.sum()) + int(t.sum())
  if denominator == 0:
    return float("nan")
  return 2.0 * int(np.count_nonzero(p & t)) / denominator


def pixel_accuracy(pred, target, mask=None) -> float:
  """Share of the pixels in `mask` where pred == target; NaN on an empty region."""
  p, t = _pair(pred, target, mask, "pixel_accuracy")
  if p.size == 0:
    return float("nan")
  return float(np.count_nonzero(p == t)) / p.size


def pixel_roc_auc(scores, target, mask=None) -> float:
  """ROC-AUC of per-pixel scores (e.g. probabilities) against a binary target.

  `fedjax_med.metrics.roc_auc` (Mann-Whitney, ties count one half) over the
  pixels in `mask` (all when None); NaN when the region holds a single class.
  """
  s = np.asarray(scores)
  t = _binary(target, "pixel_roc_auc", "target")
  if s.shape != t.shape:
    raise ValueError(f"pixel_roc_auc: scores have shape {s.shape} but target {t.shape}")
  m = _region(mask, t.shape, "pixel_roc_auc")
  if m is not None:
    s, t = s[m], t[m]
  return roc_auc(t, s)


def segmentation_scores(probabilities, target, mask=None, threshold: float = 0.5
                        ) -> dict[str, float]:
  """{"dice", "accuracy", "auc"} of `probabilities > threshold` against `target` in `mask`."""
  probabilities = np.asarray(probabilities)
  pred = probabilities > threshold
  return {"dice": dice(pred, target, mask), "accuracy": pixel_accuracy(pred, target, mask),
          "auc": pixel_roc_auc(probabilities, target, mask)}


def _class_array(values, name: str, field: str) -> np.ndarray:
  a = np.asarray(values)
  if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
    raise ValueError(f"{name}: {field} must hold integer class labels, got dtype {a.dtype}")
  return a


def multiclass_dice(pred_labels, target, valid, num_classes: int) -> np.ndarray:
  """Per-case, per-class Dice of label volumes inside a validity mask; `[N, C-1]` float64.

  For case n and foreground class c in 1..C-1 (class 0 is the background and
  gets no column), with P = {pred = c}, T = {target = c} and V the valid
  voxels of case n:

      dice[n, c-1] = 2 |P & T & V| / (|P & V| + |T & V|),   1.0 when |P & V| + |T & V| = 0

  The empty-empty case (class c neither present nor predicted in the case's
  valid region) is DEFINED as 1.0 here, a perfect answer (so a per-case mean
  stays defined); `dice` (binary) gives NaN there instead.

  Args:
    pred_labels: `[N, ...]` predicted classes (integers, or floats holding integers).
    target: `[N, ...]` true classes, same shape.
    valid: `[N, ...]` region (bool or {0, 1}), or None for every voxel. Outside
      it pred and target may hold anything.
    num_classes: C >= 2, background included.

  Returns:
    float64 array `[N, C-1]`. Raises ValueError on mismatched shapes or a
    class outside {0, ..., C-1} inside the valid region.
  """
  name = "multiclass_dice"
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")
  p, t = _class_array(pred_labels, name, "pred_labels"), _class_array(target, name, "target")
  if p.shape != t.shape or p.ndim < 1:
    raise ValueError(f"{name}: pred_labels has shape {p.shape} but target {t.shape}"
                     " (both [N, ...])")
  v = np.ones(p.shape, bool) if valid is None else _binary(valid, name, "valid")
  if v.shape != p.shape:
    raise ValueError(f"{name}: valid has shape {v.shape}, expected {p.shape}")
  n = p.shape[0]
  p, t, v = p.reshape(n, -1), t.reshape(n, -1), v.reshape(n, -1)
  for field, a in (("pred_labels", p), ("target", t)):
    inside = a[v]
    bad = (inside < 0) | (inside >= num_classes) | (inside != np.round(inside))
    if bad.any():
      raise ValueError(f"{name}: {field} holds {inside[bad][0]!r} inside the valid region;"
                       f" classes must be integers in 0..{num_classes - 1}")
  out = np.empty((n, num_classes - 1), np.float64)
  for c in range(1, num_classes):
    pc, tc = (p == c) & v, (t == c) & v
    inter = np.count_nonzero(pc & tc, axis=1)
    denominator = np.count_nonzero(pc, axis=1) + np.count_nonzero(tc, axis=1)
    out[:, c - 1] = np.where(denominator == 0, 1.0,
                             2.0 * inter / np.maximum(denominator, 1))
  return out


def volume_dice_scores(logits_or_probs, y, class_names=("anterior", "posterior")
                       ) -> dict[str, float]:
  """Mean per-class Dice of argmax predictions, per case then over cases.

  pred = argmax over the last axis of `logits_or_probs` `[N, X, Y, Z, C]`
  (the same for logits and softmax probabilities); y `[N, X, Y, Z, 2]` =
  (class, valid) (or the class alone, `[N, X, Y, Z]` / `[..., 1]`, every
  voxel valid). With d = `multiclass_dice(pred, class, valid, C)` `[N, C-1]`
  (empty-empty = 1.0):

      dice_<name_c> = (1/N) sum_n d[n, c-1]                 for each foreground class c
      dice_mean     = (1/N) sum_n (1/(C-1)) sum_c d[n, c-1]

  Args:
    logits_or_probs: per-voxel class scores, `[N, ..., C]`.
    y: labels as above.
    class_names: names of classes 1..C-1 (default MSD Hippocampus:
      "anterior", "posterior", so C = 3).

  Returns:
    {"dice_<name>" for each class name, "dice_mean"}; NaN for N = 0.
  """
  scores = np.asarray(logits_or_probs)
  names = tuple(class_names)
  c = scores.shape[-1] if scores.ndim else 0
  if scores.ndim < 2 or c != len(names) + 1:
    raise ValueError(f"volume_dice_scores: scores must be [N, ..., {len(names) + 1}]"
                     f" (background + {names}), got shape {scores.shape}")
  y = np.asarray(y)
  spatial = scores.shape[:-1]
  if y.shape == spatial + (2,):
    target, valid = y[..., 0], y[..., 1]
  elif y.shape == spatial + (1,):
    target, valid = y[..., 0], None
  elif y.shape == spatial:
    target, valid = y, None
  else:
    raise ValueError(f"volume_dice_scores: y must be {spatial + (2,)} (class, valid),"
                     f" {spatial + (1,)} or {spatial}, got shape {y.shape}")
  if spatial[0] == 0:
    return {**{f"dice_{name}": float("nan") for name in names}, "dice_mean": float("nan")}
  d = multiclass_dice(np.argmax(scores, axis=-1), target, valid, c)
  out = {f"dice_{name}": float(d[:, i].mean()) for i, name in enumerate(names)}
  out["dice_mean"] = float(d.mean(axis=1).mean())
  return out


__all__ = ["dice", "pixel_accuracy", "pixel_roc_auc", "segmentation_scores", "multiclass_dice",
           "volume_dice_scores"]
