"""FedNova (Wang, Liu, Liang, Joshi & Poor, NeurIPS 2020).

When sites take different numbers of local steps tau_k (heart-disease sites
hold 30 to 199 rows, so one local epoch is 8 to 50 steps of batch 4), FedAvg's
average sum_k p_k Delta_k is biased towards the objective of the sites that
step most. FedNova averages normalised updates instead:

    d_k = Delta_k / tau_k,     tau_eff = sum_k p_k tau_k,
    Delta = tau_eff * sum_k p_k d_k

(the local solver being plain SGD, so a_k = tau_k in the paper's notation;
with momentum or Adam clients this normalisation is only approximate). With
equal tau_k, FedNova is FedAvg. The server then applies its optax step to Delta.
"""

from __future__ import annotations

import optax

from fedjax_med.algorithms.fedavg import COMMON_OPTIONS, SGD_LR_1, build_fedavg_family
from fedjax_med.core import aggregation as agg
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import reject_unknown


def fednova(loss_fn, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation = SGD_LR_1,
            local_epochs: int | None = None, local_steps: int | None = None,
            batch_size: int = 32, weighting: str = "num_examples",
            aggregator: agg.Aggregator | None = None, shuffle: bool = True,
            cohort_size: int | None = None, sampling: str = "uniform",
            gradient_estimator=None, downlink=None, client_chunk_size=None,
            **unknown_options) -> FederatedAlgorithm:
  """Builds FedNova; arguments as `fedavg`. Metrics add `tau_eff`."""
  reject_unknown("fednova", unknown_options, COMMON_OPTIONS)
  return build_fedavg_family(
      "fednova", loss_fn, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size,
      normalized=True)


__all__ = ["fednova"]
