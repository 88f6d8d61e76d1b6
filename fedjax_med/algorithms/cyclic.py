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

Built from the round-building kit (`fedjax_med.core.kit`): the options and
the static `KitConfig` come from `kit.make_config`, each visit is the kit's
local training (`kit.local_training` in the round's `kit.client_context`,
with the site's kit key `fold_in(round_key, site_id)`), and the server step
is `kit.apply_server_update` on `kit.pseudo_gradient(w_start, w_end)`. Only
the sequence is Cyclic's own: the sites cannot be vmapped, since each starts
from the model its predecessor produced. (A visit hands on the trained model
itself; w - Delta_k would round differently.)

Note on FLamby: its `flamby/strategies/cyclic.py` trains one site per round
(a cycle spans K rounds) and, since its commit bc27fe6, never hands the
weights from one site's model copy to the next, so its published "Cyclic"
numbers are site 0 trained alone. This implementation transfers the weights,
as the method intends; it will not reproduce those numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm, make_algorithm, server_key
from fedjax_med.core.options import OptionError, reject_unknown
from fedjax_med.core.streams import ORDER_STREAM  # noqa: F401 (re-exported)
from fedjax_med.core.tree import tree_l2_norm

# Cyclic's static configuration is a `kit.KitConfig` (name "cyclic"; nothing is
# averaged, so its aggregator and weighting are unused). Kept under its old name.
CyclicConfig = kit.KitConfig

# The common options that make no sense for sites in sequence.
_NOT_OPTIONS = ("weighting", "aggregator", "gradient_estimator", "downlink")


def cyclic(loss_fn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = kit.SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, shuffle: bool = True, cohort_size: int | None = None,
           sampling: str = "uniform", client_chunk_size: int | None = None,
           **unknown_options) -> FederatedAlgorithm:
  """Builds Cyclic; arguments as `fedavg` (no weighting or aggregator: nothing is averaged).

  The client optimizer is re-initialised at every site. `client_chunk_size`
  is accepted for a uniform interface and has no effect: sites already run
  one at a time.

  Returns:
    FederatedAlgorithm with `init(params)`. Round metrics: train_loss (the
    unweighted mean of the visited sites' local batch losses, over the sites
    that took a step), client_train_loss [C], client_steps [C], num_examples
    [C] (cohort order), cohort [C] and visit_order [C] (site positions, the
    latter in visiting order), update_norm (||w_start - w_end||).
  """
  reject_unknown("cyclic", unknown_options,
                 tuple(o for o in kit.COMMON_OPTIONS if o not in _NOT_OPTIONS))
  if sampling != "uniform":
    raise OptionError("cyclic: only sampling='uniform' (a site visited twice in one"
                      " cycle would train twice)")
  config, _ = kit.make_config(
      "cyclic", loss_fn, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs, local_steps=local_steps,
      batch_size=batch_size, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      client_chunk_size=client_chunk_size)
  # The chunk size only mattered for validation: the round never vmaps sites.
  config = dataclasses.replace(config, client_chunk_size=None)

  def init(params):
    return kit.initial_state(config, params)

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


def _cyclic_round(config: kit.KitConfig, state, data, key):
  """w_0 = w; w_{j+1} = local_training(w_j, site order[j]); w' = server step on w - w_C."""
  w = state.params
  num_sites = data.mask.shape[0]
  cohort = cohort_lib.select_cohort(config.cohort, data, (), key)
  order = visit_order(jax.random.fold_in(key, ORDER_STREAM), cohort.data.site_ids)
  keys = kit.client_keys(key, cohort.data.site_ids)
  ctx = kit.client_context(config, state)

  def visit(params, position):
    site = kit.ClientData(cohort.data.x[position], cohort.data.y[position],
                          cohort.data.mask[position])
    local = kit.local_training(ctx, params, site, keys[position])
    return local.params, (local.num_steps, local.mean_loss)

  w_end, (steps, losses) = jax.lax.scan(visit, w, order)
  delta = kit.pseudo_gradient(w, w_end)
  positions = kit.cohort_positions(cohort, num_sites)
  server_ctx = kit.ServerContext(
      config, state.hparams, cohort.weights, cohort.weights, positions, num_sites,
      data.num_examples, cohort_lib.participated(cohort), server_key(key))
  result = kit.apply_server_update(server_ctx, state, delta, {})
  # Report per-site values in cohort order (the scan ran in `order`).
  inverse = jnp.argsort(order)
  metrics = {
      "train_loss": jnp.sum(jnp.where(steps > 0, losses, 0.0)) / jnp.maximum(
          jnp.sum(steps > 0), 1),
      "client_train_loss": losses[inverse],
      "client_steps": steps[inverse],
      "num_examples": cohort.data.num_examples,
      "cohort": positions,
      "visit_order": positions[order],
      "update_norm": tree_l2_norm(delta),
  }
  return state._replace(params=result.params, server_opt_state=result.server_opt_state,
                        round=state.round + 1), metrics


__all__ = ["cyclic", "CyclicConfig", "ORDER_STREAM", "visit_order"]
