"""Federated Averaging (McMahan et al., AISTATS 2017, Algorithm 1).

Every round, each participating site k starts from the global model w, runs
local optimizer steps on its own batches (local epochs or local steps), and
reports the pseudo-gradient Delta_k = w - w_k. The server aggregates

    Delta = sum_k p_k Delta_k,   p_k = n_k / n   (weighting="num_examples")
                                 p_k = 1 / K'    (weighting="uniform", K' non-empty sites)

and applies its optax transformation to Delta. With `optax.sgd(1.0)` this is
w <- sum_k p_k w_k, McMahan et al.'s update for the objective
F(w) = sum_k (n_k/n) F_k(w). The "uniform" average of client models is what
the textbook tutorial loop computes; it optimises sum_k F_k(w) / K' instead,
which weights a 30-patient hospital like a 200-patient one.

This file also holds the round shared by the FedAvg family: FedProx adds a
proximal term to the local objective (`fedprox.py`), FedNova normalises each
Delta_k by ||a_k||_1 (tau_k for SGD; `fednova.py`), FedAdam/FedYogi/
FedAdagrad change the server optimizer (`fedopt.py`).

All participating sites run under one `jax.vmap` in one `jax.jit`-compiled round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       make_algorithm, new_server_state, server_key)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import (GradientEstimator, check_batches_span_site,
                                       mean_gradient)
from fedjax_med.core.options import check_optimizer, reject_unknown
from fedjax_med.core.state import init_client_optimizer, injected_hyperparams
from fedjax_med.core.tree import tree_l2_norm

SGD_LR_1 = optax.sgd(1.0)

# Options every FedAvg-family constructor accepts.
COMMON_OPTIONS = ("client_optimizer", "server_optimizer", "local_epochs", "local_steps",
                  "batch_size", "weighting", "aggregator", "shuffle", "cohort_size",
                  "sampling", "gradient_estimator", "downlink", "client_chunk_size")


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
  loss_fn: Any
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  proximal: bool = False     # FedProx: + mu/2 ||w - w_global||^2 locally
  # FedNova: normalizer(steps [C], client_hparams, max_steps) -> ||a_k||_1 [C];
  # Delta_k / ||a_k||_1, rescaled by tau_eff = sum_k p_k ||a_k||_1. None: FedAvg.
  normalizer: Any = None
  # GradientEstimator.build (its initial hparams go to the state, not here,
  # so estimators differing only in numbers share one compiled round).
  gradient: Any = mean_gradient().build
  # downlink(w, key) -> (w as the clients receive it, metrics); None = exact.
  downlink: Any = None
  client_chunk_size: int | None = None   # see fedjax_med.core.chunking


def build_fedavg_family(name: str, loss_fn, *, client_optimizer, server_optimizer,
                        local_epochs, local_steps, batch_size, weighting, aggregator,
                        shuffle, cohort_size, sampling, gradient_estimator=None,
                        downlink=None, client_chunk_size=None, proximal=False,
                        normalizer=None, hparams=None) -> FederatedAlgorithm:
  """Validates the common options and builds a FedAvg-family algorithm."""
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  chunking.require_linear_aggregator(name, client_chunk_size, aggregator,
                                     agg.weighted_mean())
  config = FedAvgConfig(
      loss_fn=loss_fn,
      client_optimizer=check_optimizer(name, "client_optimizer", client_optimizer),
      server_optimizer=check_optimizer(name, "server_optimizer", server_optimizer),
      schedule=make_schedule(name, batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec(name, cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      proximal=proximal, normalizer=normalizer,
      gradient=(gradient_estimator or mean_gradient()).build, downlink=downlink,
      client_chunk_size=chunking.check_chunk_size(name, client_chunk_size))
  hparams = {**(gradient_estimator or mean_gradient()).hparams, **(hparams or {})}

  def init(params, num_sites: int | None = None):
    return new_server_state(
        params, config.server_optimizer,
        client_hparams=injected_hyperparams(config.client_optimizer.init(params)),
        hparams=hparams, aggregator_state=config.aggregator.init(params, num_sites))

  return make_algorithm(name, fedavg_family_round, config, loss_fn, init)


def fedavg(loss_fn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, weighting: str = "num_examples",
           aggregator: agg.Aggregator | None = None, shuffle: bool = True,
           cohort_size: int | None = None, sampling: str = "uniform",
           gradient_estimator: GradientEstimator | None = None, downlink=None,
           client_chunk_size: int | None = None,
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
    cohort_size: sites per round (None: all); see `fedjax_med.core.cohort`.
    sampling: cohort sampling (see `fedjax_med.core.cohort`): "uniform"
      (default; the cohort's weights renormalised over it, biased for
      sum_k p_k Delta_k when the n_k differ), "uniform_unbiased" (Li et al.
      2020 scheme II, unbiased) or "num_examples" (scheme I, unbiased).
    gradient_estimator: how a client turns a batch into a gradient (default:
      the mean gradient; e.g. a DP-SGD estimator from `fedjax_med.privacy`).
    downlink: optional `downlink(w, key) -> (w_received, metrics)`, what the
      server's broadcast does to the model (e.g. compression); the clients
      train from w_received and their pseudo-gradients are taken against it.
    client_chunk_size: run the participating clients M at a time (a scan of
      vmapped chunks in the same jit) to bound memory; needs the default
      weighted-mean aggregator. None: all at once.

  Returns:
    FederatedAlgorithm with `init(params)` and `round(state, data, key)`.
    Round metrics: train_loss (p-weighted mean of the participants' local
    batch losses), client_train_loss [C], client_steps [C], num_examples [C],
    cohort [C] (site positions), update_norm (norm of the aggregate).
  """
  reject_unknown("fedavg", unknown_options, COMMON_OPTIONS)
  return build_fedavg_family(
      "fedavg", loss_fn, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size)


def proximal_grad_fn(grad_fn, mu: jax.Array, anchor: Any):
  """Adds the gradient of mu/2 ||w - anchor||^2 to `grad_fn`'s (FedProx, Ditto).

  The local objective becomes F_k(w) + mu/2 ||w - anchor||^2; the reported
  loss stays F_k's.
  """

  def fn(params, x, y, mask, key=None):
    loss, grads = grad_fn(params, x, y, mask, key)
    grads = jax.tree_util.tree_map(lambda g, w, a: g + mu * (w - a), grads, params, anchor)
    return loss, grads

  return fn


def fedavg_family_round(config: FedAvgConfig, state, data, key):
  """One round on data.x [K, N_max, ...], data.y [K, N_max, ...], data.mask [K, N_max]."""
  w = state.params
  downlink_metrics = {}
  if config.downlink is not None:
    w, downlink_metrics = config.downlink(w, jax.random.fold_in(server_key(key), 1))
  check_batches_span_site(config.gradient, config.schedule.batch_size, data.mask.shape[1],
                          "fedavg family round")
  grad_fn = config.gradient(config.loss_fn, state.hparams)
  if config.proximal:
    grad_fn = proximal_grad_fn(grad_fn, state.hparams["mu"], w)
  cohort = cohort_lib.select_cohort(config.cohort, data, (), key)
  x, y, mask = cohort.data.x, cohort.data.y, cohort.data.mask
  max_steps = config.schedule.num_scan_steps(mask.shape[1])

  def client_update(x_k, y_k, mask_k, key_k):
    opt_state = init_client_optimizer(config.client_optimizer, w, state.client_hparams)
    local = local_training(grad_fn, config.client_optimizer, config.schedule, w,
                           opt_state, x_k, y_k, mask_k, key_k)
    delta = jax.tree_util.tree_map(jnp.subtract, w, local.params)
    norm = jnp.float32(1.0)
    if config.normalizer is not None:
      # FedNova (Wang et al. 2020): d_k = Delta_k / ||a_k||_1 (a site that took
      # no step has Delta_k = 0), Delta = tau_eff sum_k p_k d_k.
      norm = config.normalizer(local.num_steps, state.client_hparams, max_steps)
      delta = jax.tree_util.tree_map(
          lambda d: d / jnp.maximum(norm, 1.0).astype(d.dtype), delta)
    return delta, (local.num_steps, local.mean_loss, norm)

  weights = cohort.weights
  delta, (steps, losses, norms), aggregator_state, agg_metrics = chunking.aggregate_clients(
      client_update, (x, y, mask, client_keys(key, cohort.data.site_ids)), weights,
      config.aggregator, state.aggregator_state, server_key(key), cohort.context,
      config.client_chunk_size)
  if config.normalizer is not None:
    tau_eff = jnp.sum(agg.normalized(weights) * norms)
    delta = jax.tree_util.tree_map(lambda d: tau_eff.astype(d.dtype) * d, delta)
    agg_metrics = {**agg_metrics, "tau_eff": tau_eff}
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, state.params, state.server_opt_state, delta,
      active=cohort_lib.participated(cohort))
  num_examples = jnp.sum(mask, axis=1, dtype=jnp.int32)
  metrics = {
      "train_loss": jnp.sum(agg.normalized(weights) * losses),
      "client_train_loss": losses,
      "client_steps": steps,
      "num_examples": num_examples,
      "cohort": cohort_positions(cohort, num_examples.shape[0]),
      "update_norm": tree_l2_norm(delta),
      **agg_metrics,
      **downlink_metrics,
  }
  new_state = state._replace(params=params, server_opt_state=server_opt_state,
                             aggregator_state=aggregator_state, round=state.round + 1)
  return new_state, metrics


def cohort_positions(cohort: cohort_lib.Cohort, size: int) -> jax.Array:
  """[C] positions of the cohort's sites among the K sites."""
  if cohort.indices is None:
    return jnp.arange(size, dtype=jnp.int32)
  return cohort.indices


__all__ = ["fedavg", "FedAvgConfig", "build_fedavg_family", "fedavg_family_round",
           "proximal_grad_fn", "COMMON_OPTIONS", "cohort_positions"]
