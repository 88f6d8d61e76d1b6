"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, ICML 2020), Algorithm 1.

Control variates correct each site's drift. Server state: model x and control
variate c; each site k keeps c_k (client state, leading K axis). Per round,
for every participating site k:

    y_k <- x;  tau_k local SGD steps:  y_k <- y_k - lr (g_k(y_k) - c_k + c)
    c_k+ = c_k - c + (x - y_k) / (tau_k lr)                         (option II)
    Delta_k = x - y_k,   dc_k = c_k+ - c_k

and the server takes

    x <- x - server_step( sum_{k in S} p_k Delta_k )     (p_k over the cohort, as FedAvg)
    c <- c + sum_{k in S} q_k dc_k

with q_k the population weight of site k (1/K' for weighting="uniform",
which is the paper's |S|/N * mean; n_k/n for "num_examples", FLamby's
weighting). This keeps c = sum_k q_k c_k exactly under any cohort, so the
method stays correct when only some sites participate; non-participants'
c_k are untouched. In round 1 all control variates are 0, so it equals FedAvg.

SCAFFOLD's option II needs the local learning rate and plain SGD, so the
constructor takes `client_learning_rate` (traced: `state.client_hparams`)
rather than a client optimizer. `init(params, num_sites)` needs K.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.algorithms.fedavg import SGD_LR_1, cohort_positions
from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       check_num_sites, make_algorithm, new_server_state,
                                       server_key, stack_sites)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import (OptionError, check_nonnegative_float, check_optimizer,
                                     check_positive_int, reject_unknown)
from fedjax_med.core.state import init_client_optimizer
from fedjax_med.core.tree import tree_l2_norm, tree_select

# One shared client optimizer: its learning rate is always injected from the state.
_CLIENT_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)

_OPTIONS = ("client_learning_rate", "server_optimizer", "local_epochs", "local_steps",
            "batch_size", "weighting", "aggregator", "shuffle", "cohort_size", "sampling",
            "client_chunk_size")


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig:
  loss_fn: Any
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  client_chunk_size: int | None = None


def scaffold(loss_fn, *, client_learning_rate: float,
             server_optimizer: optax.GradientTransformation = SGD_LR_1,
             local_epochs: int | None = None, local_steps: int | None = None,
             batch_size: int = 32, weighting: str = "num_examples",
             aggregator: agg.Aggregator | None = None, shuffle: bool = True,
             cohort_size: int | None = None, sampling: str = "uniform",
             client_chunk_size: int | None = None,
             **unknown_options) -> FederatedAlgorithm:
  """Builds SCAFFOLD (option II control variates).

  Args:
    loss_fn: per-example (or batch-level) loss.
    client_learning_rate: local SGD step size lr (traced; change it with
      `fm.set_hyperparams(state, client={"learning_rate": ...})`).
    server_optimizer: optax step on the aggregated Delta (default SGD 1.0,
      i.e. global step size eta_g = 1).
    Others as `fedavg` (client_chunk_size bounds the local-training memory;
    the control variates themselves are K x P).

  Returns:
    FederatedAlgorithm with `init(params, num_sites)`. State:
    `client_states["control"]` holds c_k `[K, ...]`, `algorithm_state["control"]`
    holds c.
  """
  reject_unknown("scaffold", unknown_options, _OPTIONS)
  lr = check_nonnegative_float("scaffold", "client_learning_rate", client_learning_rate)
  if lr == 0.0:
    raise OptionError("scaffold: client_learning_rate must be > 0 (option II divides by it)")
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  chunking.require_linear_aggregator("scaffold", client_chunk_size, aggregator,
                                     agg.weighted_mean())
  config = ScaffoldConfig(
      loss_fn=loss_fn,
      server_optimizer=check_optimizer("scaffold", "server_optimizer", server_optimizer),
      schedule=make_schedule("scaffold", batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec("scaffold", cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      client_chunk_size=chunking.check_chunk_size("scaffold", client_chunk_size))

  def init(params, num_sites: int):
    check_positive_int("scaffold.init", "num_sites", num_sites)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return new_server_state(
        params, config.server_optimizer, client_hparams={"learning_rate": lr}, hparams={},
        client_states={"control": stack_sites(zeros, num_sites)},
        aggregator_state=config.aggregator.init(params, num_sites),
        algorithm_state={"control": zeros})

  return make_algorithm("scaffold", _scaffold_round, config, loss_fn, init)


def population_weights(num_examples: jax.Array, weighting: str) -> jax.Array:
  """q_k over all K sites: n_k / n or 1 / K' (0 for empty sites); sums to 1."""
  return agg.normalized(agg.client_weights(num_examples, weighting))


def _scaffold_round(config: ScaffoldConfig, state, data, key):
  w = state.params
  c = state.algorithm_state["control"]
  lr = state.client_hparams["learning_rate"]
  check_num_sites("scaffold", state.client_states, data.mask.shape[0])
  cohort = cohort_lib.select_cohort(config.cohort, data, state.client_states, key)
  base_grad = loss_and_grad(config.loss_fn)

  def client_update(x_k, y_k, mask_k, key_k, c_k):
    correction = jax.tree_util.tree_map(jnp.subtract, c, c_k)       # c - c_k

    def grad_fn(params, xb, yb, mb, step_key=None):
      loss, grads = base_grad(params, xb, yb, mb, step_key)
      return loss, jax.tree_util.tree_map(jnp.add, grads, correction)

    opt_state = init_client_optimizer(_CLIENT_SGD, w, {"learning_rate": lr})
    local = local_training(grad_fn, _CLIENT_SGD, config.schedule, w, opt_state,
                           x_k, y_k, mask_k, key_k)
    delta = jax.tree_util.tree_map(jnp.subtract, w, local.params)   # x - y_k
    scale = 1.0 / (jnp.maximum(local.num_steps, 1).astype(jnp.float32) * lr)
    c_new = jax.tree_util.tree_map(lambda ck, cg, d: ck - cg + scale * d, c_k, c, delta)
    c_new = tree_select(local.num_steps > 0, c_new, c_k)
    dc = jax.tree_util.tree_map(jnp.subtract, c_new, c_k)
    return delta, (dc, c_new, local.num_steps, local.mean_loss)

  delta, (dcs, c_cohort, steps, losses), aggregator_state, agg_metrics = (
      chunking.aggregate_clients(
          client_update, (cohort.data.x, cohort.data.y, cohort.data.mask,
                          client_keys(key, cohort.data.site_ids),
                          cohort.client_states["control"]),
          cohort.weights, config.aggregator, state.aggregator_state, server_key(key),
          cohort.context, config.client_chunk_size))
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, w, state.server_opt_state, delta,
      active=cohort_lib.participated(cohort))

  # c <- c + sum_{k in S} q_k dc_k, each distinct site counted once.
  q = population_weights(jnp.sum(data.mask, axis=1, dtype=jnp.int32),
                         config.cohort.weighting)
  positions = cohort_positions(cohort, data.mask.shape[0])
  multiplicity = jnp.sum(positions[:, None] == positions[None, :], axis=1)
  coeff = q[positions] / multiplicity.astype(jnp.float32)
  c = jax.tree_util.tree_map(jnp.add, c, agg.weighted_sum(dcs, coeff))
  client_states = {"control": cohort_lib.put_sites(state.client_states["control"],
                                                   c_cohort, cohort.indices)}
  num_examples = jnp.sum(cohort.data.mask, axis=1, dtype=jnp.int32)
  metrics = {
      "train_loss": jnp.sum(agg.normalized(cohort.weights) * losses),
      "client_train_loss": losses,
      "client_steps": steps,
      "num_examples": num_examples,
      "cohort": positions,
      "update_norm": tree_l2_norm(delta),
      "control_norm": tree_l2_norm(c),
      **agg_metrics,
  }
  new_state = state._replace(params=params, server_opt_state=server_opt_state,
                             aggregator_state=aggregator_state, client_states=client_states,
                             algorithm_state={"control": c}, round=state.round + 1)
  return new_state, metrics


__all__ = ["scaffold", "ScaffoldConfig", "population_weights"]
