"""Server-side aggregation as (init, aggregate) pairs, chainable like optax.

An `Aggregator` turns the C stacked client updates of a round's cohort into
one update:

    aggregate(updates [C, ...], weights [C], state, key, context) -> (update [...], state, metrics)

`weights` are the raw, unnormalised client weights (n_k, or 1 per non-empty
site for uniform weighting; 0 for a site that must not count). `context`
says which sites the C rows are (`AggregationContext`), so links can keep
per-site state (error-feedback residuals, ...) with a leading K axis. Links that act
on each client's update before the reduction (clipping, noise, quantisation,
rejection of non-finite updates, ...) are `ClientTransform`s, and
`chain(link_1, ..., link_m, reducer)` composes them into one `Aggregator`,
the way `optax.chain` composes gradient transformations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_med.core.options import check_choice

WEIGHTINGS = ("num_examples", "uniform")


class AggregationContext(NamedTuple):
  """Which sites a round's C updates come from.

  positions: `[C]` int32, each update's site position among the K sites.
  num_sites: K (static).
  num_examples: `[C]` int32, n_k of each update's site.
  update_scale: float32 scalar s by which the round multiplies the aggregate
    (1 except for the unbiased uniform cohort scheme, `fedjax_med.core.cohort`):
    the reduction's normalised mean times s is the scheme's estimate.
  """
  positions: jax.Array
  num_sites: int
  num_examples: jax.Array
  update_scale: Any = 1.0


def full_context(num_examples: jax.Array) -> AggregationContext:
  """Context of a round in which all K sites take part, in order."""
  k = num_examples.shape[0]
  return AggregationContext(jnp.arange(k, dtype=jnp.int32), k,
                            num_examples.astype(jnp.int32))


class Aggregator(NamedTuple):
  """(init, aggregate) pair.

  init(update_template, num_sites=None) -> state, where update_template is
    one client's (unstacked) update pytree and num_sites is K when the
    algorithm knows it (links keeping per-site state need it and should raise
    a clear error when it is None).
  aggregate(updates, weights, state, key, context) -> (update, state, metrics):
    updates has a leading C axis on every leaf; weights is `[C]` float32;
    context an `AggregationContext`.
  links: for a `chain`, its links (transforms, then the reducer), so that a
    deployment can run a link on the nodes and the rest on the server
    (`run_chain_from`); () otherwise.
  """
  init: Callable[..., Any]
  aggregate: Callable[[Any, jax.Array, Any, jax.Array, AggregationContext],
                      tuple[Any, Any, dict]]
  links: tuple = ()


class ClientTransform(NamedTuple):
  """A link of the chain acting on the stacked client updates.

  init(update_template, num_sites=None) -> state
  apply(updates, weights, state, key, context) -> (updates, weights, state, metrics)
  compressor: for an uplink codec (`fm.aggregators.compression.uplink`), its
    `Compressor`: row k is encoded with key fold_in(link_key, position_k) and
    decoded, so a deployment can encode on the node and decode on the server
    (only the payload crosses the network); None for other links.
  """
  init: Callable[..., Any]
  apply: Callable[[Any, jax.Array, Any, jax.Array, AggregationContext],
                  tuple[Any, jax.Array, Any, dict]]
  compressor: Any = None


def client_weights(num_examples: jax.Array, weighting: str) -> jax.Array:
  """Raw aggregation weights `[K]` from n_k.

  * "num_examples": w_k = n_k, the weights of the objective sum_k (n_k/n) F_k
    (McMahan et al. 2017).
  * "uniform": w_k = 1 for every non-empty site, a plain average of client
    models (what the textbook tutorial loop computes). It optimises
    sum_k (1/K') F_k instead, which differs from F(w) when the n_k differ.

  A site with n_k = 0 has weight 0 under both.
  """
  check_choice("client_weights", "weighting", weighting, WEIGHTINGS)
  n = num_examples.astype(jnp.float32)
  if weighting == "num_examples":
    return n
  return (n > 0).astype(jnp.float32)


def normalized(weights: jax.Array) -> jax.Array:
  """weights / sum(weights); all zeros when the sum is zero."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_sum(updates: Any, coefficients: jax.Array) -> Any:
  """sum_k c_k u_k over the leading axis of every leaf."""
  return jax.tree_util.tree_map(
      lambda u: jnp.tensordot(coefficients.astype(u.dtype), u, axes=(0, 0)), updates)


@functools.cache
def weighted_mean() -> Aggregator:
  """sum_k w_k u_k / sum_k w_k (zero when no site has weight).

  Cached: every call returns the same object, so algorithms built separately
  with the default aggregator share one compiled round.
  """

  def init(update_template, num_sites=None):
    del update_template, num_sites
    return ()

  def aggregate(updates, weights, state, key, context):
    del key, context
    return weighted_sum(updates, normalized(weights)), state, {}

  return Aggregator(init, aggregate)


def chain(*links: Any) -> Aggregator:
  """`chain(t_1, ..., t_m, reducer)`: client transforms, then one reduction.

  Every link but the last is a `ClientTransform`; the last is an
  `Aggregator`. Each link gets its own key (split from the round's
  aggregation key) and its own state; metrics are merged, prefixed by the
  link's position when names collide.
  """
  if not links:
    raise ValueError("chain: needs at least a reducer (e.g. weighted_mean())")
  *transforms, reducer = links
  for i, t in enumerate(transforms):
    if not isinstance(t, ClientTransform):
      raise ValueError(
          f"chain: link {i} is a {type(t).__name__}; every link before the last"
          " must be a ClientTransform")
  if not isinstance(reducer, Aggregator):
    raise ValueError(
        f"chain: the last link must be an Aggregator (a reducer), got"
        f" {type(reducer).__name__}")

  def init(update_template, num_sites=None):
    return tuple(t.init(update_template, num_sites) for t in transforms) + (
        reducer.init(update_template, num_sites),)

  def aggregate(updates, weights, state, key, context):
    return _run_links(links, 0, updates, weights, state, key, context)

  return Aggregator(init, aggregate, tuple(links))


def link_keys(key: jax.Array, num_links: int) -> jax.Array:
  """The keys a `chain` of `num_links` links gives its links (one each)."""
  return jax.random.split(key, num_links)


def _run_links(links, start, updates, weights, state, key, context):
  *transforms, reducer = links
  keys = link_keys(key, len(links))
  new_state, metrics = list(state[:start]), {}
  for i, t in enumerate(transforms):
    if i < start:
      continue
    updates, weights, s, m = t.apply(updates, weights, state[i], keys[i], context)
    new_state.append(s)
    _merge(metrics, m, i)
  update, s, m = reducer.aggregate(updates, weights, state[-1], keys[-1], context)
  new_state.append(s)
  _merge(metrics, m, len(transforms))
  return update, tuple(new_state), metrics


def run_chain_from(aggregator: Aggregator, start: int, updates, weights, state, key,
                   context):
  """`aggregator` (a `chain`) with its links before `start` taken as already
  applied to `updates` (e.g. an uplink codec run on the nodes of a deployment):
  the links from `start` on get the keys and states the whole chain gives
  them; the states of the skipped links are returned unchanged."""
  if not aggregator.links:
    raise ValueError("run_chain_from: the aggregator is not a chain")
  return _run_links(aggregator.links, start, updates, weights, state, key, context)


def _merge(metrics: dict, new: dict, position: int) -> None:
  for name, value in new.items():
    metrics[f"{position}/{name}" if name in metrics else name] = value


__all__ = ["Aggregator", "AggregationContext", "ClientTransform", "WEIGHTINGS", "link_keys",
           "run_chain_from",
           "full_context", "client_weights",
           "normalized", "weighted_sum", "weighted_mean", "chain"]
