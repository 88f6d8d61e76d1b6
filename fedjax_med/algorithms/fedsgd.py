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

import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import reject_unknown

_OPTIONS = ("server_optimizer", "weighting", "aggregator", "cohort_size", "sampling",
            "client_chunk_size")


def fedsgd_client_update(ctx: kit.ClientContext, params, client_state, data, key):
  """g_k = grad F_k(w) over the site's real rows (one full batch); F_k(w) as mean_loss."""
  del client_state
  loss, grads = kit.gradient_fn(ctx)(params, data.x, data.y, data.mask, key)
  return kit.ClientResult(grads, values={"mean_loss": loss})


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
  return kit.build_algorithm(
      "fedsgd", loss_fn, client_update=fedsgd_client_update,
      client_optimizer=kit.NO_CLIENT_OPTIMIZER, server_optimizer=server_optimizer,
      weighting=weighting, aggregator=aggregator, cohort_size=cohort_size,
      sampling=sampling, client_chunk_size=client_chunk_size)


__all__ = ["fedsgd", "fedsgd_client_update"]
