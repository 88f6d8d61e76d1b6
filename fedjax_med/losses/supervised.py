"""Per-example supervised losses built from a model's `apply(params, x)`.

Each returns `loss_fn(params, x, y) -> [B]`, the contract of the core, and
carries `label_type` so a round refuses labels the loss cannot mean (e.g. a
4 given to binary cross-entropy) instead of training on them silently.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _binary_logits(apply_fn, params, x):
  logits = apply_fn(params, x)
  if logits.ndim == 2 and logits.shape[1] == 1:
    logits = logits[:, 0]
  if logits.ndim != 1:
    raise ValueError(
        f"binary loss: the model must output one logit per row ([B] or [B, 1]),"
        f" got shape {logits.shape}")
  return logits


def sigmoid_binary_cross_entropy(apply_fn: ApplyFn) -> Callable:
  """BCE on logits: -y log s(z) - (1 - y) log(1 - s(z)), y in {0, 1}; `[B]`."""

  def loss_fn(params, x, y):
    logits = _binary_logits(apply_fn, params, x)
    return optax.sigmoid_binary_cross_entropy(logits, y.reshape(logits.shape).astype(
        logits.dtype))

  loss_fn.label_type = "binary"
  return loss_fn


def softmax_cross_entropy(apply_fn: ApplyFn) -> Callable:
  """Cross-entropy on logits [B, C] with integer labels [B]; `[B]`."""

  def loss_fn(params, x, y):
    logits = apply_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y.reshape(logits.shape[:1]).astype(jnp.int32))

  loss_fn.label_type = "multiclass"
  return loss_fn


def mean_squared_error(apply_fn: ApplyFn) -> Callable:
  """Squared error summed over output dimensions; `[B]`."""

  def loss_fn(params, x, y):
    pred = apply_fn(params, x)
    diff = pred.reshape(pred.shape[0], -1) - y.reshape(y.shape[0], -1).astype(pred.dtype)
    return jnp.sum(diff**2, axis=1)

  loss_fn.label_type = "real"
  return loss_fn


__all__ = ["ApplyFn", "sigmoid_binary_cross_entropy", "softmax_cross_entropy",
           "mean_squared_error"]
