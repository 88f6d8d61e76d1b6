"""Federated Averaging (McMahan et al., AISTATS 2017, Algorithm 1).

Every round, each participating site k starts from the global model w, runs
local optimizer steps on its own batches (local epochs or local steps), and
reports the pseudo-gradient Delta_k = w - w_k. The server aggregates

    Delta = sum_k p_k Delta_k,   p_k = n_k / n   (weighting="num_examples")
                                 p_k = 1 / K'    (weighting="uniform", K' non-empty sites)

and applies its optax transformation to Delta. With `optax.sgd(1.0)` this is
w <- sum_k p_k w_k, McMahan et al.'s update for the objective
F(w) = sum_k (n_k/n) F_k(w). The "uniform" average of client models is what
the textbook tutorial loop computes; it optimises sum_k F_k(w) / K' instead,
which weights a 30-patient hospital like a 200-patient one.

FedAvg is the round-building kit's defaults (`fedjax_med.core.kit`): the
client `fedavg_client_update` (local training, Delta_k = w - w_k) and the
server `apply_server_update` (the server optimizer on the weighted mean).
The rest of the family changes one piece: FedProx the local objective
(`fedprox.py`), FedNova the client's normalisation and the server's rescaling
(`fednova.py`), FedAdam/FedYogi/FedAdagrad the server optimizer (`fedopt.py`).

All participating sites run under one `jax.vmap` in one `jax.jit`-compiled round.
"""

from __future__ import annotations

import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1, cohort_positions
from fedjax_med.core.objective import GradientEstimator


def fedavg(loss_fn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation = SGD_LR_1,
           local_epochs: int | None = None, local_steps: int | None = None,
           batch_size: int = 32, weighting: str = "num_examples",
           aggregator: agg.Aggregator | None = None, shuffle: bool = True,
           cohort_size: int | None = None, sampling: str = "uniform",
           gradient_estimator: GradientEstimator | None = None, downlink=None,
           client_chunk_size: int | None = None,
           **unknown_options) -> FederatedAlgorithm:
  """Builds FedAvg.

  Args:
    loss_fn: `loss_fn(params, x, y) -> [B]` per-example losses (or a
      `fedjax_med.batch_loss`).
    client_optimizer: optax transformation for the local steps, re-initialised
      every round. Wrap with `optax.inject_hyperparams` to trace its rates.
    server_optimizer: optax transformation applied to the aggregated
      pseudo-gradient (default `optax.sgd(1.0)`: plain averaging).
    local_epochs: local passes over the site's data per round (default 1).
    local_steps: alternatively, a fixed number of local batch updates.
    batch_size: local batch size B.
    weighting: "num_examples" (p_k = n_k/n) or "uniform" (p_k = 1/K').
    aggregator: aggregation chain (default `weighted_mean()`).
    shuffle: reshuffle each site's rows every pass (False: stored order).
    cohort_size: sites per round (None: all); see `fedjax_med.core.cohort`.
    sampling: cohort sampling (see `fedjax_med.core.cohort`): "uniform"
      (default; the cohort's weights renormalised over it, biased for
      sum_k p_k Delta_k when the n_k differ), "uniform_unbiased" (Li et al.
      2020 scheme II, unbiased) or "num_examples" (scheme I, unbiased).
    gradient_estimator: how a client turns a batch into a gradient (default:
      the mean gradient; e.g. a DP-SGD estimator from `fedjax_med.privacy`).
    downlink: optional `downlink(w, key) -> (w_received, metrics)`, what the
      server's broadcast does to the model (e.g. compression); the clients
      train from w_received and their pseudo-gradients are taken against it.
    client_chunk_size: run the participating clients M at a time (a scan of
      vmapped chunks in the same jit) to bound memory; needs the default
      weighted-mean aggregator. None: all at once.

  Returns:
    FederatedAlgorithm with `init(params)` and `round(state, data, key)`.
    Round metrics: train_loss (p-weighted mean of the participants' local
    batch losses), client_train_loss [C], client_steps [C], num_examples [C],
    cohort [C] (site positions), update_norm (norm of the aggregate).
  """
  return kit.build_algorithm(
      "fedavg", loss_fn, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size, **unknown_options)


__all__ = ["fedavg", "COMMON_OPTIONS", "SGD_LR_1", "cohort_positions"]
