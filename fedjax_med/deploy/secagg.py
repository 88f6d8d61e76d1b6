"""Flower's SecAgg+ for a deployed round whose aggregation is a weighted sum.

With `server_app(task, secure_aggregation=SecAggPlus())` and
`client_app(task, secure_aggregation=True)`, every round's exchange is Flower's
SecAgg+ protocol (Bell et al., CCS 2020; `flwr.server.workflow.SecAggPlusWorkflow`
and `flwr.client.mod.secaggplus_mod`): each node quantises its update
`u_k` (clipped to `[-clipping_range, clipping_range]`, `quantization_range`
levels), multiplies it by its quantised weight `w_k` (n_k, or 1 per site),
adds pairwise masks that cancel in the sum and a private mask whose seed is
secret-shared among its neighbours, and sends only that. The server learns

    sum_k w_k u_k / sum_k w_k        (the weighted mean, dequantised)

and NOT any single u_k, as long as fewer than `reconstruction_threshold`
nodes collude with it; a node that drops out after sending its keys is
unmasked from its neighbours' shares. What the server still sees in clear:
each node's weight w_k (n_k), and the per-client scalars the algorithm's
server update reads (`values`: local steps, training loss, Ditto's personal
loss), sent as Flower metrics. Without SecAgg+ the server sees every u_k.

Which algorithms: those whose aggregation is the kit's plain weighted mean
with integer weights (weighting "num_examples" or "uniform") and whose server
update reads only scalar per-client values: FedAvg, FedProx, FedAdam / Yogi /
Adagrad, Ditto, fine-tuning. Refused (with the reason): robust or DP
aggregators (they need each update: clip, sort, add noise per update),
SCAFFOLD (its server reads each node's control-variate change dc_k), q-FFL
(weights computed from values).

Numbers: the aggregate differs from the plain mean by the quantisation, about
`clipping_range / quantization_range` per coordinate and relative error of
`1 / quantization_range` on each weight (`max_weight` = the largest n_k); a
coordinate of an update outside the clipping range would be clipped silently
by the protocol, so the node refuses to send it (the round proceeds without
it, logged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.deploy.server import DeploymentError

NAMES_KEY = "fedjax_med.arrays"


@dataclasses.dataclass(frozen=True)
class SecAggPlus:
  """Options of Flower's `SecAggPlusWorkflow` (its defaults, `max_weight` set per round
  to the largest weight sent)."""
  num_shares: float | int = 1.0
  reconstruction_threshold: float | int = 0.66
  clipping_range: float = 8.0
  quantization_range: int = 4194304
  modulus_range: int = 4294967296


def check_secure_aggregation(config, value_template) -> None:
  """Raises a ValueError naming why an algorithm cannot run under SecAgg+."""
  name = config.name
  if config.aggregator is not agg.weighted_mean():
    raise ValueError(f"{name}: secure aggregation sums masked updates, so its aggregator"
                     " must be the plain weighted mean (robust and DP aggregators need each"
                     " site's update)")
  if config.client_weights is not None:
    raise ValueError(f"{name}: secure aggregation needs weights known before the clients"
                     " run (n_k or 1), not weights computed from their values")
  if config.cohort.weighting not in ("num_examples", "uniform"):
    raise ValueError(f"{name}: secure aggregation needs integer weights, got weighting"
                     f" {config.cohort.weighting!r}")
  vectors = [name for name, v in _named_values(value_template) if np.size(v) != 1]
  if vectors and config.server_update is not kit.apply_server_update:
    raise ValueError(f"{name}: its server update reads per-client arrays {vectors[:3]}"
                     " (SCAFFOLD: the control-variate changes dc_k); under secure aggregation"
                     " the server only learns the weighted sum of the updates")


def _named_values(values_template) -> list[tuple[str, Any]]:
  """(readable path, leaf) of every per-client value, e.g. ("['delta_control']['bias']", ...)."""
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(values_template)[0]]


class _PlannedFit:
  """A Flower `Strategy` for the SecAgg+ workflow: its `configure_fit` hands out the
  round fedjax_med planned, its `aggregate_fit` keeps what the protocol returns."""

  def __new__(cls, *args, **kwargs):
    from flwr.server.strategy import Strategy  # pylint: disable=import-outside-toplevel

    class PlannedFit(Strategy):  # pylint: disable=abstract-method

      def __init__(self, requests, grid, run_id):
        super().__init__()
        self.requests = requests
        self.grid = grid
        self.run_id = run_id
        self.aggregate = None
        self.results = {}

      def initialize_parameters(self, client_manager):
        return None

      def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, ndarrays_to_parameters  # pylint: disable=import-outside-toplevel
        from flwr.server.compat.grid_client_proxy import GridClientProxy  # pylint: disable=import-outside-toplevel
        out = []
        for node, (arrays, config) in self.requests.items():
          names = sorted(arrays)
          fit_config = {**config, NAMES_KEY: "|".join(names)}
          out.append((GridClientProxy(node, self.grid, self.run_id),
                      FitIns(ndarrays_to_parameters([np.asarray(arrays[n]) for n in names]),
                             fit_config)))
        return out

      def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays  # pylint: disable=import-outside-toplevel
        for proxy, res in results:
          self.results[proxy.node_id] = (res.num_examples, dict(res.metrics))
        if results:
          self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

      def configure_evaluate(self, server_round, parameters, client_manager):
        return []

      def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

      def evaluate(self, server_round, parameters):
        return None

    return PlannedFit(*args, **kwargs)


def secure_exchange(grid, context, options: SecAggPlus, requests: dict, round_index: int,
                    max_weight: float, timeout: float | None):
  """Runs one SecAgg+ exchange; returns (the weighted mean as a list of arrays in
  `update/i` order, or None when the protocol halted; `{node: (weight, metrics)}`)."""
  from flwr.app import ArrayRecord, ConfigRecord  # pylint: disable=import-outside-toplevel
  from flwr.server.compat.legacy_context import LegacyContext  # pylint: disable=import-outside-toplevel
  from flwr.server.workflow import SecAggPlusWorkflow  # pylint: disable=import-outside-toplevel
  from flwr.server.workflow.constant import (MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD,  # pylint: disable=import-outside-toplevel
                                             Key)
  strategy = _PlannedFit(requests, grid, context.run_id)
  legacy = LegacyContext(context, strategy=strategy)
  legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
      {Key.CURRENT_ROUND: round_index + 1})
  legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, np.float32)])
  workflow = SecAggPlusWorkflow(
      num_shares=options.num_shares, reconstruction_threshold=options.reconstruction_threshold,
      max_weight=float(max_weight), clipping_range=options.clipping_range,
      quantization_range=options.quantization_range, modulus_range=options.modulus_range,
      timeout=timeout)
  workflow(grid, legacy)
  return strategy.aggregate, strategy.results


def node_secure_reply(reply: dict, config: dict, clipping_range: float):
  """A node's FitRes for the SecAgg+ mod: the update leaves (masked by the mod), its
  integer weight, and its scalar values as metrics. Raises if a coordinate of
  the update lies outside the clipping range (the protocol would clip it)."""
  from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # pylint: disable=import-outside-toplevel
  names = sorted((k for k in reply if k.startswith("update/")),
                 key=lambda k: int(k.split("/")[1]))
  leaves = [np.asarray(reply[k]) for k in names]
  largest = max((float(np.max(np.abs(a))) for a in leaves if a.size), default=0.0)
  if not np.isfinite(largest) or largest > clipping_range:
    raise DeploymentError(
        f"site {config.get('site')}: an update coordinate of size {largest:.4g} lies outside"
        f" SecAgg+'s clipping range {clipping_range}; it would be clipped silently (raise"
        " clipping_range, or lower the learning rate)")
  metrics = {k: float(np.asarray(v).reshape(())) for k, v in reply.items()
             if k.startswith("values/") and np.size(v) == 1}
  return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(leaves),
                int(config["weight"]), metrics)


__all__ = ["SecAggPlus", "check_secure_aggregation", "secure_exchange", "node_secure_reply",
           "NAMES_KEY"]
