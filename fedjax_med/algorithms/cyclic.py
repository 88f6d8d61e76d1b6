"""Cyclic weight transfer (Chang et al., JAMIA 2018; FLamby's Cyclic strategy).

Within a round the participating sites train one after another: the first
starts from the global model, each next site starts from the model its
predecessor produced, and the last site's model is the round's result. The
order is random, drawn from the round key (`fold_in(round_key,
ORDER_STREAM)`) per site id (`visit_order`), so an empty site or a
permutation of the sites does not change it; one `lax.scan` over sites
inside one jit. A round in which no visited site holds data leaves the model
and the server optimizer's state unchanged. The server step sees Delta = w_start - w_end, so `optax.sgd(1.0)`
keeps the last site's model.

Note on FLamby: its `flamby/strategies/cyclic.py` trains one site per round
(a cycle spans K rounds) and, since its commit bc27fe6, never hands the
weights from one site's model copy to the next, so its published "Cyclic"
numbers are site 0 trained alone. This implementation transfers the weights,
as the method intends; it will not reproduce those numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.algorithms.fedavg import COMMON_OPTIONS, SGD_LR_1, cohort_positions
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.chunking import check_chunk_size
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       make_algorithm, new_server_state)
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import OptionError, check_optimizer, reject_unknown
from fedjax_med.core.state import init_client_optimizer, injected_hyperparams
from fedjax_med.core.tree import tree_l2_norm
from fedjax_med.core.streams import ORDER_STREAM  # noqa: F401 (re-exported)



@dataclasses.dataclass(frozen=True)
class CyclicConfig:
  loss_fn: Any
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec


def cyclic(loss_fn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, shuffle: bool = True, cohort_size: int | None = None,
           sampling: str = "uniform", client_chunk_size: int | None = None,
           **unknown_options) -> FederatedAlgorithm:
  """Builds Cyclic; arguments as `fedavg` (no weighting or aggregator: nothing is averaged).

  The client optimizer is re-initialised at every site. `client_chunk_size`
  is accepted for a uniform interface and has no effect: sites already run
  one at a time.
  """
  check_chunk_size("cyclic", client_chunk_size)
  reject_unknown("cyclic", unknown_options, tuple(
      o for o in COMMON_OPTIONS
      if o not in ("weighting", "aggregator", "gradient_estimator", "downlink")))
  if sampling != "uniform":
    raise OptionError("cyclic: only sampling='uniform' (a site visited twice in one"
                      " cycle would train twice)")
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  config = CyclicConfig(
      loss_fn=loss_fn,
      client_optimizer=check_optimizer("cyclic", "client_optimizer", client_optimizer),
      server_optimizer=check_optimizer("cyclic", "server_optimizer", server_optimizer),
      schedule=make_schedule("cyclic", batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec("cyclic", cohort_size, sampling, "num_examples"))

  def init(params):
    return new_server_state(
        params, config.server_optimizer,
        client_hparams=injected_hyperparams(config.client_optimizer.init(params)),
        hparams={})

  return make_algorithm("cyclic", _cyclic_round, config, loss_fn, init)


def visit_order(order_key: jax.Array, site_ids: jax.Array) -> jax.Array:
  """`[C]` positions in visiting order: ascending u_k = U(fold_in(order_key, id_k)).

  Each site's draw depends on its id alone, so adding an empty site (a no-op
  visit) or permuting the sites leaves the order in which the other sites
  are visited unchanged (ties, probability ~C^2 / 2^24, break by position).
  """
  draws = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(order_key, i)))(
      site_ids.astype(jnp.uint32))
  return jnp.argsort(draws, stable=True).astype(jnp.int32)


def _cyclic_round(config: CyclicConfig, state, data, key):
  w = state.params
  grad_fn = loss_and_grad(config.loss_fn)
  cohort = cohort_lib.select_cohort(config.cohort, data, (), key)
  order = visit_order(jax.random.fold_in(key, ORDER_STREAM), cohort.data.site_ids)
  keys = client_keys(key, cohort.data.site_ids)

  def visit(params, position):
    opt_state = init_client_optimizer(config.client_optimizer, params, state.client_hparams)
    local = local_training(grad_fn, config.client_optimizer, config.schedule, params,
                           opt_state, cohort.data.x[position], cohort.data.y[position],
                           cohort.data.mask[position], keys[position])
    return local.params, (local.num_steps, local.mean_loss)

  w_end, (steps, losses) = jax.lax.scan(visit, w, order)
  delta = jax.tree_util.tree_map(jnp.subtract, w, w_end)
  params, server_opt_state = apply_server_optimizer(
      config.server_optimizer, w, state.server_opt_state, delta,
      active=jnp.any(steps > 0))
  positions = cohort_positions(cohort, data.mask.shape[0])
  num_examples = cohort.data.num_examples
  # Report per-site values in cohort order (the scan ran in `order`).
  inverse = jnp.argsort(order)
  metrics = {
      "train_loss": jnp.sum(jnp.where(steps > 0, losses, 0.0)) / jnp.maximum(
          jnp.sum(steps > 0), 1),
      "client_train_loss": losses[inverse],
      "client_steps": steps[inverse],
      "num_examples": num_examples,
      "cohort": positions,
      "visit_order": positions[order],
      "update_norm": tree_l2_norm(delta),
  }
  return state._replace(params=params, server_opt_state=server_opt_state,
                        round=state.round + 1), metrics


__all__ = ["cyclic", "CyclicConfig", "ORDER_STREAM", "visit_order"]
