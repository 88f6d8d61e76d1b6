"""`ServerState` and traced hyperparameters.

Hyperparameters that a researcher sweeps (learning rates, FedProx's mu, ...)
live in the state as float32 arrays, never as Python constants closed over by
the compiled round, so changing them never recompiles:

* server optimizer: build it with `optax.inject_hyperparams`, e.g.
  `optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)`; its values live
  in `state.server_opt_state.hyperparams`.
* client optimizer: the same; the client optimizer is re-initialised at the
  start of every round, so its injected values are kept in
  `state.client_hparams` and substituted into each fresh client state.
* algorithm hyperparameters (mu, lambda, ...): `state.hparams`.
* aggregator numbers (DP's clip_norm and noise_multiplier, robust links'
  max_norm, ...): the dict states of the aggregation chain's links, in
  `state.aggregator_state`.

`set_hyperparams(state, client={...}, server={...}, aggregator={...}, mu=...)`
changes any of them and rejects names that are not traced.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.options import OptionError

_INJECTED_TYPES = tuple(
    t for t in (getattr(optax, "InjectHyperparamsState", None),
                getattr(optax, "InjectStatefulHyperparamsState", None)) if t is not None)


class ServerState(NamedTuple):
  """Everything a federated run carries from one round to the next.

  Attributes:
    params: the global model.
    server_opt_state: state of the server optax transformation.
    client_hparams: injected hyperparameters of the client optimizer
      (e.g. {"learning_rate": 0.05}); {} when it has none.
    hparams: the algorithm's traced hyperparameters (e.g. {"mu": 0.01}).
    client_states: per-site state with a leading K axis on every leaf
      (control variates, personal heads, ...), or () when stateless.
    aggregator_state: state of the aggregation chain.
    round: int32 scalar, rounds completed.
    algorithm_state: server-side state of the algorithm itself (e.g.
      SCAFFOLD's server control variate), or ().
  """
  params: Any
  server_opt_state: Any
  client_hparams: dict
  hparams: dict
  client_states: Any
  aggregator_state: Any
  round: jax.Array
  algorithm_state: Any = ()


def _is_injected(node) -> bool:
  return isinstance(node, _INJECTED_TYPES)


def _float32(value):
  return jnp.asarray(value, dtype=jnp.float32)


def injected_hyperparams(opt_state: Any) -> dict:
  """Hyperparameters of every `optax.inject_hyperparams` node in a state."""
  found: dict = {}
  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected):
    if _is_injected(node):
      for name, value in node.hyperparams.items():
        found.setdefault(name, value)
  return found


def with_injected_hyperparams(opt_state: Any, values: Mapping[str, Any]) -> Any:
  """`opt_state` with the injected hyperparameters named in `values` replaced."""
  if not values:
    return opt_state

  def replace(node):
    if not _is_injected(node):
      return node
    hyper = dict(node.hyperparams)
    for name in hyper.keys() & values.keys():
      hyper[name] = jnp.asarray(values[name], dtype=jnp.asarray(hyper[name]).dtype)
    return node._replace(hyperparams=hyper)

  return jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_injected)


def init_client_optimizer(optimizer: optax.GradientTransformation, params: Any,
                          client_hparams: Mapping[str, Any]) -> Any:
  """A fresh client optimizer state carrying the traced `client_hparams`."""
  return with_injected_hyperparams(optimizer.init(params), client_hparams)


def optimizer_hparams(prefix: str, optimizer: optax.GradientTransformation,
                      params: Any) -> dict:
  """A second optimizer's injected hyperparameters, named `{prefix}_{name}`.

  For algorithms with more than one client-side optimizer (Ditto's personal
  step, fine-tuning): each keeps its own traced values in `state.hparams`
  (e.g. `personal_learning_rate`), settable on their own with
  `set_hyperparams(state, personal_learning_rate=...)`, independent of the
  client optimizer's `state.client_hparams`.
  """
  return canonical_hparams({f"{prefix}_{name}": value for name, value in
                            injected_hyperparams(optimizer.init(params)).items()})


def select_prefixed(prefix: str, hparams: Mapping[str, Any]) -> dict:
  """The `{prefix}_{name}` entries of `hparams`, renamed `{name}` (inverse of
  `optimizer_hparams`)."""
  start = prefix + "_"
  return {name[len(start):]: value for name, value in hparams.items()
          if name.startswith(start)}


def canonical_hparams(values: Mapping[str, Any]) -> dict:
  """Float32 arrays (not weak-typed Python floats), so jit sees one signature."""
  return {name: _float32(v) for name, v in values.items()}


def set_aggregator_hparams(state, **values):
  """Returns `state` with named numbers replaced in every aggregator link holding them.

  `state` is a ServerState (its `aggregator_state` is changed) or an
  aggregator state. A link keeps its traced numbers in a dict state (e.g.
  `privacy.clip_updates`: {"clip_norm"}, `privacy.gaussian_sum_mean`:
  {"noise_multiplier", "clip_norm", ...}, `aggregators.robust.norm_bound`:
  {"max_norm"}); the chain's state is the tuple of its links' states. So
  `set_aggregator_hparams(state, noise_multiplier=2.0, clip_norm=0.5)` sets
  sigma in the noise link and C in both the clipping and the noise link. A
  value keeps the dtype of the number it replaces and must have its shape
  (no recompilation).

  Raises:
    OptionError naming any value that no link holds, or of the wrong shape.
  """
  agg_state = state.aggregator_state if isinstance(state, ServerState) else state
  found = set()

  def replace(name, old, new):
    new = jnp.asarray(new, dtype=jnp.asarray(old).dtype)
    if new.shape != jnp.shape(old):
      raise OptionError(f"set_hyperparams: aggregator value {name} has shape"
                        f" {jnp.shape(old)}, got a value of shape {new.shape}")
    return new

  def visit(node):
    if isinstance(node, dict):
      out = dict(node)
      for name, v in values.items():
        if name in out:
          out[name] = replace(name, out[name], v)
          found.add(name)
      return out
    if isinstance(node, (tuple, list)) and not hasattr(node, "_fields"):
      return type(node)(visit(n) for n in node)
    return node

  new = visit(agg_state)
  missing = sorted(set(values) - found)
  if missing:
    raise OptionError(f"set_hyperparams: no link of the aggregation chain holds"
                      f" {missing}")
  if isinstance(state, ServerState):
    return state._replace(aggregator_state=new)
  return new


def set_hyperparams(state: ServerState, *, client: Mapping[str, Any] | None = None,
                    server: Mapping[str, Any] | None = None,
                    aggregator: Mapping[str, Any] | None = None,
                    **algorithm: Any) -> ServerState:
  """Returns `state` with traced hyperparameters changed (no recompilation).

  Args:
    state: a ServerState.
    client: new values for the client optimizer's injected hyperparameters.
    server: new values for the server optimizer's injected hyperparameters.
    aggregator: new values for numbers held by the aggregation chain's links
      (e.g. {"noise_multiplier": 2.0}; see `set_aggregator_hparams`).
    **algorithm: new values for algorithm hyperparameters (e.g. mu=0.1).

  Raises:
    OptionError naming any hyperparameter that is not traced in this state
    (e.g. a learning rate of an optimizer not built with inject_hyperparams).
  """
  client = dict(client or {})
  server = dict(server or {})
  unknown = sorted(set(client) - set(state.client_hparams))
  if unknown:
    raise OptionError(
        f"set_hyperparams: client optimizer has no traced hyperparameter(s)"
        f" {unknown}; traced: {sorted(state.client_hparams)}. Build it with"
        " optax.inject_hyperparams(optax.sgd)(learning_rate=...) to trace them")
  server_known = injected_hyperparams(state.server_opt_state)
  unknown = sorted(set(server) - set(server_known))
  if unknown:
    raise OptionError(
        f"set_hyperparams: server optimizer has no traced hyperparameter(s)"
        f" {unknown}; traced: {sorted(server_known)}. Build it with"
        " optax.inject_hyperparams(optax.sgd)(learning_rate=...) to trace them")
  unknown = sorted(set(algorithm) - set(state.hparams))
  if unknown:
    raise OptionError(
        f"set_hyperparams: unknown algorithm hyperparameter(s) {unknown};"
        f" traced: {sorted(state.hparams)}")
  if aggregator:
    state = set_aggregator_hparams(state, **dict(aggregator))
  return state._replace(
      client_hparams={**state.client_hparams, **canonical_hparams(client)},
      server_opt_state=with_injected_hyperparams(state.server_opt_state, server),
      hparams={**state.hparams, **canonical_hparams(algorithm)})


__all__ = ["ServerState", "injected_hyperparams", "with_injected_hyperparams",
           "init_client_optimizer", "optimizer_hparams", "select_prefixed",
           "canonical_hparams", "set_aggregator_hparams", "set_hyperparams"]
