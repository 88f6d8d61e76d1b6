"""Federated Averaging (McMahan et al., AISTATS 2017, Algorithm 1).

Every round, each site k starts from the global model w, runs local optimizer
steps on its own batches (local epochs or local steps), and reports the
pseudo-gradient Delta_k = w - w_k. The server aggregates

    Delta = sum_k p_k Delta_k,   p_k = n_k / n   (weighting="num_examples")
                                 p_k = 1 / K'    (weighting="uniform", K' non-empty sites)

and applies its optax transformation to Delta. With `optax.sgd(1.0)` this is
w <- sum_k p_k w_k, McMahan et al.'s update for the objective
F(w) = sum_k (n_k/n) F_k(w). The "uniform" average of client models is what
the textbook tutorial loop computes; it optimises sum_k F_k(w) / K' instead,
which weights a 30-patient hospital like a 200-patient one. Adaptive server
optimizers (Reddi et al. 2021) plug in as `server_optimizer`.

All K sites run under one `jax.vmap` in one `jax.jit`-compiled round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       make_round, new_server_state, server_key)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import check_choice, check_optimizer, reject_unknown
from fedjax_med.core.tree import tree_l2_norm
from fedjax_med.core.state import init_client_optimizer, injected_hyperparams

SGD_LR_1 = optax.sgd(1.0)


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
  loss_fn: Any
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  weighting: str
  aggregator: agg.Aggregator


def fedavg(loss_fn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, weighting: str = "num_examples",
           aggregator: agg.Aggregator | None = None, shuffle: bool = True,
           **unknown_options) -> FederatedAlgorithm:
  """Builds FedAvg.

  Args:
    loss_fn: `loss_fn(params, x, y) -> [B]` per-example losses (or a
      `fedjax_med.batch_loss`).
    client_optimizer: optax transformation for the local steps, re-initialised
      every round. Wrap with `optax.inject_hyperparams` to trace its rates.
    server_optimizer: optax transformation applied to the aggregated
      pseudo-gradient (default `optax.sgd(1.0)`: plain averaging).
    local_epochs: local passes over the site's data per round (default 1).
    local_steps: alternatively, a fixed number of local batch updates.
    batch_size: local batch size B.
    weighting: "num_examples" (p_k = n_k/n) or "uniform" (p_k = 1/K').
    aggregator: aggregation chain (default `weighted_mean()`).
    shuffle: reshuffle each site's rows every pass (False: stored order).

  Returns:
    FederatedAlgorithm with `init(params)` and `round(state, data, key)`.
    Round metrics: train_loss (p-weighted mean of the sites' local batch
    losses), client_train_loss [K], client_steps [K], num_examples [K],
    update_norm (norm of the aggregated pseudo-gradient).
  """
  reject_unknown("fedavg", unknown_options, _OPTIONS)
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  config = FedAvgConfig(
      loss_fn=loss_fn,
      client_optimizer=check_optimizer("fedavg", "client_optimizer", client_optimizer),
      server_optimizer=check_optimizer("fedavg", "server_optimizer", server_optimizer),
      schedule=make_schedule("fedavg", batch_size, local_epochs, local_steps, shuffle),
      weighting=check_choice("fedavg", "weighting", weighting, agg.WEIGHTINGS),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean())

  def init(params):
    return new_server_state(
        params, config.server_optimizer,
        client_hparams=injected_hyperparams(config.client_optimizer.init(params)),
        hparams={}, aggregator_state=config.aggregator.init(params))

  return FederatedAlgorithm(init, make_round("fedavg", _fedavg_round, config, loss_fn),
                            "fedavg")


_OPTIONS = ("client_optimizer", "server_optimizer", "local_epochs", "local_steps",
            "batch_size", "weighting", "aggregator", "shuffle")


def _fedavg_round(config: FedAvgConfig, state, data, key):
  """One round on data.x [K, N_max, ...], data.y [K, N_max, ...], data.mask [K, N_max]."""
  x, y, mask = data.x, data.y, data.mask
  num_sites = mask.shape[0]
  num_examples = jnp.sum(mask, axis=1, dtype=jnp.int32)
  grad_fn = loss_and_grad(config.loss_fn)
  w = state.params

  def client_update(x_k, y_k, mask_k, key_k):
    opt_state = init_client_optimizer(config.client_optimizer, w, state.client_hparams)
    local = local_training(grad_fn, config.client_optimizer, config.schedule, w,
                           opt_state, x_k, y_k, mask_k, key_k)
    delta = jax.tree_util.tree_map(jnp.subtract, w, local.params)
    return delta, local.num_steps, local.mean_loss

  deltas, steps, losses = jax.vmap(client_update)(
      x, y, mask, client_keys(key, data.site_ids))
  weights = agg.client_weights(num_examples, config.weighting)
  delta, aggregator_state, agg_metrics = config.aggregator.aggregate(
      deltas, weights, state.aggregator_state, server_key(key))
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, w, state.server_opt_state, delta)
  metrics = {
      "train_loss": jnp.sum(agg.normalized(weights) * losses),
      "client_train_loss": losses,
      "client_steps": steps,
      "num_examples": num_examples,
      "update_norm": tree_l2_norm(delta),
      **agg_metrics,
  }
  new_state = state._replace(params=params, server_opt_state=server_opt_state,
                             aggregator_state=aggregator_state, round=state.round + 1)
  return new_state, metrics


__all__ = ["fedavg", "FedAvgConfig"]
