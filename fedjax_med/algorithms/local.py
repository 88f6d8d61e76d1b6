"""Local-only and pooled training: the lower and upper references of every table.

`local_only` trains one model per site on that site's data alone, all sites
at once under `jax.vmap`; each site's optimizer state persists across rounds,
so `rounds x local_epochs` passes equal ordinary centralised training with
one optimizer (e.g. Adam, as FLamby's Local i and Pooled baselines).
Pooled (centralised) training is `local_only` on `data.pooled()` (K = 1).

State: `state.client_states = {"params": [K, ...], "opt_state": [K, ...]}`;
`state.params` keeps the shared initial point (all sites start from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.algorithm import (FederatedAlgorithm, check_num_sites, make_algorithm,
                                       new_server_state, stack_sites)
from fedjax_med.core import chunking
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import check_optimizer, check_positive_int, reject_unknown
from fedjax_med.core.state import injected_hyperparams, with_injected_hyperparams


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  loss_fn: Any
  optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  client_chunk_size: int | None = None


_OPTIONS = ("optimizer", "local_epochs", "local_steps", "batch_size", "shuffle",
            "client_chunk_size")


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
    `state.client_states["params"]` (leading K axis).
  """
  reject_unknown("local_only", unknown_options, _OPTIONS)
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  config = LocalConfig(
      loss_fn=loss_fn,
      optimizer=check_optimizer("local_only", "optimizer", optimizer),
      schedule=make_schedule("local_only", batch_size, local_epochs, local_steps, shuffle),
      client_chunk_size=chunking.check_chunk_size("local_only", client_chunk_size))

  def init(params, num_sites: int):
    check_positive_int("local_only.init", "num_sites", num_sites)
    opt_state = config.optimizer.init(params)
    return new_server_state(
        params, optax.identity(), client_hparams=injected_hyperparams(opt_state),
        hparams={}, client_states={"params": stack_sites(params, num_sites),
                                   "opt_state": stack_sites(opt_state, num_sites)})

  return make_algorithm("local_only", _local_round, config, loss_fn, init,
                        personalize=lambda state, data, key: state.client_states["params"])


def _local_round(config: LocalConfig, state, data, key):
  x, y, mask = data.x, data.y, data.mask
  num_sites = mask.shape[0]
  check_num_sites("local_only", state.client_states, num_sites)
  grad_fn = loss_and_grad(config.loss_fn)

  def site_update(params, opt_state, x_k, y_k, mask_k, key_k):
    opt_state = with_injected_hyperparams(opt_state, state.client_hparams)
    local = local_training(grad_fn, config.optimizer, config.schedule, params, opt_state,
                           x_k, y_k, mask_k, key_k)
    return local.params, local.opt_state, local.num_steps, local.mean_loss

  params, opt_state, steps, losses = chunking.map_sites(
      site_update, (state.client_states["params"], state.client_states["opt_state"], x, y,
                    mask, client_keys(key, data.site_ids)), config.client_chunk_size)
  metrics = {"client_train_loss": losses, "client_steps": steps,
             "num_examples": jnp.sum(mask, axis=1, dtype=jnp.int32)}
  return state._replace(client_states={"params": params, "opt_state": opt_state},
                        round=state.round + 1), metrics


__all__ = ["local_only", "LocalConfig"]
