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

Written with the round-building kit (`fedjax_med.core.kit`): the client runs
`local_training` twice (the global step with the client optimizer, the
personal step with the personal optimizer on `proximal(gradient_fn, lam, w)`)
and keeps v_k as its client state; the server is FedAvg's
(`apply_server_update`) and reports the personal losses as the metric
`client_personal_loss`.
"""

from __future__ import annotations

import jax
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1
from fedjax_med.core.options import check_nonnegative_float, check_optimizer, reject_unknown
from fedjax_med.core.state import select_prefixed
from fedjax_med.core.streams import PERSONAL_STREAM  # noqa: F401 (re-exported)

# The personal optimizer's traced hyperparameters are state.hparams["personal_<name>"].
PERSONAL_PREFIX = "personal"

# Ditto's clients take the plain mean gradient and train from the model as sent.
_OPTIONS = tuple(o for o in COMMON_OPTIONS if o not in ("gradient_estimator", "downlink")) + (
    "lam", "personal_optimizer")


def ditto_client_update(ctx: kit.ClientContext, w, client_state, data: kit.ClientData, key):
  """Ditto's client: FedAvg's step from w (Delta_k = w - w_k), then the personal
  step v_k <- v_k - lr (grad F_k(v_k) + lam (v_k - w)) with the personal
  optimizer (`ctx.config.static`) and its own traced hyperparameters."""
  local = kit.local_training(ctx, w, data, key)
  personal = kit.local_training(
      ctx, client_state["params"], data, jax.random.fold_in(key, PERSONAL_STREAM),
      grad_fn=kit.proximal(kit.gradient_fn(ctx), ctx.hparams["lam"], w),
      optimizer=ctx.config.static,
      optimizer_hparams=select_prefixed(PERSONAL_PREFIX, ctx.hparams))
  return kit.ClientResult(kit.pseudo_gradient(w, local.params), {"params": personal.params},
                          {"num_steps": local.num_steps, "mean_loss": local.mean_loss,
                           "personal_loss": personal.mean_loss})


def _ditto_server(ctx: kit.ServerContext, state, aggregate, values):
  result = kit.apply_server_update(ctx, state, aggregate, values)
  return result._replace(metrics={"client_personal_loss": values["personal_loss"]})


def _own_copy(params):
  return {"params": params}


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
  Round metrics: FedAvg's, plus client_personal_loss [C] (the personal step's
  mean batch loss, without the proximal term).
  """
  reject_unknown("ditto", unknown_options, _OPTIONS)
  lam = check_nonnegative_float("ditto", "lam", lam)
  client_optimizer = check_optimizer("ditto", "client_optimizer", client_optimizer)
  personal_optimizer = check_optimizer(
      "ditto", "personal_optimizer",
      personal_optimizer if personal_optimizer is not None else client_optimizer)
  base = kit.build_algorithm(
      "ditto", loss_fn, client_update=ditto_client_update, server_update=_ditto_server,
      init_client_state=_own_copy, hparams={"lam": lam}, static=personal_optimizer,
      prefixed_optimizers={PERSONAL_PREFIX: personal_optimizer},
      client_optimizer=client_optimizer, server_optimizer=server_optimizer,
      local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
      weighting=weighting, aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size,
      sampling=sampling, client_chunk_size=client_chunk_size)

  def personalize(state, data, key):
    del data, key
    return state.client_states["params"]

  return base._replace(personalize=personalize)


__all__ = ["ditto", "ditto_client_update", "PERSONAL_STREAM"]
