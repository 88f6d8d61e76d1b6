"""The core: data layout, objective, local training, aggregation, server state."""

from fedjax_med.core.aggregation import (Aggregator, ClientTransform, chain,
                                         client_weights, weighted_mean)
from fedjax_med.core.algorithm import FederatedAlgorithm, SERVER_STREAM
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.local import (LocalSchedule, client_keys, epoch_permutation,
                                   local_training, make_schedule)
from fedjax_med.core.objective import (batch_loss, is_batch_loss, loss_and_grad,
                                       masked_mean_loss, site_objectives, site_weights,
                                       weighted_objective)
from fedjax_med.core.options import OptionError
from fedjax_med.core.state import ServerState, set_hyperparams
