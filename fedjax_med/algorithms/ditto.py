"""Ditto (Li, Hu, Beirami & Smith, ICML 2021), Algorithm 1.

Each site keeps a personal model v_k next to the global one. In a round,
every participating site

  1. trains the global model as FedAvg does: w_k from w^t on F_k, sending
     Delta_k = w^t - w_k;
  2. updates its personal model on the regularised objective
         F_k(v) + (lambda / 2) ||v - w^t||^2
     with the same number of local steps (the batch stream of this step uses
     `fold_in(client_key, PERSONAL_STREAM)`).

The server aggregates the Delta_k as FedAvg. lambda = 0 gives local
training; large lambda pulls every v_k towards the global model.
`state.hparams["lam"]` is traced. Site k's model is v_k
(`state.client_states["params"]`, leading K axis).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.algorithms.fedavg import (COMMON_OPTIONS, SGD_LR_1, cohort_positions,
                                          proximal_grad_fn)
from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       check_num_sites, make_algorithm, new_server_state,
                                       server_key, stack_sites)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import (check_nonnegative_float, check_optimizer,
                                     check_positive_int, reject_unknown)
from fedjax_med.core.state import (init_client_optimizer, injected_hyperparams,
                                   optimizer_hparams, select_prefixed)
from fedjax_med.core.tree import tree_l2_norm

PERSONAL_STREAM = np.uint32(2**32 - 4)
# The personal optimizer's traced hyperparameters are state.hparams["personal_<name>"].
PERSONAL_PREFIX = "personal"


@dataclasses.dataclass(frozen=True)
class DittoConfig:
  loss_fn: Any
  client_optimizer: optax.GradientTransformation
  personal_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  client_chunk_size: int | None = None


_OPTIONS = tuple(o for o in COMMON_OPTIONS if o not in ("gradient_estimator", "downlink")) + (
    "lam", "personal_optimizer")


def ditto(loss_fn, *, lam: float, client_optimizer: optax.GradientTransformation,
          personal_optimizer: optax.GradientTransformation | None = None,
          server_optimizer: optax.GradientTransformation = SGD_LR_1,
          local_epochs: int | None = None, local_steps: int | None = None,
          batch_size: int = 32, weighting: str = "num_examples",
          aggregator: agg.Aggregator | None = None, shuffle: bool = True,
          cohort_size: int | None = None, sampling: str = "uniform",
          client_chunk_size: int | None = None,
          **unknown_options) -> FederatedAlgorithm:
  """Builds Ditto; arguments as `fedavg`, plus

  Args:
    lam: lambda >= 0, the pull of personal models towards the global one.
    personal_optimizer: optimizer of the personal step (default: the client
      optimizer; it is re-initialised every round, as the global step's). Its
      injected hyperparameters are its own, traced in `state.hparams` as
      `personal_<name>` (e.g. `set_hyperparams(state,
      personal_learning_rate=0.01)`); `set_hyperparams(client=...)` does not
      change them.

  `init(params, num_sites)`; `personalize(state, data, key)` returns v `[K, ...]`.
  """
  reject_unknown("ditto", unknown_options, _OPTIONS)
  chunking.require_linear_aggregator("ditto", client_chunk_size, aggregator,
                                     agg.weighted_mean())
  lam = check_nonnegative_float("ditto", "lam", lam)
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  client_optimizer = check_optimizer("ditto", "client_optimizer", client_optimizer)
  config = DittoConfig(
      loss_fn=loss_fn, client_optimizer=client_optimizer,
      personal_optimizer=check_optimizer(
          "ditto", "personal_optimizer",
          personal_optimizer if personal_optimizer is not None else client_optimizer),
      server_optimizer=check_optimizer("ditto", "server_optimizer", server_optimizer),
      schedule=make_schedule("ditto", batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec("ditto", cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      client_chunk_size=chunking.check_chunk_size("ditto", client_chunk_size))

  def init(params, num_sites: int):
    check_positive_int("ditto.init", "num_sites", num_sites)
    return new_server_state(
        params, config.server_optimizer,
        client_hparams=injected_hyperparams(config.client_optimizer.init(params)),
        hparams={"lam": lam, **optimizer_hparams(PERSONAL_PREFIX,
                                                 config.personal_optimizer, params)},
        client_states={"params": stack_sites(params, num_sites)},
        aggregator_state=config.aggregator.init(params, num_sites))

  def personalize(state, data, key):
    del data, key
    return state.client_states["params"]

  return make_algorithm("ditto", _ditto_round, config, loss_fn, init, personalize)


def _ditto_round(config: DittoConfig, state, data, key):
  w = state.params
  check_num_sites("ditto", state.client_states, data.mask.shape[0])
  cohort = cohort_lib.select_cohort(config.cohort, data, state.client_states, key)
  global_grad = loss_and_grad(config.loss_fn)
  personal_grad = proximal_grad_fn(global_grad, state.hparams["lam"], w)

  def client_update(x_k, y_k, mask_k, key_k, v_k):
    opt_state = init_client_optimizer(config.client_optimizer, w, state.client_hparams)
    local = local_training(global_grad, config.client_optimizer, config.schedule, w,
                           opt_state, x_k, y_k, mask_k, key_k)
    delta = jax.tree_util.tree_map(jnp.subtract, w, local.params)
    p_state = init_client_optimizer(config.personal_optimizer, v_k,
                                    select_prefixed(PERSONAL_PREFIX, state.hparams))
    personal = local_training(personal_grad, config.personal_optimizer, config.schedule,
                              v_k, p_state, x_k, y_k, mask_k,
                              jax.random.fold_in(key_k, PERSONAL_STREAM))
    return delta, (personal.params, local.num_steps, local.mean_loss, personal.mean_loss)

  delta, (v_new, steps, losses, personal_losses), aggregator_state, agg_metrics = (
      chunking.aggregate_clients(
          client_update, (cohort.data.x, cohort.data.y, cohort.data.mask,
                          client_keys(key, cohort.data.site_ids),
                          cohort.client_states["params"]),
          cohort.weights, config.aggregator, state.aggregator_state, server_key(key),
          cohort.context, config.client_chunk_size))
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, w, state.server_opt_state, delta,
      active=cohort_lib.participated(cohort))
  client_states = {"params": cohort_lib.put_sites(state.client_states["params"], v_new,
                                                  cohort.indices)}
  metrics = {
      "train_loss": jnp.sum(agg.normalized(cohort.weights) * losses),
      "client_train_loss": losses,
      "client_personal_loss": personal_losses,
      "client_steps": steps,
      "num_examples": jnp.sum(cohort.data.mask, axis=1, dtype=jnp.int32),
      "cohort": cohort_positions(cohort, data.mask.shape[0]),
      "update_norm": tree_l2_norm(delta),
      **agg_metrics,
  }
  return state._replace(params=params, server_opt_state=server_opt_state,
                        aggregator_state=aggregator_state, client_states=client_states,
                        round=state.round + 1), metrics


__all__ = ["ditto", "PERSONAL_STREAM"]
