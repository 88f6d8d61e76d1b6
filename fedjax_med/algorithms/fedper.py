"""FedPer (Arivazhagan, Aggarwal, Singh & Choudhary, 2019): shared body, personal head.

The model is split into base layers, learned with FedAvg across sites, and
personal layers that never leave the site. Each participating site trains
the whole model from (global base, its own head); only the base's
pseudo-gradient is aggregated, and the trained head is kept as client state.
Site k's model is (global base, head_k).

`personal` names the personal layers (e.g. ("output",) for an MLP's last
layer; for a linear model, ("bias",) gives each site its own intercept, i.e.
its own baseline risk) or is a predicate on the parameter path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_med.algorithms.fedavg import COMMON_OPTIONS, SGD_LR_1, cohort_positions
from fedjax_med.algorithms.personal import merge, personal_mask, stacked_merge
from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       check_num_sites, make_algorithm, new_server_state,
                                       server_key, stack_sites)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import check_optimizer, check_positive_int, reject_unknown
from fedjax_med.core.state import init_client_optimizer, injected_hyperparams
from fedjax_med.core.tree import tree_l2_norm


_OPTIONS = tuple(o for o in COMMON_OPTIONS if o not in ("gradient_estimator", "downlink")) + (
    "personal",)


@dataclasses.dataclass(frozen=True)
class FedPerConfig:
  loss_fn: Any
  personal: Any
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  client_chunk_size: int | None = None


def fedper(loss_fn, *, personal: Sequence[str] | Callable[[str], bool],
           client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, weighting: str = "num_examples",
           aggregator: agg.Aggregator | None = None, shuffle: bool = True,
           cohort_size: int | None = None, sampling: str = "uniform",
           client_chunk_size: int | None = None,
           **unknown_options) -> FederatedAlgorithm:
  """Builds FedPer; arguments as `fedavg`, plus `personal` (see module doc).

  `init(params, num_sites)`; `personalize(state, data, key)` returns the
  per-site models `[K, ...]`.
  """
  reject_unknown("fedper", unknown_options, _OPTIONS)
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  chunking.require_linear_aggregator("fedper", client_chunk_size, aggregator,
                                     agg.weighted_mean())
  personal = personal if callable(personal) else tuple(personal)
  config = FedPerConfig(
      loss_fn=loss_fn, personal=personal,
      client_optimizer=check_optimizer("fedper", "client_optimizer", client_optimizer),
      server_optimizer=check_optimizer("fedper", "server_optimizer", server_optimizer),
      schedule=make_schedule("fedper", batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec("fedper", cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      client_chunk_size=chunking.check_chunk_size("fedper", client_chunk_size))

  def init(params, num_sites: int):
    check_positive_int("fedper.init", "num_sites", num_sites)
    personal_mask(params, config.personal)  # validates the split now
    return new_server_state(
        params, config.server_optimizer,
        client_hparams=injected_hyperparams(config.client_optimizer.init(params)),
        hparams={}, client_states={"params": stack_sites(params, num_sites)},
        aggregator_state=config.aggregator.init(params, num_sites))

  def personalize(state, data, key):
    del data, key
    mask = personal_mask(state.params, config.personal)
    return stacked_merge(mask, state.params, state.client_states["params"])

  return make_algorithm("fedper", _fedper_round, config, loss_fn, init, personalize)


def _fedper_round(config: FedPerConfig, state, data, key):
  w = state.params
  mask = personal_mask(w, config.personal)
  check_num_sites("fedper", state.client_states, data.mask.shape[0])
  cohort = cohort_lib.select_cohort(config.cohort, data, state.client_states, key)
  grad_fn = loss_and_grad(config.loss_fn)

  def client_update(x_k, y_k, mask_k, key_k, own_k):
    start = merge(mask, w, own_k)
    opt_state = init_client_optimizer(config.client_optimizer, start, state.client_hparams)
    local = local_training(grad_fn, config.client_optimizer, config.schedule, start,
                           opt_state, x_k, y_k, mask_k, key_k)
    delta = jax.tree_util.tree_map(
        lambda m, a, b: jnp.zeros_like(a) if m else a - b, mask, w, local.params)
    # Store only the personal leaves: the shared ones of the stored copy are never
    # read (personalize takes them from w), and an empty site keeps its state.
    return delta, (merge(mask, own_k, local.params), local.num_steps, local.mean_loss)

  delta, (own, steps, losses), aggregator_state, agg_metrics = chunking.aggregate_clients(
      client_update, (cohort.data.x, cohort.data.y, cohort.data.mask,
                      client_keys(key, cohort.data.site_ids), cohort.client_states["params"]),
      cohort.weights, config.aggregator, state.aggregator_state, server_key(key),
      cohort.context, config.client_chunk_size)
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, w, state.server_opt_state, delta,
      active=cohort_lib.participated(cohort))
  client_states = {"params": cohort_lib.put_sites(state.client_states["params"], own,
                                                  cohort.indices)}
  metrics = {
      "train_loss": jnp.sum(agg.normalized(cohort.weights) * losses),
      "client_train_loss": losses,
      "client_steps": steps,
      "num_examples": jnp.sum(cohort.data.mask, axis=1, dtype=jnp.int32),
      "cohort": cohort_positions(cohort, data.mask.shape[0]),
      "update_norm": tree_l2_norm(delta),
      **agg_metrics,
  }
  return state._replace(params=params, server_opt_state=server_opt_state,
                        aggregator_state=aggregator_state, client_states=client_states,
                        round=state.round + 1), metrics


__all__ = ["fedper"]
