"""From simulation to hospitals: run a kit-built algorithm with one node per site.

The simulator runs K sites as one vmapped array; a deployment runs the same
round cut in two (`fedjax_med.deploy.server`): the server plans the round and
aggregates, each hospital's node runs ONE site's jit-compiled client update on
its own rows and keeps its client state (`fedjax_med.deploy.node`). Messages are
flat named arrays (`fedjax_med.deploy.wire`). Transports:

* `fedjax_med.deploy.flower`: Flower's ServerApp / ClientApp (the `[flower]`
  extra: `pip install 'fedjax_med[flower]'`), for Flower's simulation runtime and
  its deployment engine (SuperLink + one SuperNode per hospital).
* `InProcessTransport`: every node in this process (tests, checking an app).

The core never imports flwr; this package imports it only in `flower`.
Guide: docs/deployment.md.
"""

from fedjax_med.deploy.local import InProcessTransport
from fedjax_med.deploy.node import SiteWorker
from fedjax_med.deploy.server import (DeployedRound, DeploymentError, Federation, NodeInfo,
                                      Reply, SiteCensus, Transport, deployed_algorithm,
                                      make_federation)
from fedjax_med.deploy.task import DeployTask, initial_state, run_federation
from fedjax_med.deploy.wire import MalformedMessage

__all__ = ["DeployTask", "DeployedRound", "DeploymentError", "Federation", "InProcessTransport",
           "MalformedMessage", "NodeInfo", "Reply", "SiteCensus", "SiteWorker", "Transport",
           "deployed_algorithm", "initial_state", "make_federation", "run_federation"]
