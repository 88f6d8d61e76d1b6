"""FedPer (Arivazhagan, Aggarwal, Singh & Choudhary, 2019, arXiv:1912.00818): shared body,
personal head.

The model is split into base layers, learned with FedAvg across sites, and
personal layers that never leave the site. Each participating site trains
the whole model from (global base, its own head); only the base's
pseudo-gradient is aggregated, and the trained head is kept as client state.
Site k's model is (global base, head_k): with P the personal leaves,

    (w_k, head_k') = local training from (w_B, head_k)
    Delta_k        = w_B - w_k on the shared leaves, 0 on P
    w_B'           = w_B + server_optimizer(sum_k p_k Delta_k)

`personal` names the personal layers (e.g. ("output",) for an MLP's last
layer; for a linear model, ("bias",) gives each site its own intercept, i.e.
its own baseline risk) or is a predicate on the parameter path.

Written with the round-building kit (`fedjax_med.core.kit`): a client update
whose pseudo-gradient is zero on the personal leaves and whose client state
(`state.client_states["params"]`, leading K axis) keeps the trained personal
leaves; the server is FedAvg's. A site with no data keeps its state.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_med.algorithms.personal import merge, personal_mask, stacked_merge
from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1
from fedjax_med.core.options import reject_unknown


_OPTIONS = tuple(o for o in COMMON_OPTIONS if o not in ("gradient_estimator", "downlink")) + (
    "personal",)


def fedper_client_update(ctx: kit.ClientContext, w, client_state, data: kit.ClientData, key):
  """FedPer's client: train from (shared leaves of w, own personal leaves); send
  w - w_k on the shared leaves and 0 on the personal ones (`ctx.config.static`
  is the `personal` spec)."""
  mask = personal_mask(w, ctx.config.static)
  own = client_state["params"]
  local = kit.local_training(ctx, merge(mask, w, own), data, key)
  update = jax.tree_util.tree_map(
      lambda m, a, b: jnp.zeros_like(a) if m else a - b, mask, w, local.params)
  # Store only the personal leaves: the shared ones of the stored copy are never
  # read (personalize takes them from w).
  return kit.ClientResult(update, {"params": merge(mask, own, local.params)},
                          {"num_steps": local.num_steps, "mean_loss": local.mean_loss})


def _own_copy(params):
  return {"params": params}


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
  personal = personal if callable(personal) else tuple(personal)
  base = kit.build_algorithm(
      "fedper", loss_fn, client_update=fedper_client_update, init_client_state=_own_copy,
      static=personal, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
      local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
      weighting=weighting, aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size,
      sampling=sampling, client_chunk_size=client_chunk_size)

  def init(params, num_sites: int | None = None):
    state = base.init(params, num_sites)
    personal_mask(params, personal)  # validates the split now
    return state

  def personalize(state, data, key):
    del data, key
    mask = personal_mask(state.params, personal)
    return stacked_merge(mask, state.params, state.client_states["params"])

  return base._replace(init=init, personalize=personalize)


__all__ = ["fedper", "fedper_client_update"]
