"""Masked multi-task binary cross-entropy: T sigmoid heads, labels that may be missing.

Label layout (as `fedjax_med.data.tox21` builds it): `y [B, T, 2]` with
`y[..., 0]` the label in {0, 1} and `y[..., 1]` whether it was observed
(1) or is missing (0). The mask travels with the data inside `y`, so every
core operation (padding, cohorts, `subset`, `pooled`) carries it along, and
there is never a NaN to hide a missing label.

Per-example loss (the core's contract: `loss_fn(params, x, y) -> [B]`), for
logits z = apply(params, x) `[B, T]`:

    l_i = (1 / T) sum_{t=1..T} o_it * BCE(z_it, y_it),
    BCE(z, y) = -y log s(z) - (1 - y) log(1 - s(z))        (s = sigmoid)

i.e. the sum over the row's *observed* labels only, divided by the constant
number of tasks T (not by the row's own count of observed labels). Why this
normalisation:

* Missing labels contribute exactly 0 to the loss and to the gradient (the
  term is selected with `jnp.where`, so even a non-finite BCE of a missing
  entry cannot leak). A task with no observed label at a site, or in a
  batch, contributes nothing: the gradient of its head is exactly zero there.
* Every observed (molecule, assay) pair has the same weight 1/T everywhere.
  Dividing by the row's own count instead would make a label of a molecule
  measured in 1 assay weigh 12x a label of a molecule measured in 12.
* The rows stay independent, so the core's invariants hold unchanged: a
  batch's loss is the mean of l_i over its real rows, padded rows and empty
  sites change nothing, and the objective is still

      F(w) = sum_k (n_k / n) F_k(w),   F_k(w) = (1 / n_k) sum_i l_i
           = (1 / (T n)) sum_{all observed (i, t)} BCE(z_it, y_it)
           = (N_obs / (T n)) * [mean BCE over all N_obs observed labels],

  a constant multiple of the average over the observed labels of the pooled
  data, so FedSGD/FedAvg with n_k weighting minimise exactly that average
  (each site's weight n_k counts its rows; its share of observed labels
  enters through the sum). `observed_fraction(data)` gives N_obs / (T n);
  `observed_mean_bce` computes the plain average over observed labels of a
  batch for reporting. The constant factor (0.81 on Tox21) only rescales
  the learning rate.

This is the masked loss of multi-task toxicity models (Mayr et al. 2016,
DeepTox; MoleculeNet's weighted loss with weight 0 on missing entries,
Wu et al. 2018), written in the core's per-example form.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _check_shapes(logits: jax.Array, y: jax.Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f"masked_multitask_bce: the model must output logits [B, T], got"
                     f" shape {logits.shape}")
  expected = logits.shape + (2,)
  if tuple(y.shape) != expected:
    raise ValueError(
        f"masked_multitask_bce: y must be [B, T, 2] = (label, observed) = {expected},"
        f" got shape {tuple(y.shape)}")


def masked_bce_terms(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(o_it * BCE(z_it, y_it) [B, T], o_it [B, T])`; missing entries are exactly 0.

  Args:
    logits: `[B, T]`.
    y: `[B, T, 2]` = (label, observed).
  """
  _check_shapes(logits, y)
  labels = y[..., 0].astype(logits.dtype)
  observed = y[..., 1] > 0
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  return jnp.where(observed, bce, 0.0), observed.astype(logits.dtype)


def masked_multitask_bce(apply_fn: ApplyFn) -> Callable:
  """Per-example masked multi-task BCE: `loss_fn(params, x, y [B, T, 2]) -> [B]`.

  l_i = (1/T) sum_t o_it BCE(z_it, y_it), z = apply_fn(params, x) `[B, T]`
  (see the module docstring for why 1/T). `label_type = "binary"`: both
  channels of y must be in {0, 1}.
  """

  def loss_fn(params, x, y):
    logits = apply_fn(params, x)
    terms, _ = masked_bce_terms(logits, y)
    return jnp.sum(terms, axis=1) / terms.shape[1]

  loss_fn.label_type = "binary"
  return loss_fn


def observed_mean_bce(logits: jax.Array, y: jax.Array, mask: jax.Array | None = None
                      ) -> jax.Array:
  """The average BCE over the observed labels of the real rows: sum o BCE / sum o.

  0 when no label is observed (nothing to average). `mask` `[B]` marks real rows.
  """
  terms, observed = masked_bce_terms(logits, y)
  if mask is not None:
    terms = jnp.where(mask[:, None], terms, 0.0)
    observed = jnp.where(mask[:, None], observed, 0.0)
  count = jnp.sum(observed)
  return jnp.sum(terms) / jnp.maximum(count, 1.0)


def observed_fraction(data) -> jax.Array:
  """N_obs / (T n) for FederatedData with y `[K, N_max, T, 2]`.

  `fm.weighted_objective(masked_multitask_bce(apply), w, data)` equals this
  fraction times the average BCE over all observed labels of the real rows.
  """
  observed = jnp.where(data.mask[..., None], data.y[..., 1] > 0, False)
  num_tasks = data.y.shape[-2]
  n = jnp.sum(data.mask)
  return jnp.sum(observed) / (num_tasks * jnp.maximum(n, 1))


__all__ = ["masked_multitask_bce", "masked_bce_terms", "observed_mean_bce",
           "observed_fraction"]
