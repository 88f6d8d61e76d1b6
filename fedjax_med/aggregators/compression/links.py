"""Compression in a round: the uplink as an aggregation link, the downlink hook.

Uplink (client -> server). `uplink(compressor)` is a `ClientTransform` for
`fm.aggregators.chain(link, fm.aggregators.weighted_mean())`: every
participant's update Delta_k `[C, ...]` is encoded (vmapped over the C
rows; site k uses key `fold_in(link_key, position_k)`), the payload arrays
are what crosses the network, and the server decodes them; the decoded
updates go on down the chain. Per-site compressor state (error-feedback
residuals) lives in the link state with a leading K axis, gathered and
scattered at `context.positions`, so only the participants' residuals
change. A row with weight 0 (an empty site) sends nothing: 0 bytes, its
residual unchanged.

Downlink (server -> clients). `downlink(compressor)` builds the FedAvg
family's hook `downlink(w, key) -> (w_received, metrics)`: the global model
is encoded once and the same payload is broadcast to every participant,
which trains from the decoded model. The hook keeps no state, so the
downlink compressor must be stateless (e.g. `uniform(8)`, `qsgd(8)`).

Bytes (exact: `payload_nbytes` of the encoded arrays), in the round metrics:

    bytes_up                  [C] int32  bytes each participant uploaded this round
    bytes_up_total            int32      sum over participants
    bytes_down                [C] int32  bytes each participant downloaded (the broadcast)
    bytes_down_total          int32
    bytes_reference_per_site  int32      the uncompressed float32 update's bytes

`bytes_down` is computed by the uplink link from the downlink compressor it
is told about (`uplink(c, downlink=d)`; None = the float32 model), so that a
round's metrics hold both directions and their totals; `communication(...)`
builds the matching link and hook together. Per-round counts are int32
(exact up to 2^31 - 1 bytes per round); sum them on the host in int64 for
run totals.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import (Compressor, encoded_nbytes, is_stateful,
                                         payload_nbytes, reference_nbytes, shapes_of)
from fedjax_med.aggregators.compression.base import float32 as float32_compressor
from fedjax_med.core import aggregation as agg
from fedjax_med.core.options import OptionError, check_positive_int

_INT32_MAX = 2**31 - 1


def _check_compressor(name: str, field: str, compressor) -> Compressor:
  if not isinstance(compressor, Compressor):
    raise OptionError(f"{name}: {field} must be a fedjax_med.aggregators.compression Compressor"
                      f" (e.g. qsgd(8), error_feedback(top_k(0.01))), got"
                      f" {type(compressor).__name__}")
  return compressor


def _check_int32(name: str, value: int) -> int:
  if value > _INT32_MAX:
    raise ValueError(f"{name}: {value} bytes in one round overflow the int32 byte counters")
  return value


def payload_metric_name(path) -> str:
  """Metric name of a payload leaf at pytree `path`: "payload" + its key path,
  e.g. "payload['values']" (`uplink(record_payloads=True)`)."""
  return "payload" + jax.tree_util.keystr(path)


def uplink(compressor: Compressor, *, downlink: Compressor | None = None,
           record_payloads: bool = False) -> agg.ClientTransform:
  """A `ClientTransform` that encodes and decodes each participant's update.

  Args:
    compressor: the uplink compressor (stateful ones, e.g. error feedback,
      keep one state per site: `init(template, num_sites)` needs K).
    downlink: the compressor the server's broadcast uses, for the
      `bytes_down` metrics only (None: the float32 model).
    record_payloads: also return every participant's encoded payload in the
      metrics, as `payload[...]` arrays with a leading C axis (for
      `fedjax_med.training.audit`, which hashes them).

  Returns:
    ClientTransform; its apply returns the decoded updates (the same
    weights) and the byte metrics described in the module docstring
    (+ `residual_norm` [C] for stateful compressors: ||e_k|| after the round).
  """
  compressor = _check_compressor("uplink", "compressor", compressor)
  if downlink is not None:
    downlink = _check_compressor("uplink", "downlink", downlink)

  def init(update_template, num_sites=None):
    template = shapes_of(update_template)
    if not is_stateful(compressor, template):
      return ()
    if num_sites is None:
      raise ValueError(
          f"compression.uplink({compressor.name}): keeps one residual per site and needs"
          " the number of sites K; build the state with algo.init(params, num_sites=K)")
    check_positive_int("compression.uplink", "num_sites", num_sites)
    state = compressor.init(template)
    return jax.tree_util.tree_map(
        lambda a: jnp.zeros((num_sites,) + a.shape, a.dtype), state)

  def apply(updates, weights, state, key, context):
    template = jax.tree_util.tree_map(
        lambda u: jax.ShapeDtypeStruct(u.shape[1:], u.dtype), updates)
    num_rows = weights.shape[0]
    stateful = bool(jax.tree_util.tree_leaves(state))
    positions = context.positions
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)
    sent = weights > 0
    if stateful:
      k = jax.tree_util.tree_leaves(state)[0].shape[0]
      if isinstance(context.num_sites, int) and k != context.num_sites:
        raise ValueError(f"compression.uplink: state was built for {k} sites but the round"
                         f" has {context.num_sites}; call init(params, num_sites="
                         f"{context.num_sites})")
      rows = jax.tree_util.tree_map(lambda s: s[positions], state)
    else:
      rows = jnp.zeros((num_rows,), jnp.float32)  # placeholder, unused

    def encode_one(update, row_state, row_key):
      s = row_state if stateful else compressor.init(template)
      return compressor.encode(update, s, row_key)

    payload, new_rows = jax.vmap(encode_one)(updates, rows, keys)
    decoded = jax.vmap(lambda p: compressor.decode(p, template))(payload)
    metrics = {}
    if stateful:
      def keep_unsent(new, old):
        return jnp.where(sent.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      new_rows = jax.tree_util.tree_map(keep_unsent, new_rows, rows)
      state = jax.tree_util.tree_map(lambda s, r: s.at[positions].set(r), state, new_rows)
      metrics["residual_norm"] = jax.vmap(
          lambda r: jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(r)))
      )(new_rows)
    per_site_up = payload_nbytes(payload) // num_rows
    per_site_down = (reference_nbytes(template) if downlink is None
                     else encoded_nbytes(downlink, template))
    _check_int32("compression.uplink", per_site_up * num_rows)
    _check_int32("compression.uplink", per_site_down * num_rows)
    bytes_up = jnp.where(sent, jnp.int32(per_site_up), jnp.int32(0))
    metrics.update({
        "bytes_up": bytes_up,
        "bytes_up_total": jnp.sum(bytes_up, dtype=jnp.int32),
        "bytes_down": jnp.full((num_rows,), per_site_down, jnp.int32),
        "bytes_down_total": jnp.int32(per_site_down * num_rows),
        "bytes_reference_per_site": jnp.int32(reference_nbytes(template)),
    })
    if record_payloads:
      for path, leaf in jax.tree_util.tree_flatten_with_path(payload)[0]:
        metrics[payload_metric_name(path)] = leaf
    return decoded, weights, state, metrics

  return agg.ClientTransform(init, apply, compressor)


def downlink(compressor: Compressor) -> Callable[[Any, jax.Array], tuple[Any, dict]]:
  """The FedAvg-family hook `downlink(w, key) -> (w_received, metrics)`.

  The model is encoded once per round and broadcast; metrics:
  `bytes_down_per_site` (int32, the broadcast payload's bytes).

  Raises:
    OptionError (when called) for a stateful compressor: the hook keeps no state.
  """
  compressor = _check_compressor("downlink", "compressor", compressor)

  def hook(w, key):
    template = shapes_of(w)
    if is_stateful(compressor, template):
      raise OptionError(
          f"compression.downlink: {compressor.name!r} keeps state (error feedback); the"
          " downlink hook is stateless, use an unbiased quantiser such as uniform(8)")
    payload, _ = compressor.encode(w, compressor.init(template), key)
    return compressor.decode(payload, w), {
        "bytes_down_per_site": jnp.int32(payload_nbytes(payload))}

  return hook


class Communication(NamedTuple):
  """A matching uplink link, aggregator and downlink hook.

  aggregator: `chain(link, reducer)`, for `aggregator=`.
  downlink: the hook for `downlink=` (None: exact float32 broadcast).
  link: the uplink `ClientTransform` alone (to chain with clipping, noise, ...).
  """
  aggregator: agg.Aggregator
  downlink: Callable | None
  link: agg.ClientTransform


def communication(uplink_compressor: Compressor | None = None,
                  downlink_compressor: Compressor | None = None, *,
                  reducer: agg.Aggregator | None = None,
                  record_payloads: bool = False) -> Communication:
  """Uplink and downlink compression for a FedAvg-family algorithm.

      comm = fm.compression.communication(fm.compression.qsgd(8))
      algo = fm.algorithms.fedavg(loss_fn, ..., aggregator=comm.aggregator,
                                  downlink=comm.downlink)
      state = algo.init(params, num_sites=K)

  Args:
    uplink_compressor: None = uncompressed float32 (the reference; the round
      equals plain FedAvg bit for bit and reports its bytes).
    downlink_compressor: None = exact float32 broadcast.
    reducer: the chain's last link (default `weighted_mean()`).
    record_payloads: see `uplink`.
  """
  up = uplink_compressor if uplink_compressor is not None else float32_compressor()
  link = uplink(up, downlink=downlink_compressor, record_payloads=record_payloads)
  reducer = reducer if reducer is not None else agg.weighted_mean()
  return Communication(agg.chain(link, reducer),
                       None if downlink_compressor is None else downlink(downlink_compressor),
                       link)


__all__ = ["uplink", "downlink", "communication", "Communication", "payload_metric_name"]
