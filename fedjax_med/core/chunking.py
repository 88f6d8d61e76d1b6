"""Running the clients of a round in chunks, to bound memory.

Unchunked, a round vmaps over all C participating clients at once, so every
client's copy of the parameters (and its local activations) is alive at the
same time: C x P floats (10,000 clients x 0.8M parameters = 32 GB). With
`client_chunk_size=M` the C clients run as ceil(C / M) sequential chunks of M
vmapped clients (`lax.scan` over chunks inside the same jit), and the
weighted sum of their updates is accumulated chunk by chunk, so only M copies
are alive at once. Results equal the unchunked round to float tolerance (the
summation order differs).

    map_clients(fn, inputs, weights, chunk_size) -> (sum_k w_k summed_k, stacked)

`fn(*inputs_k) -> (summed_k, stacked_k)`: `summed_k` (e.g. the update
Delta_k) is reduced as sum_k w_k summed_k; `stacked_k` (small per-client
outputs: step counts, losses, client states) is returned with a leading C
axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_med.core import aggregation as agg
from fedjax_med.core.options import OptionError, check_positive_int


def check_chunk_size(name: str, chunk_size: int | None) -> int | None:
  """`client_chunk_size`: None (all clients in one vmap) or an integer >= 1."""
  if chunk_size is None:
    return None
  return check_positive_int(name, "client_chunk_size", chunk_size)


def require_linear_aggregator(name: str, chunk_size: int | None, aggregator: Any,
                              default: Any) -> None:
  """Chunked rounds accumulate a weighted sum, so they need the weighted mean."""
  if chunk_size is not None and aggregator is not None and aggregator is not default:
    raise OptionError(
        f"{name}: client_chunk_size accumulates the weighted mean chunk by chunk and"
        " cannot run an aggregation chain that needs every update at once (median,"
        " clipping with noise, ...); use client_chunk_size=None with this aggregator")


def _weighted(tree: Any, weights: jax.Array) -> Any:
  return jax.tree_util.tree_map(
      lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=(0, 0)), tree)


def map_clients(fn: Callable, inputs: tuple, weights: jax.Array,
                chunk_size: int | None) -> tuple[Any, Any]:
  """Runs `fn` over the leading (client) axis of `inputs`.

  Args:
    fn: `fn(*per_client_inputs) -> (summed, stacked)`.
    inputs: tuple of pytrees with a leading axis C.
    weights: `[C]` coefficients of the sum (already normalised if a mean is
      wanted).
    chunk_size: None (one vmap over all C) or M (scan over chunks of M).

  Returns:
    (sum_k weights[k] * summed_k, stacked outputs with a leading C axis).
  """
  size = weights.shape[0]
  if chunk_size is None or chunk_size >= size:
    summed, stacked = jax.vmap(fn)(*inputs)
    return _weighted(summed, weights), stacked
  num_chunks = -(-size // chunk_size)
  pad = num_chunks * chunk_size - size

  def to_chunks(a, filler):
    a = jnp.concatenate([a, filler(a)]) if pad else a
    return a.reshape((num_chunks, chunk_size) + a.shape[1:])

  # Padding clients repeat client 0 with weight 0: real work, no contribution.
  chunked_inputs = jax.tree_util.tree_map(
      lambda a: to_chunks(a, lambda b: jnp.repeat(b[:1], pad, axis=0)), inputs)
  chunked_weights = to_chunks(weights, lambda b: jnp.zeros((pad,), b.dtype))
  first = jax.tree_util.tree_map(lambda a: a[0], chunked_inputs)
  summed_shape, _ = jax.eval_shape(jax.vmap(fn), *first)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype), summed_shape)

  def body(total, chunk):
    chunk_inputs, chunk_weights = chunk
    summed, stacked = jax.vmap(fn)(*chunk_inputs)
    total = jax.tree_util.tree_map(jnp.add, total, _weighted(summed, chunk_weights))
    return total, stacked

  total, stacked = jax.lax.scan(body, zeros, (chunked_inputs, chunked_weights))
  stacked = jax.tree_util.tree_map(
      lambda a: a.reshape((num_chunks * chunk_size,) + a.shape[2:])[:size], stacked)
  return total, stacked


def aggregate_clients(client_fn: Callable, inputs: tuple, weights: jax.Array,
                      aggregator: Any, aggregator_state: Any, key: jax.Array,
                      context: Any, chunk_size: int | None):
  """Runs the clients and aggregates their updates, chunked or not.

  `client_fn(*inputs_k) -> (update_k, aux_k)`. Unchunked: one vmap, then the
  aggregation chain on the stacked updates. Chunked: the weighted mean
  sum_k (w_k / sum w) update_k accumulated chunk by chunk (the default
  aggregator's result; `require_linear_aggregator` guards the choice).

  The aggregate is multiplied by `context.update_scale` (the unbiased uniform
  cohort scheme's K/C correction; 1 otherwise).

  Returns:
    (update, aux with a leading C axis, aggregator_state, aggregator metrics)
  """
  if chunk_size is None:
    updates, aux = jax.vmap(client_fn)(*inputs)
    update, aggregator_state, metrics = aggregator.aggregate(
        updates, weights, aggregator_state, key, context)
  else:
    update, aux = map_clients(client_fn, inputs, agg.normalized(weights), chunk_size)
    metrics = {}
  return scaled_aggregate(update, context), aux, aggregator_state, metrics


def scaled_aggregate(update: Any, context: Any) -> Any:
  """The aggregate times the cohort scheme's `context.update_scale` (1 by default)."""
  scale = getattr(context, "update_scale", 1.0)
  if isinstance(scale, (int, float)) and scale == 1.0:
    return update
  return jax.tree_util.tree_map(lambda u: u * jnp.asarray(scale, u.dtype), update)


def map_sites(fn: Callable, inputs: tuple, chunk_size: int | None) -> Any:
  """`jax.vmap(fn)(*inputs)`, optionally in chunks of `chunk_size` sites."""
  size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
  _, stacked = map_clients(lambda *a: ((), fn(*a)), inputs, jnp.zeros((size,)), chunk_size)
  return stacked


__all__ = ["check_chunk_size", "require_linear_aggregator", "map_clients",
           "aggregate_clients", "scaled_aggregate", "map_sites"]
