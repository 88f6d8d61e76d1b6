"""Federated SGD (McMahan et al., AISTATS 2017, "FedSGD").

Each site computes the full-batch gradient of its own objective,
g_k = grad F_k(w), over its n_k real rows. The server aggregates

    g = sum_k (n_k / n) g_k = grad F(w),   F(w) = sum_k (n_k/n) F_k(w)

and applies its optax transformation, so with `optax.sgd(lr)` one round is
exactly one gradient step on the pooled objective `weighted_objective`
(w <- w - lr * grad F(w)). `weighting="uniform"` uses p_k = 1/K' instead,
a step on sum_k F_k / K'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.algorithms.fedavg import cohort_positions
from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       make_algorithm, new_server_state, server_key)
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.tree import tree_l2_norm
from fedjax_med.core.options import check_optimizer, reject_unknown


@dataclasses.dataclass(frozen=True)
class FedSGDConfig:
  loss_fn: Any
  server_optimizer: optax.GradientTransformation
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  client_chunk_size: int | None = None


_OPTIONS = ("server_optimizer", "weighting", "aggregator", "cohort_size", "sampling",
            "client_chunk_size")


def fedsgd(loss_fn, *, server_optimizer: optax.GradientTransformation,
           weighting: str = "num_examples", aggregator: agg.Aggregator | None = None,
           cohort_size: int | None = None, sampling: str = "uniform",
           client_chunk_size: int | None = None,
           **unknown_options) -> FederatedAlgorithm:
  """Builds FedSGD.

  Args:
    loss_fn: per-example loss `loss_fn(params, x, y) -> [B]` (or a batch loss).
    server_optimizer: optax transformation applied to the aggregated gradient,
      e.g. `optax.sgd(lr)` (wrap with `optax.inject_hyperparams` to trace lr).
    weighting: "num_examples" (p_k = n_k/n) or "uniform" (p_k = 1/K').
    aggregator: aggregation chain (default `weighted_mean()`).
    cohort_size, sampling: client sampling (see `fedjax_med.core.cohort`).
    client_chunk_size: sites per chunk (see `fedjax_med.core.chunking`).

  Returns:
    FederatedAlgorithm. Round metrics: train_loss (= the p-weighted objective
    at the round's starting point), client_train_loss [K], num_examples [K],
    update_norm (norm of the aggregated gradient).
  """
  reject_unknown("fedsgd", unknown_options, _OPTIONS)
  chunking.require_linear_aggregator("fedsgd", client_chunk_size, aggregator,
                                     agg.weighted_mean())
  config = FedSGDConfig(
      loss_fn=loss_fn,
      server_optimizer=check_optimizer("fedsgd", "server_optimizer", server_optimizer),
      cohort=cohort_lib.make_cohort_spec("fedsgd", cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      client_chunk_size=chunking.check_chunk_size("fedsgd", client_chunk_size))

  def init(params, num_sites: int | None = None):
    return new_server_state(params, config.server_optimizer, client_hparams={},
                            hparams={},
                            aggregator_state=config.aggregator.init(params, num_sites))

  return make_algorithm("fedsgd", _fedsgd_round, config, loss_fn, init)


def _fedsgd_round(config: FedSGDConfig, state, data, key):
  """One round on data.x [K, N_max, ...], data.y [K, N_max, ...], data.mask [K, N_max]."""
  cohort = cohort_lib.select_cohort(config.cohort, data, (), key)
  x, y, mask = cohort.data.x, cohort.data.y, cohort.data.mask
  num_examples = jnp.sum(mask, axis=1, dtype=jnp.int32)
  grad_fn = loss_and_grad(config.loss_fn)

  def client_gradient(x_k, y_k, mask_k):
    loss, grads = grad_fn(state.params, x_k, y_k, mask_k)
    return grads, loss

  weights = cohort.weights
  grad, losses, aggregator_state, agg_metrics = chunking.aggregate_clients(
      client_gradient, (x, y, mask), weights, config.aggregator, state.aggregator_state,
      server_key(key), cohort.context, config.client_chunk_size)
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, state.params, state.server_opt_state, grad,
      active=cohort_lib.participated(cohort))
  metrics = {
      "train_loss": jnp.sum(agg.normalized(weights) * losses),
      "client_train_loss": losses,
      "num_examples": num_examples,
      "cohort": cohort_positions(cohort, num_examples.shape[0]),
      "update_norm": tree_l2_norm(grad),
      **agg_metrics,
  }
  new_state = state._replace(params=params, server_opt_state=server_opt_state,
                             aggregator_state=aggregator_state, round=state.round + 1)
  return new_state, metrics


__all__ = ["fedsgd", "FedSGDConfig"]
