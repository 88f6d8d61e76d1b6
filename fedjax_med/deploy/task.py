"""A deployable study: the algorithm, the initial model, and where each node's rows come from.

    task = fm.deploy.DeployTask(
        algorithm=fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), ...),
        init_params=lambda: model.init(jax.random.PRNGKey(0), x0),   # same on every side
        load_site=lambda site: fm.datasets.heart_disease(site=site)[0],   # node side
        num_sites=4, site_names=("cleveland", "hungarian", "switzerland", "va"))

The server and every node build the same task (the Flower app's module is
imported on each); the server never calls `load_site`, a node calls it once,
for its own site. `run_federation(task, transport, ...)` is the server's run:
the census of the nodes, then `fm.run_rounds` over the deployed round, so a
deployed run writes the same history, audit log and checkpoints as a simulated
one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import check_positive_int
from fedjax_med.deploy.node import kit_config
from fedjax_med.deploy.server import (Federation, Transport, deployed_algorithm,
                                      make_federation)


@dataclasses.dataclass(frozen=True)
class DeployTask:
  """What the server and the nodes of one deployment share.

  algorithm: a synchronous kit-built algorithm (FedAvg, FedProx, SCAFFOLD,
    FedAdam/Yogi/Adagrad, Ditto, DP-FedAvg, ... or your own `build_algorithm`).
  init_params: `() -> params`, deterministic (the server's w_0, the nodes'
    template of every message).
  load_site: `site -> (x, y)` or a K = 1 FederatedData: a node's own rows.
  num_sites: K.
  site_names: optional names (records, audit log).
  evaluate: optional server-side `params -> list of record dicts` (e.g. on a
    held-out set the server owns), written to results.json after the run.
  """
  algorithm: FederatedAlgorithm
  init_params: Callable[[], Any]
  load_site: Callable[[int], Any]
  num_sites: int
  site_names: tuple[str, ...] | None = None
  evaluate: Callable[[Any], list] | None = None

  def __post_init__(self):
    kit_config(self.algorithm)
    check_positive_int("DeployTask", "num_sites", self.num_sites)
    if self.site_names is not None and len(self.site_names) != self.num_sites:
      raise ValueError(f"DeployTask: {len(self.site_names)} site_names for"
                       f" num_sites={self.num_sites}")


def initial_state(task: DeployTask):
  """The server's round-0 state: `algorithm.init(init_params(), num_sites=K)`."""
  return task.algorithm.init(task.init_params(), num_sites=task.num_sites)


def run_federation(task: DeployTask, transport: Transport, num_rounds: int,
                   run_key: jax.Array, *, out_dir: str | None = None,
                   timeout: float | None = None, invalid_updates: str = "auto",
                   checkpoint_dir=None, audit=None, progress: bool = False):
  """The server's whole run: census, `num_rounds` deployed rounds, outputs.

  Round r uses key `fold_in(run_key, r)`, as `fm.run_rounds` in simulation.

  Args:
    task: the `DeployTask`.
    transport: how to reach the nodes (`fedjax_med.deploy.flower`, or
      `InProcessTransport` for tests).
    num_rounds: rounds to run.
    run_key: the run's key.
    out_dir: if given, writes `history.json` (every round's metrics),
      `events.json` (failures and rejected updates), `params.npz` (the final
      global model, leaves in `tree_leaves` order) and, with `task.evaluate`,
      `results.json`.
    timeout: seconds to wait for the nodes' replies each round (None: forever).
    invalid_updates, checkpoint_dir, audit: as `DeployedRound` and `fm.run_rounds`.

  Returns:
    (final state, history, federation, events).
  """
  from fedjax_med.training.loop import run_rounds  # pylint: disable=import-outside-toplevel
  federation = make_federation(transport.census(), task.num_sites, task.site_names)
  algo = deployed_algorithm(task.algorithm, transport, timeout=timeout,
                            invalid_updates=invalid_updates)
  state = initial_state(task)
  state, history = run_rounds(algo, state, federation, num_rounds, run_key,
                              progress=progress, checkpoint_dir=checkpoint_dir, audit=audit,
                              donate_state=False)
  events = algo.round.events
  if out_dir is not None:
    write_outputs(out_dir, task, state, history, federation, events)
  return state, history, federation, events


def _jsonable(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def write_outputs(out_dir: str, task: DeployTask, state, history: dict,
                  federation: Federation, events: list) -> None:
  """history.json, events.json, params.npz (and results.json with `task.evaluate`)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "history.json"), "w") as f:
    json.dump({"algorithm": task.algorithm.name, "sites": list(federation.names),
               "num_examples": [n.num_examples for n in federation.nodes],
               "metrics": {k: _jsonable(v) for k, v in history.items()}}, f)
  with open(os.path.join(out_dir, "events.json"), "w") as f:
    json.dump(events, f, indent=1)
  leaves = jax.tree_util.tree_leaves(state.params)
  np.savez(os.path.join(out_dir, "params.npz"),
           **{f"leaf_{i}": np.asarray(a) for i, a in enumerate(leaves)})
  if task.evaluate is not None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(task.evaluate(state.params), f, indent=1)


__all__ = ["DeployTask", "initial_state", "run_federation", "write_outputs"]
