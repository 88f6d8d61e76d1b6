"""`FederatedAlgorithm`: an (init, round) pair of pure functions.

    state = algo.init(params)
    state, metrics = algo.round(state, data, key)

`round` is a thin Python shell around one `jax.jit`-compiled function of
arrays: `impl(config, state, data, key)`, where `data` is the FederatedData
stripped of its static metadata (names, label type). `config` is a frozen,
hashable dataclass holding everything static (the loss, the optimizers, the
batch schedule, ...); it is a static argument of one module-level `jax.jit`,
so two algorithm objects built from the same loss and optimizer objects share
one compiled round, and numbers that live in the state (learning rates,
mu, ...) never trigger a recompile.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.state import ServerState, canonical_hparams
from fedjax_med.core.tree import tree_select
from fedjax_med.core.streams import SERVER_STREAM  # noqa: F401 (re-exported)

# Site k's key is fold_in(round_key, k); the server's randomness (aggregation
# noise, ...) uses fold_in(round_key, SERVER_STREAM), a value no site index takes.


class FederatedAlgorithm(NamedTuple):
  """An algorithm as a pair of pure functions, plus what personalisation needs.

  init(params, ...) -> ServerState
  round(state, data, key) -> (state, metrics): checks its inputs on the host,
    then runs one jit-compiled call.
  name: for progress bars and records.
  pure_round(state, data, key) -> (state, metrics): the same round without
    host-side checks, traceable: jit it, vmap it over seeds or
    hyperparameters, or lax.scan it over rounds.
  personalize: for personalised methods, `personalize(state, data, key)`
    -> per-site parameters stacked on a leading K axis (None otherwise).
  config: a synchronous kit-built algorithm's `KitConfig` (its pieces, for
    `fedjax_med.deploy` to run the client and server halves of the round in
    different processes); None for rounds of another shape.
  """
  init: Callable[..., ServerState]
  round: Callable[[ServerState, FederatedData, jax.Array], tuple[ServerState, dict]]
  name: str = "federated_algorithm"
  pure_round: Callable[[ServerState, FederatedData, jax.Array],
                       tuple[ServerState, dict]] | None = None
  personalize: Callable[[ServerState, FederatedData, jax.Array], Any] | None = None
  config: Any = None


def _call_impl(impl, config, state, data, key):
  return impl(config, state, data, key)


_jitted_round = jax.jit(_call_impl, static_argnums=(0, 1))
# The same round with the state's buffers donated: XLA may write the new state
# into the old one's memory (no second copy of the model, optimizer moments and
# per-client states on an accelerator). The state passed in is deleted.
_jitted_round_donating = jax.jit(_call_impl, static_argnums=(0, 1), donate_argnums=(2,))


def arrays_only(data: FederatedData) -> FederatedData:
  """The same arrays without static metadata, so names never recompile."""
  leaves, _ = data.tree_flatten()
  return FederatedData.tree_unflatten((None, None), leaves)


def server_key(round_key: jax.Array) -> jax.Array:
  """The server's key of a round: fold_in(round_key, SERVER_STREAM), never a site's key."""
  return jax.random.fold_in(round_key, SERVER_STREAM)


def apply_server_optimizer(optimizer: optax.GradientTransformation, params: Any,
                           opt_state: Any, pseudo_gradient: Any,
                           active: jax.Array | None = None) -> tuple[Any, Any]:
  """w <- w + optax_update(Delta), Delta = aggregated pseudo-gradient.

  With optax.sgd(1.0) and Delta = w - sum_k p_k w_k this is FedAvg's
  w <- sum_k p_k w_k; with optax.sgd(lr) and Delta = grad F(w) it is FedSGD.

  `active` (bool scalar): when False (no participant held data), the model
  and the optimizer state are returned unchanged, so a stateful server
  optimizer (FedAdam's moments, momentum) takes no step on an empty round.
  """
  updates, new_opt_state = optimizer.update(pseudo_gradient, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if active is None:
    return new_params, new_opt_state
  return (tree_select(active, new_params, params),
          tree_select(active, new_opt_state, opt_state))


def required_label_type(loss_fn) -> str | None:
  return getattr(loss_fn, "label_type", None)


def check_round_inputs(name: str, loss_fn, state: Any, data: Any) -> None:
  """Host-side checks done once per data object, outside the compiled round."""
  if not isinstance(state, ServerState):
    raise TypeError(f"{name}.round: state must be the ServerState from {name}.init,"
                    f" got {type(state).__name__}")
  if not isinstance(data, FederatedData):
    raise TypeError(f"{name}.round: data must be a FederatedData (build it with"
                    f" FederatedData.from_sites), got {type(data).__name__}")
  needed = required_label_type(loss_fn)
  if needed is None or data.label_type == needed:
    return
  checked = data.__dict__.setdefault("_checked_label_types", set())
  if needed in checked:
    return
  data.replace(label_type=needed)  # validates, raises naming the site and field
  checked.add(needed)


def make_round(name: str, impl: Callable, config: Any, loss_fn) -> Callable:
  """The public `round(state, data, key)` for a jit-compiled `impl`."""

  def checked(state, data):
    check_round_inputs(name, loss_fn, state, data)
    return state._replace(hparams=canonical_hparams(state.hparams),
                          client_hparams=canonical_hparams(state.client_hparams))

  def round_fn(state: ServerState, data: FederatedData, key: jax.Array):
    return _jitted_round(impl, config, checked(state, data), arrays_only(data), key)

  def donating_round(state: ServerState, data: FederatedData, key: jax.Array):
    return _jitted_round_donating(impl, config, checked(state, data), arrays_only(data), key)

  round_fn.__name__ = f"{name}_round"
  round_fn.__doc__ = (f"One {name} round: (state, FederatedData, key) -> (state, metrics);"
                      " one jit-compiled call.")
  donating_round.__name__ = f"{name}_round_donating"
  donating_round.__doc__ = (f"{round_fn.__doc__} The state's buffers are donated to the"
                            " new state: the state passed in is deleted.")
  round_fn.donating = donating_round
  return round_fn


def make_algorithm(name: str, impl: Callable, config: Any, loss_fn, init: Callable,
                   personalize: Callable | None = None,
                   expose_config: bool = False) -> FederatedAlgorithm:
  """Bundles init, the checked jit round and the pure round of `impl`
  (`expose_config`: keep `config` as `algo.config`, for synchronous kit rounds
  whose halves `fedjax_med.deploy` can run apart)."""

  def pure_round(state: ServerState, data: FederatedData, key: jax.Array):
    return impl(config, state, arrays_only(data), key)

  return FederatedAlgorithm(init=init, round=make_round(name, impl, config, loss_fn),
                            name=name, pure_round=pure_round, personalize=personalize,
                            config=config if expose_config else None)


def new_server_state(params: Any, server_optimizer: optax.GradientTransformation,
                     client_hparams: dict, hparams: dict, client_states: Any = (),
                     aggregator_state: Any = (), algorithm_state: Any = ()) -> ServerState:
  """The ServerState of round 0: `params` as arrays, the server optimizer's initial
  state, the hyperparameters as float32 arrays (`canonical_hparams`, traced), and the
  given client, aggregator and algorithm states."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return ServerState(
      params=params,
      server_opt_state=server_optimizer.init(params),
      client_hparams=canonical_hparams(client_hparams),
      hparams=canonical_hparams(hparams),
      client_states=client_states,
      aggregator_state=aggregator_state,
      round=jnp.zeros((), jnp.int32),
      algorithm_state=algorithm_state)


def stack_sites(tree: Any, num_sites: int) -> Any:
  """`num_sites` copies of every leaf on a new leading K axis."""
  return jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(jnp.asarray(a), (num_sites,) + jnp.shape(a)), tree)


def check_num_sites(name: str, client_states: Any, num_sites: int) -> None:
  """Trace-time check that per-site state matches the data's K."""
  leaves = jax.tree_util.tree_leaves(client_states)
  if leaves and leaves[0].shape[0] != num_sites:
    raise ValueError(f"{name}: state was built for {leaves[0].shape[0]} sites but data"
                     f" has {num_sites}; call init(params, num_sites={num_sites})")



def with_data_check(algo: FederatedAlgorithm, check: Callable[[FederatedData], None],
                    name: str | None = None) -> FederatedAlgorithm:
  """`algo` whose `round` and `pure_round` first call `check(data)` (host-side, on
  static shapes: it raises for data the algorithm was not built for)."""

  def round_fn(state, data, key):
    check(data)
    return algo.round(state, data, key)

  def pure_round(state, data, key):
    check(data)
    return algo.pure_round(state, data, key)

  return algo._replace(round=round_fn, pure_round=pure_round, name=name or algo.name)

__all__ = ["FederatedAlgorithm", "SERVER_STREAM", "server_key", "apply_server_optimizer",
           "check_round_inputs", "make_round", "make_algorithm", "new_server_state",
           "stack_sites", "check_num_sites", "with_data_check"]
