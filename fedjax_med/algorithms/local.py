"""Local-only and pooled training: the lower and upper references of every table.

`local_only` trains one model per site on that site's data alone, all sites
at once under `jax.vmap`; each site's optimizer state persists across rounds,
so `rounds x local_epochs` passes equal ordinary centralised training with
one optimizer (e.g. Adam, as FLamby's Local i and Pooled baselines):

    for every site k, tau_k local steps:  (w_k, s_k) <- optimizer step on F_k(w_k)

with no communication and no global model update. Pooled (centralised)
training is `local_only` on `data.pooled()` (K = 1).

State: `state.client_states = {"params": [K, ...], "opt_state": [K, ...]}`;
`state.params` keeps the shared initial point (all sites start from it).

Built with the round-building kit (`fedjax_med.core.kit`): the client state
is the site's (w_k, s_k), the client sends no update and the server returns
the state unchanged.
"""

from __future__ import annotations

import optax

from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import check_optimizer, reject_unknown
from fedjax_med.core.state import with_injected_hyperparams

_OPTIONS = ("optimizer", "local_epochs", "local_steps", "batch_size", "shuffle",
            "client_chunk_size")
# No global model update: a stateless server optimizer (state.server_opt_state
# is its EmptyState), shared so that equal configurations share one compile.
_NO_SERVER_OPTIMIZER = optax.identity()
# The round metrics local_only reports (per site, `[K]`).
_METRICS = ("client_train_loss", "client_steps", "num_examples")


def local_client_update(ctx: kit.ClientContext, params, client_state, data: kit.ClientData,
                        key) -> kit.ClientResult:
  """Site k continues from its own (w_k, s_k), ignoring the received model;
  the optimizer's traced hyperparameters come from `state.client_hparams`."""
  del params
  opt_state = with_injected_hyperparams(client_state["opt_state"], ctx.client_hparams)
  local = kit.local_training(ctx, client_state["params"], data, key, opt_state=opt_state)
  return kit.ClientResult((), {"params": local.params, "opt_state": local.opt_state},
                          {"num_steps": local.num_steps, "mean_loss": local.mean_loss})


def local_server_update(ctx: kit.ServerContext, state, aggregate, values) -> kit.ServerResult:
  """No global model: the server state is returned unchanged."""
  del ctx, aggregate, values
  return kit.ServerResult(state.params, state.server_opt_state, state.algorithm_state)


def local_only(loss_fn, *, optimizer: optax.GradientTransformation,
               local_epochs: int | None = None, local_steps: int | None = None,
               batch_size: int = 32, shuffle: bool = True,
               client_chunk_size: int | None = None,
               **unknown_options) -> FederatedAlgorithm:
  """Builds independent per-site training (no communication).

  Args:
    loss_fn: per-example loss (or a batch loss).
    optimizer: optax transformation; its state persists across rounds.
    local_epochs / local_steps: work per round (default 1 epoch).
    batch_size: batch size B.
    shuffle: reshuffle every pass.
    client_chunk_size: sites trained at once (see `fedjax_med.core.chunking`).

  Returns:
    FederatedAlgorithm whose `init(params, num_sites)` gives every site a copy
    of `params`; `round` trains all sites; per-site models are in
    `state.client_states["params"]` (leading K axis) and `personalize`
    returns them. Round metrics: client_train_loss, client_steps and
    num_examples, all `[K]`.
  """
  reject_unknown("local_only", unknown_options, _OPTIONS)
  optimizer = check_optimizer("local_only", "optimizer", optimizer)
  return kit.build_algorithm(
      "local_only", loss_fn, client_update=local_client_update,
      server_update=local_server_update,
      init_client_state=lambda params: {"params": params, "opt_state": optimizer.init(params)},
      personalize=lambda state, data, key: state.client_states["params"],
      client_optimizer=optimizer, server_optimizer=_NO_SERVER_OPTIMIZER,
      local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
      shuffle=shuffle, client_chunk_size=client_chunk_size, report_metrics=_METRICS)


__all__ = ["local_only", "local_client_update", "local_server_update"]
