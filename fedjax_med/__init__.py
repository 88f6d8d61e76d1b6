"""fedjax_med: federated learning across hospitals as pure, jit-compiled JAX.

    import fedjax_med as fm
    train, test = fm.datasets.heart_disease()          # K = 4 real hospitals
    algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05),
                                local_epochs=1, batch_size=4)
    state = algo.init(params)
    state, metrics = algo.round(state, train, key)     # one jit, all sites vmapped

The objective is F(w) = sum_k (n_k / n) F_k(w): `fm.weighted_objective`.
"""

from fedjax_med import algorithms
from fedjax_med import audit
from fedjax_med import checkpoint
from fedjax_med import compression
from fedjax_med.data import partition
from fedjax_med import datasets
from fedjax_med import evaluation
from fedjax_med import evaluation_tasks
from fedjax_med import losses
from fedjax_med import metrics
from fedjax_med import models
from fedjax_med import optimizers
from fedjax_med import privacy
from fedjax_med import report
from fedjax_med import robust
from fedjax_med import segmentation
from fedjax_med import sharding
from fedjax_med.core import aggregation as aggregators
from fedjax_med.core import kit
from fedjax_med.core.aggregation import Aggregator, ClientTransform, client_weights
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.local import LocalSchedule, epoch_permutation
from fedjax_med.core.objective import (batch_loss, masked_mean_loss, site_objectives,
                                       site_weights, weighted_objective)
from fedjax_med.core.options import OptionError
from fedjax_med.core.state import ServerState, set_hyperparams
from fedjax_med.experiment import run_rounds, run_seeds, stack_states

__version__ = "0.1.0"

__all__ = [
    "algorithms", "audit", "checkpoint", "compression", "datasets", "evaluation",
    "evaluation_tasks", "losses", "metrics", "models", "optimizers", "partition", "privacy",
    "kit", "report", "robust", "segmentation", "sharding",
    "aggregators", "Aggregator", "ClientTransform", "client_weights",
    "FederatedAlgorithm", "FederatedData", "LocalSchedule", "epoch_permutation",
    "batch_loss", "masked_mean_loss", "site_objectives", "site_weights",
    "weighted_objective", "OptionError", "ServerState", "set_hyperparams", "run_rounds",
    "run_seeds", "stack_states",
]
