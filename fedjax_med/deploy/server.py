"""The server's side of a deployed run: cohorts, aggregation, server optimizer, state.

The round is the simulator's `kit_round` cut in two at the clients:

    plan = begin_round(config, state, census, key)      # server: downlink, cohort, keys
    for each cohort member k (on ITS node):             # node: fedjax_med.deploy.node
      update_k, values_k = client_step(...)
    state', metrics = finish_round(...)                 # server: weights, aggregator,
                                                        #   server update, metrics

`begin_round` and `finish_round` are the kit's own pieces, jit-compiled here as
in the simulator; the census (n_k and site ids the nodes report) stands in for
the rows the server never sees. So with the same keys and data a deployed run
computes the simulated run's numbers; what differs is only float rounding: the
simulator runs the K client updates as one vmapped program and sums them in one
reduction, a node runs its client update alone (XLA may order a dot product's
sums differently with and without the batch axis).

Failures follow the simulator's availability model
(`fedjax_med.algorithms.with_availability`): a cohort member whose node does
not answer within `timeout` (or answers with an error) is offline for the
round: its n_k counts as 0, its aggregation weight is 0, its client state is
untouched (it stays on its node), and the round proceeds with the others. A
round in which no member answered changes nothing but the round counter (the
kit's rule for a round without data). Every failure is logged, naming the
node and the site.

A reply that does not fit the algorithm (wrong arrays, shapes or dtypes) or
holds NaN / inf is rejected, naming the node: with a robust aggregator (one of,
or a chain containing, `fm.aggregators.robust`'s links) the member is treated
as offline and the run goes on; otherwise the run stops (`invalid_updates="auto"`; "drop" or
"raise" choose explicitly).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import (ClientContext, ClientData, begin_round, client_step,
                                 finish_round, server_context)
from fedjax_med.core.options import check_choice
from fedjax_med.deploy import wire
from fedjax_med.deploy.node import kit_config, node_codec

log = logging.getLogger("fedjax_med.deploy")

INVALID_UPDATES = ("auto", "drop", "raise")


class DeploymentError(RuntimeError):
  """A deployed run cannot go on (the message names the node and the site)."""


class SiteCensus(NamedTuple):
  """What the server knows of the K sites: n_k and ids, `[K]` int32 each (no rows)."""
  num_examples: jax.Array
  site_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class NodeInfo:
  """One node as it reported itself in the census."""
  node: Any                 # the transport's node id
  site: int                 # the site's index among the K sites
  num_examples: int
  x_shape: tuple[int, ...]
  x_dtype: str
  y_shape: tuple[int, ...]
  y_dtype: str


@dataclasses.dataclass
class Federation:
  """The sites of a deployment, as `fm.run_rounds` takes its `data`.

  census: n_k and site ids `[K]`; nodes: `NodeInfo` per site, in site order;
  names: the site names (audit log, records).
  """
  census: SiteCensus
  nodes: tuple[NodeInfo, ...]
  names: tuple[str, ...]

  @property
  def num_sites(self) -> int:
    return len(self.nodes)

  @property
  def max_examples(self) -> int:
    return int(max(1, max(n.num_examples for n in self.nodes)))


def _shape(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in text.split(",") if s)


def make_federation(reports: dict[Any, dict], num_sites: int,
                    site_names: tuple[str, ...] | None = None) -> Federation:
  """The `Federation` from the nodes' census replies `{node: report}`.

  Raises:
    DeploymentError: a site is missing or reported by two nodes, a site index
      is out of range, or two nodes disagree on the shapes of their rows.
  """
  by_site: dict[int, NodeInfo] = {}
  for node, r in reports.items():
    info = NodeInfo(node, int(r["site"]), int(r["num_examples"]), _shape(r["x_shape"]),
                    str(r["x_dtype"]), _shape(r["y_shape"]), str(r["y_dtype"]))
    if not 0 <= info.site < num_sites:
      raise DeploymentError(f"node {node} says it holds site {info.site}, outside 0..{num_sites - 1}")
    if info.site in by_site:
      raise DeploymentError(f"nodes {by_site[info.site].node} and {node} both say they hold"
                            f" site {info.site}")
    by_site[info.site] = info
  missing = sorted(set(range(num_sites)) - set(by_site))
  if missing:
    raise DeploymentError(f"no node holds site(s) {missing} (got {len(by_site)} of"
                          f" {num_sites} sites)")
  nodes = tuple(by_site[k] for k in range(num_sites))
  first = nodes[0]
  for n in nodes[1:]:
    if (n.x_shape, n.x_dtype, n.y_shape, n.y_dtype) != (first.x_shape, first.x_dtype,
                                                        first.y_shape, first.y_dtype):
      raise DeploymentError(
          f"node {n.node} (site {n.site}) holds rows x {n.x_dtype}{list(n.x_shape)}, y"
          f" {n.y_dtype}{list(n.y_shape)}; node {first.node} (site {first.site}) holds x"
          f" {first.x_dtype}{list(first.x_shape)}, y {first.y_dtype}{list(first.y_shape)}")
  census = SiteCensus(jnp.asarray([n.num_examples for n in nodes], jnp.int32),
                      jnp.arange(num_sites, dtype=jnp.int32))
  names = tuple(site_names) if site_names is not None else tuple(
      f"site_{k}" for k in range(num_sites))
  return Federation(census, nodes, names)


class Reply(NamedTuple):
  """A node's answer to a train request (`error` set when it failed)."""
  arrays: dict | None = None
  config: dict | None = None
  error: str | None = None


class Transport(Protocol):
  """How the server reaches the nodes (Flower's grid, or in-process for tests)."""

  def census(self) -> dict[Any, dict]:
    """`{node: census report}` of every node (`SiteWorker.census`)."""

  def train(self, requests: dict[Any, tuple[dict, dict]], timeout: float | None
            ) -> dict[Any, Reply]:
    """Sends `(arrays, config)` to each node, returns the replies that came
    back in time (a missing node id: no reply)."""


@functools.partial(jax.jit, static_argnums=0)
def _begin(config, state, census, key):
  return begin_round(config, state, census, key)


@functools.partial(jax.jit, static_argnums=(0, 8))
def _finish(config, state, plan, population_num_examples, online, updates, values,
            aggregate=None, start_link=0):
  """`kit_round`'s server half on the C members' updates `[C, ...]`; `online [C]`
  bool: which members answered with a valid update (the others count as offline).
  With `aggregate` (secure aggregation: the weighted mean is all the server
  learns), `updates` is None and the aggregator is not run. `start_link` > 0: the
  chain's first links already ran on the nodes (an uplink codec): `updates` are
  the decoded updates and the chain runs from there."""
  cohort = plan.cohort
  online_f = online.astype(jnp.float32)
  cohort_weights = cohort.weights * online_f
  context = cohort.context._replace(
      num_examples=jnp.where(online, cohort.context.num_examples, 0))
  population = population_num_examples.at[plan.positions].set(
      jnp.where(online, population_num_examples[plan.positions], 0))
  plan = plan._replace(cohort=cohort._replace(weights=cohort_weights, context=context))
  if config.client_weights is None:
    weights = cohort_weights
  else:
    weights = config.client_weights(
        server_context(config, state, plan, population, cohort_weights, cohort_weights),
        values).astype(jnp.float32) * online_f
  if aggregate is None and start_link:
    update, aggregator_state, agg_metrics = agg.run_chain_from(
        config.aggregator, start_link, updates, weights, state.aggregator_state,
        plan.server_key, context)
  elif aggregate is None:
    update, aggregator_state, agg_metrics = config.aggregator.aggregate(
        updates, weights, state.aggregator_state, plan.server_key, context)
  else:
    update, aggregator_state, agg_metrics = aggregate, state.aggregator_state, {}
  update = chunking.scaled_aggregate(update, context)
  return finish_round(config, state, plan, population, cohort_weights, weights, update,
                      plan.cohort.client_states, values, aggregator_state, agg_metrics)


@functools.partial(jax.jit, static_argnums=0)
def _decode(compressor, payload, template):
  return compressor.decode(payload, template)


def is_robust(aggregator) -> bool:
  """Whether the aggregator is, or its chain contains, a link of `fm.aggregators.robust`."""
  links = getattr(aggregator, "links", ()) or (aggregator,)
  for link in links:
    fn = getattr(link, "aggregate", None) or getattr(link, "apply", None)
    if getattr(fn, "__module__", "").endswith("aggregators.robust"):
      return True
  return False


def client_templates(algorithm: FederatedAlgorithm, state, federation: Federation):
  """Shapes and dtypes `(update, values)` of one client's reply (`jax.eval_shape`)."""
  config = kit_config(algorithm)
  first = federation.nodes[0]
  n = federation.max_examples
  data = ClientData(jax.ShapeDtypeStruct((n,) + first.x_shape, np.dtype(first.x_dtype)),
                    jax.ShapeDtypeStruct((n,) + first.y_shape, np.dtype(first.y_dtype)),
                    jax.ShapeDtypeStruct((n,), jnp.bool_))
  client_state = jax.tree_util.tree_map(lambda a: a[0], state.client_states)
  key = jax.random.fold_in(jax.random.PRNGKey(0), 0)

  def one(params, client_state, data, key):
    ctx = ClientContext(config, state.hparams, state.client_hparams, state.algorithm_state,
                        state.round)
    update, (_, values) = client_step(config, ctx, params, client_state, data, key)
    return update, values

  return jax.eval_shape(one, state.params, client_state, data, key)


class DeployedRound:
  """`round(state, federation, key) -> (state, metrics)` over a transport: the
  same contract as `FederatedAlgorithm.round`, so `fm.run_rounds` drives a
  deployed run exactly as a simulated one (history, audit log, checkpoints).

  Round metrics: the simulator's, plus `online` `[C]` (which members answered
  with a valid update), `downlink_bytes` / `uplink_bytes` `[C]` (array payload
  per member; 0 under SecAgg+, whose messages Flower's workflow sends),
  `server_seconds` and `client_seconds` (wall time of the server's two halves,
  and of the exchange with the nodes).

  invalid_updates: "auto" (default) drops a rejected update and goes on when the
  aggregator is or contains a robust link (`fm.aggregators.robust`: median,
  trimmed mean, norm bound, non-finite rejection), and stops the run otherwise;
  "drop" / "raise" choose explicitly.
  """

  def __init__(self, algorithm: FederatedAlgorithm, transport: Transport, *,
               timeout: float | None = None, invalid_updates: str = "auto"):
    self.config = kit_config(algorithm)
    self.algorithm = algorithm
    self.transport = transport
    self.timeout = timeout
    check_choice("fedjax_med.deploy", "invalid_updates", invalid_updates, INVALID_UPDATES)
    if invalid_updates == "auto":
      invalid_updates = "drop" if is_robust(self.config.aggregator) else "raise"
    self.invalid_updates = invalid_updates
    self._templates = None
    self.codec = node_codec(self.config)
    self.events: list[dict] = []    # failures and rejections, in order

  def _event(self, kind: str, round_index: int, node, site: int, why: str) -> None:
    self.events.append({"round": round_index, "event": kind, "node": str(node), "site": site,
                        "why": why})
    log.warning("round %d: %s node %s (site %d): %s", round_index, kind, node, site, why)

  def __call__(self, state, federation: Federation, key):
    t0 = time.perf_counter()
    if self._templates is None:
      self._templates = client_templates(self.algorithm, state, federation)
    update_t, values_t = self._templates
    secure = getattr(self.transport, "secure", None) is not None
    codec = None if secure else self.codec
    if codec is not None and not hasattr(self, "_payload_t"):
      self._payload_t = jax.eval_shape(
          lambda u, k: codec.encode(u, codec.init(u), k)[0], update_t,
          jax.random.PRNGKey(0))
    plan = _begin(self.config, state, federation.census, key)
    round_index = int(state.round)
    positions = np.asarray(plan.positions)
    keys = np.asarray(jax.random.key_data(plan.keys) if wire.is_typed_key(plan.keys)
                      else plan.keys)
    shared = {**wire.flatten("params", plan.params), **wire.flatten("hparams", state.hparams),
              **wire.flatten("client_hparams", state.client_hparams),
              **wire.flatten("algorithm_state", state.algorithm_state),
              **wire.flatten("round", state.round)}
    requests, member_of = {}, {}
    if codec is not None:
      uplink_keys = np.asarray(_uplink_keys(self.config, plan))
    for c, pos in enumerate(positions):
      node = federation.nodes[int(pos)].node
      if node in member_of:      # sampled twice (sampling with replacement): one request
        member_of[node].append(c)
        continue
      member_of[node] = [c]
      requests[node] = ({**shared, "key/0": keys[c]},
                        {"pad_to": federation.max_examples, "round": round_index,
                         "site": int(pos), "typed_key": int(wire.is_typed_key(plan.keys))})
      if codec is not None:
        requests[node][0]["uplink_key/0"] = uplink_keys[c]
        requests[node][1]["uplink"] = 1
    if secure:
      return self._secure_round(state, federation, plan, requests, member_of, positions,
                                update_t, values_t, round_index, t0)
    t1 = time.perf_counter()
    replies = self.transport.train(requests, self.timeout)
    t2 = time.perf_counter()

    num = len(positions)
    online = np.zeros(num, bool)
    update_leaves = [np.zeros((num,) + u.shape, u.dtype)
                     for u in jax.tree_util.tree_leaves(update_t)]
    value_leaves = [np.zeros((num,) + v.shape, v.dtype)
                    for v in jax.tree_util.tree_leaves(values_t)]
    down = np.zeros(num, np.int64)
    up = np.zeros(num, np.int64)
    for node, members in member_of.items():
      site = int(positions[members[0]])
      down[members] = wire.payload_nbytes(requests[node][0])
      reply = replies.get(node)
      if reply is None:
        self._event("offline", round_index, node, site, f"no reply within {self.timeout} s")
        continue
      if reply.error is not None:
        self._event("offline", round_index, node, site, f"replied with an error: {reply.error}")
        continue
      sender = f"node {node} (site {site})"
      try:
        if codec is not None:
          payload = wire.unflatten("payload", reply.arrays, self._payload_t, sender=sender)
          update = _decode(codec, payload, update_t)
          if wire.nonfinite_names(wire.flatten("update", update)):
            raise wire.MalformedMessage(f"{sender} sent a payload that decodes to non-finite"
                                        " values")
        else:
          update = wire.unflatten("update", reply.arrays, update_t, sender=sender)
        values = wire.unflatten("values", reply.arrays, values_t, sender=sender)
        bad = wire.nonfinite_names({k: v for k, v in reply.arrays.items()
                               if k.startswith(("update/", "values/", "payload/"))})
        if bad:
          raise wire.MalformedMessage(f"{sender} sent non-finite values in {bad[:4]}")
      except wire.MalformedMessage as e:
        self._event("rejected", round_index, node, site, str(e))
        if self.invalid_updates == "raise":
          raise DeploymentError(
              f"round {round_index}: rejected the update of {sender}: {e}. With the plain"
              " weighted mean one bad update would corrupt the model; configure a robust"
              " aggregator (or invalid_updates='drop') to go on without it") from e
        continue
      up[members] = wire.payload_nbytes(reply.arrays)
      online[members] = True
      for leaves, tree in ((update_leaves, update), (value_leaves, values)):
        for out, leaf in zip(leaves, jax.tree_util.tree_leaves(tree)):
          out[members] = np.asarray(leaf)
    updates = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(update_t),
                                           update_leaves)
    values = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(values_t),
                                          value_leaves)
    new_state, metrics = _finish(self.config, state, plan, federation.census.num_examples,
                                 jnp.asarray(online), updates, values, None,
                                 1 if codec is not None else 0)
    new_state = new_state._replace(client_states=state.client_states)
    t3 = time.perf_counter()
    metrics = {**metrics, "online": online, "downlink_bytes": down, "uplink_bytes": up,
               "server_seconds": np.float64((t1 - t0) + (t3 - t2)),
               "client_seconds": np.float64(t2 - t1)}
    return new_state, metrics


  def _secure_round(self, state, federation, plan, requests, member_of, positions, update_t,
                    values_t, round_index, t0):
    """The round's exchange as Flower's SecAgg+: the server learns the weighted mean
    of the updates and each node's scalar values, not the updates
    (`fedjax_med.deploy.secagg`)."""
    from fedjax_med.deploy import secagg  # pylint: disable=import-outside-toplevel
    if not getattr(self, "_secure_checked", False):
      secagg.check_secure_aggregation(self.config, values_t)
      self._secure_checked = True
    weights = np.asarray(plan.cohort.weights, np.float64)
    for node, members in member_of.items():
      w = weights[members[0]] * len(members)
      if abs(w - round(w)) > 1e-6:
        raise DeploymentError(f"secure aggregation needs integer weights; site"
                              f" {int(positions[members[0]])} has weight {w}")
      requests[node][1]["weight"] = int(round(w))
    active = {node: members for node, members in member_of.items()
              if requests[node][1]["weight"] > 0}
    t1 = time.perf_counter()
    aggregate, results = self.transport.train_secure(
        {node: requests[node] for node in active}, self.timeout, round_index,
        max_weight=max([requests[n][1]["weight"] for n in active], default=1))
    t2 = time.perf_counter()
    num = len(positions)
    online = np.zeros(num, bool)
    value_leaves = [np.zeros((num,) + v.shape, v.dtype)
                    for v in jax.tree_util.tree_leaves(values_t)]
    for node, members in member_of.items():
      site = int(positions[members[0]])
      if node not in results:
        if node in active:
          self._event("offline", round_index, node, site, "no masked update in the SecAgg+"
                      " exchange")
        continue
      _, metrics = results[node]
      online[members] = aggregate is not None
      for i, out in enumerate(value_leaves):
        out[members] = metrics.get(f"values/{i}", 0.0)
    if aggregate is None:
      for node, members in active.items():
        self._event("offline", round_index, node, int(positions[members[0]]),
                    "the SecAgg+ exchange halted (too few nodes for the threshold)")
      update = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype), update_t)
    else:
      leaves = jax.tree_util.tree_leaves(update_t)
      if len(aggregate) != len(leaves):
        raise DeploymentError(f"SecAgg+ returned {len(aggregate)} arrays for {len(leaves)}"
                              " update leaves")
      update = jax.tree_util.tree_unflatten(
          jax.tree_util.tree_structure(update_t),
          [jnp.asarray(np.asarray(a).reshape(t.shape), t.dtype)
           for a, t in zip(aggregate, leaves)])
    values = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(values_t),
                                          value_leaves)
    new_state, metrics = _finish(self.config, state, plan, federation.census.num_examples,
                                 jnp.asarray(online), None, values, update)
    new_state = new_state._replace(client_states=state.client_states)
    t3 = time.perf_counter()
    zeros = np.zeros(num, np.int64)
    metrics = {**metrics, "online": online, "downlink_bytes": zeros, "uplink_bytes": zeros,
               "server_seconds": np.float64((t1 - t0) + (t3 - t2)),
               "client_seconds": np.float64(t2 - t1)}
    return new_state, metrics


def _uplink_keys(config, plan):
  """`[C]` row keys of the chain's first link, fold_in(link_key_0, position_k): what
  the simulator's uplink link uses for row k."""
  key = agg.link_keys(plan.server_key, len(config.aggregator.links))[0]
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, plan.positions)


def deployed_algorithm(algorithm: FederatedAlgorithm, transport: Transport, **options
                       ) -> FederatedAlgorithm:
  """`algorithm` whose `round(state, federation, key)` runs over `transport`
  (options: `DeployedRound`'s); `init` is the algorithm's own."""
  round_fn = DeployedRound(algorithm, transport, **options)
  return FederatedAlgorithm(init=algorithm.init, round=round_fn, name=algorithm.name,
                            config=algorithm.config)


__all__ = ["SiteCensus", "NodeInfo", "Federation", "make_federation", "Reply", "Transport",
           "DeployedRound", "DeploymentError", "deployed_algorithm", "client_templates",
           "INVALID_UPDATES"]
