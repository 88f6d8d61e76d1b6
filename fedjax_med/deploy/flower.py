"""Flower apps for a `DeployTask`: the same algorithm on Flower's engines.

    # app.py of a Flower app (pyproject.toml: [tool.flwr.app.components]
    #   serverapp = "app:server", clientapp = "app:client")
    task = fm.deploy.DeployTask(...)
    server = fm.deploy.flower.server_app(task, num_rounds=20)
    client = fm.deploy.flower.client_app(task)

Flower runs `server` in its ServerApp process and `client` on every SuperNode
(one per hospital); the same two objects run on Flower's simulation runtime
(`flwr.simulation.run_simulation`, Ray) and on its deployment engine
(`flower-superlink`, `flower-supernode`, `flwr run`).

What happens (Flower's Message API, `flwr >= 1.42`):

1. census: the ServerApp waits for K nodes, sends each a "query" message and
   gets back its site index, n_k and the shapes of its rows (no rows).
2. every round: `DeployedRound` plans it (downlink, cohort, keys), sends each
   cohort member a "train" message (the model and context as an `ArrayRecord`,
   its key and N_max in a `ConfigRecord`), and aggregates the replies that came
   back within `timeout` seconds.
3. a node runs its site's client update (`SiteWorker`), keeps its client state
   in the SuperNode's `context.state` (it persists between rounds and never
   leaves the node) and replies with the update and the per-client values.

A node finds its site in its node config: `site` (deployment: `flower-supernode
--node-config "site=2"`), else `partition-id` (what Flower's simulation runtime
sets). The node loads its rows with `task.load_site(site)`.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fedjax_med.deploy.node import SiteWorker
from fedjax_med.deploy.server import DeploymentError, Reply
from fedjax_med.deploy.task import DeployTask, run_federation

MIN_FLWR = (1, 42)
STATE_KEY = "fedjax_med.client_state"
SEED_KEY = "fedjax_med.private_seed"


def require_flwr():
  """Imports flwr, or raises an ImportError that says how to install it.

  Flower sends usage telemetry (telemetry.flower.ai) and checks PyPI for updates
  unless told not to; for hospital nodes both are off here unless the
  environment already sets `FLWR_TELEMETRY_ENABLED` / `FLWR_DISABLE_UPDATE_CHECK`
  (it takes effect when flwr is first imported by this function).
  """
  os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
  os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
  try:
    import flwr  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("fedjax_med.deploy.flower needs Flower: pip install"
                      " 'fedjax_med[flower]' (flwr[simulation] >= 1.42)") from e
  version = tuple(int(p) for p in flwr.__version__.split(".")[:2] if p.isdigit())
  if version < MIN_FLWR:
    raise ImportError(f"fedjax_med.deploy.flower needs flwr >= 1.42 (the Message API),"
                      f" found {flwr.__version__}")
  return flwr


def _to_record(arrays: dict):
  from flwr.app import Array, ArrayRecord  # pylint: disable=import-outside-toplevel
  return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _from_record(record) -> dict:
  return {k: np.asarray(v.numpy()) for k, v in record.items()}


def node_site(context) -> int:
  """The site a node holds: node config `site`, else `partition-id`."""
  config = context.node_config
  for key in ("site", "partition-id"):
    if key in config:
      return int(config[key])
  raise DeploymentError("this SuperNode has no site: start it with --node-config"
                        " 'site=<k>' (0-based index of its hospital among the K sites)")


class FlowerTransport:
  """`Transport` over a Flower `Grid` (inside a ServerApp).

  Args:
    grid: the ServerApp's grid.
    num_sites: K, the nodes to wait for.
    wait_seconds: how long to wait for K nodes to connect.
    query_timeout: seconds to wait for the census replies (a node's first reply
      includes its cold start: Python, JAX and the app imported; default 300).
  """

  def __init__(self, grid, num_sites: int, *, wait_seconds: float = 120.0,
               query_timeout: float | None = 300.0, secure=None, context=None):
    self.grid = grid
    self.num_sites = num_sites
    self.wait_seconds = wait_seconds
    self.query_timeout = query_timeout
    self.secure = secure        # a `secagg.SecAggPlus`: rounds run Flower's SecAgg+
    self.context = context      # the ServerApp's context (SecAgg+'s workflow needs it)

  def _nodes(self) -> list:
    deadline = time.monotonic() + self.wait_seconds
    nodes = list(self.grid.get_node_ids())
    while len(nodes) < self.num_sites:
      if time.monotonic() > deadline:
        raise DeploymentError(f"{len(nodes)} of {self.num_sites} nodes connected within"
                              f" {self.wait_seconds} s")
      time.sleep(0.2)
      nodes = list(self.grid.get_node_ids())
    return nodes

  def census(self) -> dict:
    from flwr.app import ConfigRecord, Message, RecordDict  # pylint: disable=import-outside-toplevel
    nodes = self._nodes()
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type="query",
                        dst_node_id=node) for node in nodes]
    replies = list(self.grid.send_and_receive(messages, timeout=self.query_timeout))
    out = {}
    for reply in replies:
      node = reply.metadata.src_node_id
      if reply.has_error():
        raise DeploymentError(f"node {node} failed the census: {reply.error.reason}")
      out[node] = dict(reply.content["census"])
    missing = sorted(set(nodes) - set(out))
    if missing:
      raise DeploymentError(f"nodes {missing} did not answer the census within"
                            f" {self.query_timeout} s")
    return out

  def train(self, requests: dict, timeout: float | None) -> dict:
    from flwr.app import ConfigRecord, Message, RecordDict  # pylint: disable=import-outside-toplevel
    messages = [Message(RecordDict({"arrays": _to_record(arrays),
                                    "config": ConfigRecord(dict(config))}),
                        message_type="train", dst_node_id=node)
                for node, (arrays, config) in requests.items()]
    out = {}
    for reply in self.grid.send_and_receive(messages, timeout=timeout):
      node = reply.metadata.src_node_id
      if reply.has_error():
        out[node] = Reply(error=str(reply.error.reason))
        continue
      try:
        out[node] = Reply(_from_record(reply.content["arrays"]), dict(reply.content["config"]))
      except Exception as e:  # pylint: disable=broad-except
        out[node] = Reply(error=f"unreadable reply: {e}")
    return out


  def train_secure(self, requests: dict, timeout: float | None, round_index: int,
                   max_weight: float):
    """One round's exchange as Flower's SecAgg+ (`fedjax_med.deploy.secagg`)."""
    from fedjax_med.deploy import secagg  # pylint: disable=import-outside-toplevel
    return secagg.secure_exchange(self.grid, self.context, self.secure, requests, round_index,
                                  max_weight, timeout)


def resolve_task(task, run_config) -> DeployTask:
  """`task`, or `task(run_config)` when it is a factory (an app whose run config
  chooses the algorithm: the server and every node build the same task from
  the same run config)."""
  if isinstance(task, DeployTask):
    return task
  if callable(task):
    built = task(dict(run_config))
    if not isinstance(built, DeployTask):
      raise TypeError("fedjax_med.deploy.flower: the task factory must return a DeployTask,"
                      f" got {type(built).__name__}")
    return built
  raise TypeError("fedjax_med.deploy.flower: task must be a DeployTask or a function"
                  f" run_config -> DeployTask, got {type(task).__name__}")


def client_app(task, *, secure_aggregation: bool = False, clipping_range: float = 8.0,
               private_randomness: bool = False):
  """The `flwr.clientapp.ClientApp` of `task` (a `DeployTask`, or a function
  `run_config -> DeployTask`): one site's client update per message.

  secure_aggregation: answer through Flower's `secaggplus_mod` (the server must
    run `server_app(..., secure_aggregation=SecAggPlus(...))` with the same
    `clipping_range`); the node then sends only its masked update.
  private_randomness: the node draws a secret seed (`secrets.randbits`, stored in
    its SuperNode context) and folds it into every client key, so the server
    cannot know its randomness (needed when the node adds DP noise itself,
    e.g. patient-level DP-SGD); the run then no longer reproduces the
    simulator's random draws. Default False: the simulator's keys, exactly.
  """
  require_flwr()
  from flwr.app import ConfigRecord, Message, RecordDict  # pylint: disable=import-outside-toplevel
  from flwr.clientapp import ClientApp  # pylint: disable=import-outside-toplevel

  app = ClientApp()
  workers: dict[tuple, SiteWorker] = {}   # per process (Flower may start one per message)

  def private_seed(context) -> int | None:
    if not private_randomness:
      return None
    from flwr.app import ConfigRecord as Record  # pylint: disable=import-outside-toplevel
    if SEED_KEY not in context.state:
      import secrets  # pylint: disable=import-outside-toplevel
      context.state[SEED_KEY] = Record({"seed": secrets.randbits(31)})
    return int(context.state[SEED_KEY]["seed"])

  def worker(context) -> SiteWorker:
    site = node_site(context)
    key = (site, tuple(sorted((k, str(v)) for k, v in dict(context.run_config).items())))
    if key not in workers:
      t = resolve_task(task, context.run_config)
      workers[key] = SiteWorker(t.algorithm, t.init_params(), t.load_site(site), site)
    workers[key].private_seed = private_seed(context)
    return workers[key]

  @app.query()
  def census(msg: Message, context) -> Message:
    return Message(RecordDict({"census": ConfigRecord(worker(context).census())}),
                   reply_to=msg)

  def run_site(context, arrays, config):
    w = worker(context)
    stored = context.state.get(STATE_KEY)
    stored = _from_record(stored) if stored is not None else None
    reply, reply_config, new_state = w.train(arrays, config, stored)
    if new_state:
      context.state[STATE_KEY] = _to_record(new_state)
    return reply, reply_config

  if not secure_aggregation:
    @app.train()
    def train(msg: Message, context) -> Message:
      reply, config = run_site(context, _from_record(msg.content["arrays"]),
                               dict(msg.content["config"]))
      return Message(RecordDict({"arrays": _to_record(reply), "config": ConfigRecord(config)}),
                     reply_to=msg)
  else:
    from flwr.client.mod import secaggplus_mod  # pylint: disable=import-outside-toplevel
    from flwr.common import parameters_to_ndarrays  # pylint: disable=import-outside-toplevel
    from flwr.compat.common import recorddict_compat as compat  # pylint: disable=import-outside-toplevel
    from fedjax_med.deploy import secagg  # pylint: disable=import-outside-toplevel

    @app.train(mods=[secaggplus_mod])
    def train(msg: Message, context) -> Message:   # called by the mod with the FitIns
      fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
      config = dict(fitins.config)
      names = str(config.pop(secagg.NAMES_KEY)).split("|")
      arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters)))
      reply, _ = run_site(context, arrays, config)
      fitres = secagg.node_secure_reply(reply, config, clipping_range)
      return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

  return app


def server_app(task, *, num_rounds: int = 10, seed: int = 0,
               out_dir: str | None = None, timeout: float | None = None,
               invalid_updates: str = "auto", wait_seconds: float = 120.0,
               checkpoint_dir=None, audit=None, on_done=None, secure_aggregation=None):
  """The `flwr.serverapp.ServerApp` of `task` (a `DeployTask`, or a function
  `run_config -> DeployTask`): the census, then `num_rounds`
  rounds with run key `PRNGKey(seed)` (round r: `fold_in(run_key, r)`, as
  `fm.run_rounds` in simulation).

  The run config (`pyproject.toml` `[tool.flwr.app.config]` or `flwr run
  --run-config`) overrides `num-rounds`, `seed`, `out-dir` and `timeout`
  (seconds; 0 = wait forever). `on_done(state, history, federation, events)`
  is called at the end (e.g. to keep the result in a test).
  `secure_aggregation`: a `fedjax_med.deploy.secagg.SecAggPlus`: every round's
  exchange runs Flower's SecAgg+ (the nodes' `client_app` needs
  `secure_aggregation=True`); for algorithms whose aggregation is a weighted
  sum (`fedjax_med.deploy.secagg` says which and what the server learns).
  """
  require_flwr()
  from flwr.serverapp import ServerApp  # pylint: disable=import-outside-toplevel

  app = ServerApp()

  @app.main()
  def main(grid, context) -> None:
    config = dict(context.run_config)
    rounds = int(config.get("num-rounds", num_rounds))
    run_seed = int(config.get("seed", seed))
    out = config.get("out-dir", out_dir) or None
    wait = config.get("timeout", timeout)
    wait = None if wait in (None, 0, 0.0) else float(wait)
    t = resolve_task(task, context.run_config)
    transport = FlowerTransport(grid, t.num_sites, wait_seconds=wait_seconds,
                                query_timeout=max(wait_seconds, 300.0),
                                secure=secure_aggregation, context=context)
    result = run_federation(t, transport, rounds, jax.random.PRNGKey(run_seed),
                            out_dir=out, timeout=wait, invalid_updates=invalid_updates,
                            checkpoint_dir=checkpoint_dir, audit=audit)
    if on_done is not None:
      on_done(*result)

  return app


__all__ = ["client_app", "server_app", "FlowerTransport", "node_site", "require_flwr",
           "resolve_task", "STATE_KEY"]
