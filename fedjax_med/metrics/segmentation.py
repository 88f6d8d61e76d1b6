"""Segmentation metrics on binary masks (NumPy, on host), inside an optional mask.

For a predicted mask P, a target mask T and a region M (e.g. the field of
view; the whole image when `mask=None`), counting only pixels in M:

    dice(P, T)      = 2 |P & T| / (|P| + |T|)          (= F1 of the pixel labels)
    pixel_accuracy  = |P == T| / |M|
    pixel_roc_auc   = ROC-AUC of the scores against T  (fedjax_med.metrics.roc_auc)

Dice is NaN when P and T are both empty in M (0/0: undefined, like
`roc_auc` on one class); accuracy is NaN on an empty region.
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


__all__ = ["dice", "pixel_accuracy", "pixel_roc_auc", "segmentation_scores"]
