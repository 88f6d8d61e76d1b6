"""fedjax_med: federated learning across hospitals as pure, jit-compiled JAX.

    import fedjax_med as fm
    train, test = fm.datasets.heart_disease()          # K = 4 real hospitals
    algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05),
                                local_epochs=1, batch_size=4)
    state = algo.init(params)
    state, metrics = algo.round(state, train, key)     # one jit, all sites vmapped

The objective is F(w) = sum_k (n_k / n) F_k(w): `fm.weighted_objective`.
"""

import sys as _sys

# The layers, bottom to top; each package imports only from those above it in
# this list (tests/test_layers.py checks every import statement):
from fedjax_med import core
from fedjax_med import models
from fedjax_med import losses
from fedjax_med import metrics
from fedjax_med import aggregators
from fedjax_med import data
from fedjax_med import privacy
from fedjax_med import algorithms
from fedjax_med import training
from fedjax_med import deploy

from fedjax_med.core import kit
from fedjax_med.core import server_optimizers as optimizers
from fedjax_med.core.aggregation import Aggregator, ClientTransform, client_weights
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.conv import convs_as_matmuls, keep_native_convs
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.local import LocalSchedule, epoch_permutation
from fedjax_med.core.objective import (batch_loss, masked_mean_loss, site_objectives,
                                       site_weights, weighted_objective)
from fedjax_med.core.options import OptionError
from fedjax_med.core.state import ServerState, set_hyperparams
from fedjax_med.data import partition
from fedjax_med.training import (audit, checkpoint, evaluation, evaluation_tasks, report,
                                 sharding)
from fedjax_med.training.loop import run_rounds, run_seeds, stack_states

# Earlier names (version 0.1) of modules that moved into the layer packages.
# `fm.robust`, `import fedjax_med.robust` and `from fedjax_med.robust import x`
# keep working; they are the same module objects, not copies.
datasets = data.datasets
robust = aggregators.robust
compression = aggregators.compression
segmentation = algorithms.segmentation
experiment = training.loop
MOVED_MODULES = {
    "fedjax_med.datasets": "fedjax_med.data.datasets",
    "fedjax_med.robust": "fedjax_med.aggregators.robust",
    "fedjax_med.compression": "fedjax_med.aggregators.compression",
    "fedjax_med.optimizers": "fedjax_med.core.server_optimizers",
    "fedjax_med.segmentation": "fedjax_med.algorithms.segmentation",
    "fedjax_med.experiment": "fedjax_med.training.loop",
    "fedjax_med.checkpoint": "fedjax_med.training.checkpoint",
    "fedjax_med.audit": "fedjax_med.training.audit",
    "fedjax_med.report": "fedjax_med.training.report",
    "fedjax_med.sharding": "fedjax_med.training.sharding",
    "fedjax_med.evaluation": "fedjax_med.training.evaluation",
    "fedjax_med.evaluation_tasks": "fedjax_med.training.evaluation_tasks",
    "fedjax_med.privacy.secure_aggregation": "fedjax_med.aggregators.secure",
    "fedjax_med.privacy.homomorphic": "fedjax_med.aggregators.homomorphic",
}
for _old, _new in MOVED_MODULES.items():
  for _name, _module in list(_sys.modules.items()):
    if _name == _new or _name.startswith(_new + "."):
      _sys.modules.setdefault(_old + _name[len(_new):], _module)
# The DP algorithms moved from privacy/ (a plug-in layer) to algorithms/.
privacy.dp_fedavg = algorithms.dp_fedavg
privacy.dp_sgd_fedavg = algorithms.dp_sgd_fedavg
privacy.site_level.dp_fedavg = algorithms.dp_fedavg
privacy.patient_level.dp_sgd_fedavg = algorithms.dp_sgd_fedavg
del _old, _new, _name, _module

__version__ = "0.2.0"

__all__ = [
    "core", "models", "losses", "metrics", "aggregators", "data", "privacy", "algorithms",
    "training", "deploy",
    "audit", "checkpoint", "compression", "datasets", "evaluation",
    "evaluation_tasks", "optimizers", "partition",
    "kit", "report", "robust", "segmentation", "sharding",
    "aggregators", "Aggregator", "ClientTransform", "client_weights",
    "FederatedAlgorithm", "FederatedData", "convs_as_matmuls", "keep_native_convs",
    "LocalSchedule", "epoch_permutation",
    "batch_loss", "masked_mean_loss", "site_objectives", "site_weights",
    "weighted_objective", "OptionError", "ServerState", "set_hyperparams", "run_rounds",
    "run_seeds", "stack_states",
]
