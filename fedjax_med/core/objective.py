"""The federated objective, written as every FL paper writes it.

    F(w) = sum_k (n_k / n) F_k(w),     F_k(w) = (1 / n_k) sum_{i <= n_k} f(w; x_ki, y_ki)

`loss_fn` contract. Two kinds of loss are accepted:

* per-example (the default): `loss_fn(params, x, y) -> [B]`, one loss per row.
  A batch's loss is the mean over its real rows (padded rows never count).
* batch-level, marked with `@batch_loss`: `loss_fn(params, x, y, mask) -> ()`
  for losses that are not sums of independent terms (e.g. the Cox partial
  likelihood, whose risk set spans the batch). It receives the `[B]` row mask
  and must ignore padded rows itself; it returns the batch's mean loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_med.core.federated_data import FederatedData

LossFn = Callable[..., jax.Array]

_BATCH_LOSS_ATTR = "_fedjax_med_batch_loss"


def batch_loss(fn: LossFn) -> LossFn:
  """Marks `fn(params, x, y, mask) -> scalar` as a batch-level loss."""
  setattr(fn, _BATCH_LOSS_ATTR, True)
  return fn


def is_batch_loss(fn: LossFn) -> bool:
  """Whether `fn` was marked by `batch_loss` (receives the row mask, returns a scalar)."""
  return bool(getattr(fn, _BATCH_LOSS_ATTR, False))


def fill_padded_rows(x: Any, y: Any, mask: jax.Array) -> tuple[Any, Any]:
  """Replaces every padded row of a batch by a copy of the batch's first real row.

  Padded rows hold zeros, and a loss may be non-finite there (MSE on log y, a
  Poisson or Gamma NLL, log x features). Masking such a loss *after* it is
  computed is not enough: its gradient is 0 * inf = NaN. So padded rows never
  reach a loss: they are replaced by a real row (finite wherever the data are),
  and their loss is then masked out as before.

  Args:
    x: `[B, *feature_shape]` (or a pytree of such arrays); y: `[B, *label_shape]`
      (or a pytree); mask: `[B]` bool.

  Returns:
    `(x', y')` with row i equal to row i when mask_i, else to row argmax(mask),
    the first real row. A batch with no real row is returned unchanged (its
    value and gradient are zeroed by `masked_mean_loss`).
  """
  first_real = jnp.argmax(mask)

  def fill(a):
    a = jnp.asarray(a)
    keep = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
    return jnp.where(keep, a, a[first_real])

  return jax.tree_util.tree_map(fill, x), jax.tree_util.tree_map(fill, y)


def _block_gradient_unless(has_rows: jax.Array, params: Any) -> Any:
  """`params` when the batch has a real row; else the same values with no gradient.

  A batch with no real row (an empty site's whole data) can only hold padding,
  so its loss may be non-finite; its value is discarded with `jnp.where`, and
  this select keeps the discarded branch's 0 * inf out of the gradient.
  """
  return jax.tree_util.tree_map(
      lambda p: jnp.where(has_rows, p, jax.lax.stop_gradient(p)), params)


def masked_mean_loss(loss_fn: LossFn, params: Any, x: jax.Array, y: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Mean loss over the real rows of one batch.

  Padded rows never reach `loss_fn` with their fill values: they are replaced
  by a real row first (`fill_padded_rows`) and masked out after, so the value
  and the gradient are finite whenever the loss is finite on the real rows.

  Args:
    loss_fn: per-example or batch-level loss (see module docstring).
    params: model parameters.
    x: `[B, *feature_shape]`; y: `[B, *label_shape]`; mask: `[B]` bool.

  Returns:
    `(1 / m) sum_{i: mask_i} f(params; x_i, y_i)` with m = sum(mask); 0 when
    the batch has no real row (so that its gradient is exactly zero).
  """
  has_rows = jnp.any(mask)
  x, y = fill_padded_rows(x, y, mask)
  params = _block_gradient_unless(has_rows, params)
  if is_batch_loss(loss_fn):
    value = jnp.asarray(loss_fn(params, x, y, mask))
    if value.shape != ():
      raise ValueError(
          f"batch-level loss_fn must return a scalar, got shape {value.shape}")
    return jnp.where(has_rows, value, 0.0)
  losses = jnp.asarray(loss_fn(params, x, y))
  if losses.shape != mask.shape:
    raise ValueError(
        f"loss_fn must return per-example losses of shape [B] = {mask.shape},"
        f" got {losses.shape}; return the unreduced loss, or mark a batch-level"
        " loss with fedjax_med.batch_loss")
  total = jnp.sum(jnp.where(mask, losses, 0.0))
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def loss_and_grad(loss_fn: LossFn) -> Callable:
  """`(params, x, y, mask, key=None) -> (mean loss over real rows, its gradient)`.

  The key (one per local step) is unused here; gradient estimators that need
  randomness (e.g. DP-SGD's sampling and noise) take the same signature.
  """
  value_and_grad = jax.value_and_grad(
      lambda params, x, y, mask: masked_mean_loss(loss_fn, params, x, y, mask))

  def grad_fn(params, x, y, mask, key=None):
    del key
    return value_and_grad(params, x, y, mask)

  return grad_fn


class GradientEstimator(NamedTuple):
  """How a client turns a batch into a gradient (default: the mean gradient).

  build(loss_fn, hparams) -> grad_fn(params, x, y, mask, key) -> (loss, grads)
  hparams: traced hyperparameters the estimator reads from `state.hparams`
    (e.g. DP-SGD's clip norm and noise multiplier), with their initial values.
  """
  build: Callable[[LossFn, dict], Callable]
  hparams: dict


def mean_gradient() -> GradientEstimator:
  """The plain gradient of the mean loss over the batch's real rows."""
  return _MEAN_GRADIENT


_MEAN_GRADIENT = GradientEstimator(lambda loss_fn, hparams: loss_and_grad(loss_fn), {})


# Attribute set on an estimator's `build` and on the grad_fn it returns when the
# estimator is only correct if every local batch holds all of the site's rows
# (DP-SGD's Poisson sampling of the whole site, `fedjax_med.privacy.dp_sgd`).
WHOLE_SITE_ATTR = "_fedjax_med_needs_whole_site"


def mark_whole_site(fn):
  """Marks `fn` (a GradientEstimator.build or a grad_fn) as needing whole-site batches."""
  setattr(fn, WHOLE_SITE_ATTR, True)
  return fn


def needs_whole_site(estimator_or_fn) -> bool:
  """True for an estimator (or its build, or the grad_fn it returns) marked whole-site."""
  fn = getattr(estimator_or_fn, "build", estimator_or_fn)
  return bool(getattr(fn, WHOLE_SITE_ATTR, False) or
              getattr(estimator_or_fn, WHOLE_SITE_ATTR, False))


def check_batches_span_site(estimator_or_fn, batch_size: int, n_max: int,
                            name: str = "local training") -> None:
  """Raises ValueError when a whole-site estimator (DP-SGD) would see partial batches.

  DP-SGD samples each of the site's rows independently with probability q in
  every step (Poisson sampling), which is what the accountant charges
  (PoissonSampled(q, Gaussian(sigma)) per step). That holds only if the step's
  batch is the site's whole padded data, `batch_size >= N_max`; with smaller
  batches each step would Poisson-sample a slice of the site (a patient is in
  0 or 1 slice per epoch, not Binomial(T, q)). Every round that takes a
  gradient estimator calls it on static shapes.

  Args:
    estimator_or_fn: a GradientEstimator, its build, or a grad_fn.
    batch_size: the schedule's B.
    n_max: N_max, the padded rows per site of the data.
    name: the algorithm, for the message.
  """
  if needs_whole_site(estimator_or_fn) and int(batch_size) < int(n_max):
    raise ValueError(
        f"{name}: dp_sgd needs every local batch to span the whole site (Poisson sampling"
        f" of all its rows in each step, the event the accountant charges), but"
        f" batch_size = {int(batch_size)} < N_max = {int(n_max)}; build with"
        f" batch_size >= {int(n_max)} (dp_sgd_fedavg does this), or use"
        f" privacy.dp_sgd_fedavg(max_examples=...)")


def site_objectives(loss_fn: LossFn, params: Any, data: FederatedData) -> jax.Array:
  """F_k(w) for every site: `[K]`; an empty site's F_k is 0 (its weight is 0).

  Each site's whole padded data is one batch, so batch-level losses see the
  site's full risk set.
  """
  return jax.vmap(lambda x, y, m: masked_mean_loss(loss_fn, params, x, y, m))(
      data.x, data.y, data.mask)


def site_weights(data: FederatedData) -> jax.Array:
  """p_k = n_k / n, `[K]`, summing to 1."""
  n_k = data.num_examples.astype(jnp.float32)
  return n_k / jnp.sum(n_k)


def weighted_objective(loss_fn: LossFn, params: Any, data: FederatedData) -> jax.Array:
  """F(w) = sum_k (n_k / n) F_k(w), exactly (McMahan et al. 2017, eq. 1).

  For a per-example loss this equals the mean loss over all n pooled rows;
  FedSGD's round is one gradient step on it.
  """
  return jnp.sum(site_weights(data) * site_objectives(loss_fn, params, data))


__all__ = ["batch_loss", "is_batch_loss", "fill_padded_rows", "masked_mean_loss", "loss_and_grad",
           "GradientEstimator", "mean_gradient", "WHOLE_SITE_ATTR", "mark_whole_site",
           "needs_whole_site", "check_batches_span_site",
           "site_objectives",
           "site_weights", "weighted_objective"]
