"""An in-process transport: every node is a `SiteWorker` in this process.

For tests and for checking an app before deploying it: messages are the same
`(arrays, config)` dicts the Flower transport sends (copied, so nothing is
shared by reference), each node keeps its client state in its own store, and
faults can be injected: `offline={(round, site), ...}` drops a node's reply
(as if it died mid-round), `corrupt={(round, site): fn}` replaces the reply's
arrays by `fn(arrays)` (e.g. NaN, a wrong shape).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedjax_med.deploy.node import SiteWorker
from fedjax_med.deploy.server import Reply
from fedjax_med.deploy.task import DeployTask


def _copy(arrays: dict) -> dict:
  return {k: np.array(v, copy=True) for k, v in arrays.items()}


class InProcessTransport:
  """Nodes `0..K-1` (node id = site index), each a `SiteWorker` on `task.load_site(k)`."""

  def __init__(self, task: DeployTask, *, offline: set | None = None,
               corrupt: dict[tuple[int, int], Callable[[dict], dict]] | None = None):
    params = task.init_params()
    self.workers = {k: SiteWorker(task.algorithm, params, task.load_site(k), k)
                    for k in range(task.num_sites)}
    self.stores: dict[Any, dict | None] = {k: None for k in self.workers}
    self.offline = set(offline or ())
    self.corrupt = dict(corrupt or {})

  def census(self) -> dict:
    return {node: worker.census() for node, worker in self.workers.items()}

  def train(self, requests: dict, timeout: float | None) -> dict:
    del timeout
    replies = {}
    for node, (arrays, config) in requests.items():
      worker = self.workers[node]
      key = (int(config["round"]), worker.site)
      if key in self.offline:
        continue
      reply, reply_config, stored = worker.train(_copy(arrays), dict(config), self.stores[node])
      self.stores[node] = stored
      if key in self.corrupt:
        reply = self.corrupt[key](reply)
      replies[node] = Reply(_copy(reply), reply_config)
    return replies


__all__ = ["InProcessTransport"]
