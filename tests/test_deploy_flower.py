"""fedjax_med.deploy on Flower (flwr >= 1.42, the `[flower]` extra).

* Flower's simulation runtime (`flwr.simulation.run_simulation`, Ray) runs the
  example app's ServerApp / ClientApp with Flower's SecAgg+: FedAvg's global
  parameters equal the simulator's `fm.run_rounds` to the protocol's quantisation.
* Real processes (SuperLink and SuperNodes): tests/test_deploy_flower_processes.py
  (its own file, so that pytest-xdist runs it beside this one) runs SCAFFOLD, whose
  control variates the nodes keep in their contexts between rounds, and compares
  it with the simulator to float32 tolerance. (SCAFFOLD on the Ray runtime was a
  third Flower run checking the same equality; it was dropped to keep the suite
  short: it cost about 100 s of a 2-core CI machine.)
* `FlowerTransport` waits for K nodes and names the shortfall.
"""


import jax
import numpy as np
import pytest

from flower_common import RUN_KEY_SEED, app, simulated  # (sets Flower's env)

flwr = pytest.importorskip("flwr")

import fedjax_med as fm  # noqa: E402
from fedjax_med.deploy import flower as deploy_flower  # noqa: E402


class _Grid:
  """A stand-in for Flower's Grid with too few nodes connected."""

  def __init__(self, nodes):
    self.nodes = nodes

  def get_node_ids(self):
    return list(self.nodes)


def test_flower_transport_waits_for_k_nodes_then_names_the_shortfall():
  transport = deploy_flower.FlowerTransport(_Grid([1, 2]), 4, wait_seconds=0.3)
  with pytest.raises(fm.deploy.DeploymentError, match="2 of 4 nodes connected within 0.3 s"):
    transport.census()


@pytest.mark.slow
def test_secagg_plus_gives_the_weighted_mean_to_quantisation_error():
  """Flower's SecAgg+ on the simulation runtime: FedAvg's global model equals the
  simulator's to the protocol's quantisation (clipping range 8, 2^22 levels:
  3.8e-6 per coordinate and node), while the server only sees masked vectors."""
  from flwr.simulation import run_simulation  # pylint: disable=import-outside-toplevel
  from fedjax_med.deploy import secagg  # pylint: disable=import-outside-toplevel
  results = {}
  make = lambda rc: app.make_task({"algorithm": "fedavg"})
  server = deploy_flower.server_app(make, num_rounds=2, seed=RUN_KEY_SEED,
                                    on_done=lambda *r: results.setdefault("run", r),
                                    secure_aggregation=secagg.SecAggPlus())
  client = deploy_flower.client_app(make, secure_aggregation=True)
  run_simulation(server, client, num_supernodes=4,
                 backend_config={"client_resources": {"num_cpus": 1},
                                 "init_args": {"num_cpus": 2, "include_dashboard": False}})
  state, history, federation, events = results["run"]
  assert events == [] and history["online"].all()
  assert [n.num_examples for n in federation.nodes] == [199, 172, 30, 85]
  got = [np.asarray(a) for a in jax.tree_util.tree_leaves(state.params)]
  diffs = [np.max(np.abs(a - b)) for a, b in zip(got, simulated("fedavg", 2))]
  assert max(diffs) <= 4 * 2 * 2 * 8.0 / 4194304          # rounds x nodes x 2 levels
  assert max(diffs) > 0                                   # it was quantised, not plain


def test_secagg_plus_refuses_what_needs_each_update():
  from fedjax_med.deploy import secagg  # pylint: disable=import-outside-toplevel
  for name, why in (("scaffold", r"per-client arrays .*\['dc'\]"),
                    ("dp_fedavg", "plain weighted mean")):
    task = app.make_task({"algorithm": name})
    state = fm.deploy.initial_state(task)
    train, _ = fm.datasets.heart_disease()
    federation = fm.deploy.make_federation(
        fm.deploy.InProcessTransport(task).census(), 4)
    _, values = fm.deploy.server.client_templates(task.algorithm, state, federation)
    with pytest.raises(ValueError, match=why):
      secagg.check_secure_aggregation(task.algorithm.config, values)
