"""FedDyn (Acar, Zhao, Navarro, Mattina, Whatmough & Saligrama, ICLR 2021, Algorithm 1).

Each site k keeps h_k, the gradient of its dynamic regulariser (h_k = 0 at
the start), and in a round minimises, from the server model w,

    F_k(theta) - <h_k, theta> + (alpha / 2) ||theta - w||^2

with the configured local optimizer and schedule (local gradient
grad F_k(theta) - h_k + alpha (theta - w)), reaching w_k. Then, for the m sites
of the federation that hold data (the paper's m devices; a site with no rows is
not counted, so adding an empty site changes nothing) and the participants P
(the cohort's sites that hold data):

    client:  h_k <- h_k - alpha (w_k - w)
    server:  h   <- h - alpha (1 / m) sum_{k in P} (w_k - w)
             w   <- (1 / |P|) sum_{k in P} w_k - h / alpha

alpha is traced (`set_hyperparams(state, alpha=...)`). A round with no
participant holding data changes nothing.

Written with the public round-building kit only (`fedjax_med.kit`, exported
as `fm.kit`): a client update, a server update, per-site and server state
initialisers; cohorts, chunking, padding, seeds and checkpoints come from
the kit. `docs/writing_algorithms.md` walks through this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import kit


def _feddyn_client(ctx: kit.ClientContext, w, state, data: kit.ClientData, key):
  alpha = ctx.hparams["alpha"]
  base = kit.gradient_fn(ctx)

  def grad_fn(theta, x, y, mask, step_key=None):        # grad of the dynamic objective
    loss, g = base(theta, x, y, mask, step_key)
    return loss, jax.tree_util.tree_map(lambda g_, h, t, w_: g_ - h + alpha * (t - w_),
                                        g, state["h"], theta, w)

  local = kit.local_training(ctx, w, data, key, grad_fn=grad_fn)
  h = jax.tree_util.tree_map(lambda h, wk, w_: h - alpha * (wk - w_),
                             state["h"], local.params, w)
  return kit.ClientResult(kit.pseudo_gradient(w, local.params), {"h": h},
                          {"num_steps": local.num_steps, "mean_loss": local.mean_loss})


def _participants(ctx: kit.ServerContext, values):
  del values
  return (ctx.weights > 0).astype(jnp.float32)     # uniform over the sites holding data


def _feddyn_server(ctx: kit.ServerContext, state, aggregate, values):
  # aggregate = (1/|P|) sum_P (w - w_k), so sum_P (w_k - w) = -|P| aggregate.
  del values
  alpha = ctx.hparams["alpha"]
  num_participants = jnp.sum(ctx.aggregation_weights > 0).astype(jnp.float32)
  m = jnp.sum(ctx.population_num_examples > 0).astype(jnp.float32)
  h = jax.tree_util.tree_map(lambda h, d: h + alpha * (num_participants / m) * d,
                             state.algorithm_state["h"], aggregate)
  w = jax.tree_util.tree_map(lambda w_, d, h_: w_ - d - h_ / alpha,
                             state.params, aggregate, h)
  keep = ctx.participated
  w = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), w, state.params)
  h = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), h,
                             state.algorithm_state["h"])
  return kit.ServerResult(w, state.server_opt_state, {"h": h})


def _zeros(params):
  return {"h": jax.tree_util.tree_map(jnp.zeros_like, params)}


def feddyn(loss_fn, *, alpha: float, client_optimizer: optax.GradientTransformation,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, shuffle: bool = True, cohort_size: int | None = None,
           sampling: str = "uniform", client_chunk_size: int | None = None,
           **unknown_options):
  """Builds FedDyn; `init(params, num_sites)`.

  Args:
    loss_fn: `loss_fn(params, x, y) -> [B]` (or a `fedjax_med.batch_loss`).
    alpha: alpha > 0, the weight of the dynamic regulariser (traced).
    client_optimizer, local_epochs, local_steps, batch_size, shuffle,
      cohort_size, sampling, client_chunk_size (and aggregator,
      gradient_estimator, downlink): as `fedjax_med.algorithms.fedavg`. The
      server update is FedDyn's own: no server optimizer, and the mean over
      participants is uniform (no `weighting`).
  """
  kit.reject_fixed_options("feddyn", unknown_options, ("weighting", "server_optimizer"))
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise kit.OptionError(f"feddyn: alpha must be a number > 0, got {alpha!r}")
  return kit.build_algorithm(
      "feddyn", loss_fn, client_update=_feddyn_client, server_update=_feddyn_server,
      client_weights=_participants, init_client_state=_zeros, init_server_state=_zeros,
      hparams={"alpha": float(alpha)}, client_optimizer=client_optimizer,
      local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
      shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      client_chunk_size=client_chunk_size, weighting="uniform", **unknown_options)


__all__ = ["feddyn"]
