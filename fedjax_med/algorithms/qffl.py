"""q-FFL solved by q-FedAvg (Li, Sanjabi, Beirami & Smith, ICLR 2020, Algorithm 3).

q-FFL reweights the objective towards the sites where the model does worst:
min_w sum_k p_k F_k(w)^(q+1) / (q+1). q-FedAvg solves it with local SGD. Each
participating site k evaluates its loss at the received model, F_k(w), trains
locally to w_bar_k, and with L the Lipschitz estimate (1 / the local learning
rate in the paper) sends

    Delta_k = F_k(w)^q L (w - w_bar_k)
    h_k     = q F_k(w)^(q-1) ||L (w - w_bar_k)||^2 + L F_k(w)^q

and the server steps w <- w - sum_k Delta_k / sum_k h_k over the participants
that hold data. q = 0 is FedAvg with uniform weights: w <- mean_k w_bar_k.
q and L are traced (`set_hyperparams(state, q=..., lipschitz=...)`).

Built with the public kit (`fm.kit`): F_k(w) reaches the server as a
per-client value, the aggregation weights are F_k(w)^q, and the server
update rescales the weighted mean into sum Delta_k / sum h_k:

    aggregate = sum_k F_k^q u_k / sum_k F_k^q,   u_k = w - w_bar_k
    sum_k Delta_k = L aggregate sum_k F_k^q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import kit


def _qffl_client(ctx: kit.ClientContext, w, state, data: kit.ClientData, key):
  del state
  loss_at_w = kit.site_loss(ctx, w, data)               # F_k(w), before training
  local = kit.local_training(ctx, w, data, key)
  u = kit.pseudo_gradient(w, local.params)              # w - w_bar_k
  squared_norm = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(u))
  return kit.ClientResult(u, values={"num_steps": local.num_steps,
                                     "mean_loss": local.mean_loss,
                                     "loss_at_start": loss_at_w,
                                     "update_sq_norm": squared_norm})


def _loss_power(ctx: kit.ServerContext, values, power):
  """F_k^power on the sites holding data (0 elsewhere; F_k clipped at 1e-12)."""
  has_data = values["num_examples"] > 0
  loss = jnp.maximum(values["loss_at_start"], 1e-12)
  return jnp.where(has_data, loss ** power, 0.0)


def _qffl_weights(ctx: kit.ServerContext, values):
  return _loss_power(ctx, values, ctx.hparams["q"])


def _qffl_server(ctx: kit.ServerContext, state, aggregate, values):
  q, lip = ctx.hparams["q"], ctx.hparams["lipschitz"]
  f_q = _loss_power(ctx, values, q)
  f_q1 = _loss_power(ctx, values, q - 1.0)
  h = jnp.where(q > 0, q * f_q1 * lip ** 2 * values["update_sq_norm"], 0.0) + lip * f_q
  scale = lip * jnp.sum(f_q) / jnp.maximum(jnp.sum(h), 1e-30)
  w = jax.tree_util.tree_map(lambda w_, a: w_ - scale * a, state.params, aggregate)
  w = jax.tree_util.tree_map(lambda new, old: jnp.where(ctx.participated, new, old),
                             w, state.params)
  return kit.ServerResult(w, state.server_opt_state, state.algorithm_state,
                          {"client_loss_at_start": values["loss_at_start"],
                           "sum_h": jnp.sum(h)})


def qffl(loss_fn, *, q: float, lipschitz: float,
         client_optimizer: optax.GradientTransformation,
         local_epochs: int | None = None, local_steps: int | None = None,
         batch_size: int = 32, shuffle: bool = True, cohort_size: int | None = None,
         sampling: str = "uniform", client_chunk_size: int | None = None,
         **unknown_options):
  """Builds q-FedAvg for q-FFL; `init(params)`.

  Args:
    loss_fn: `loss_fn(params, x, y) -> [B]` (or a `fedjax_med.batch_loss`);
      the method assumes F_k(w) > 0.
    q: q >= 0, the fairness exponent (0: uniform FedAvg) (traced).
    lipschitz: L > 0, the Lipschitz estimate of the paper (1 / the local
      learning rate for SGD clients) (traced).
    client_optimizer, local_epochs, local_steps, batch_size, shuffle,
      cohort_size, sampling, client_chunk_size (and gradient_estimator,
      downlink): as `fedjax_med.algorithms.fedavg`. The server update is
      q-FedAvg's own (no server optimizer, no `weighting`, no aggregator: the
      weights are F_k^q).

  Round metrics add `client_loss_at_start` [C] (F_k at the received model)
  and `sum_h`.
  """
  kit.reject_fixed_options("qffl", unknown_options,
                           ("weighting", "server_optimizer", "aggregator"))
  for name, value, low in (("q", q, 0.0), ("lipschitz", lipschitz, None)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        value >= 0 if low is not None else value > 0):
      raise kit.OptionError(f"qffl: {name} must be a number {'>= 0' if low is not None else '> 0'},"
                            f" got {value!r}")
  return kit.build_algorithm(
      "qffl", loss_fn, client_update=_qffl_client, server_update=_qffl_server,
      client_weights=_qffl_weights, hparams={"q": float(q), "lipschitz": float(lipschitz)},
      client_optimizer=client_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, shuffle=shuffle,
      cohort_size=cohort_size, sampling=sampling, client_chunk_size=client_chunk_size,
      **unknown_options)


__all__ = ["qffl"]
