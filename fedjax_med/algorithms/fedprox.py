"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, MLSys 2020).

FedAvg whose sites minimise the proximal local objective

    h_k(w) = F_k(w) + (mu / 2) ||w - w_global||^2

so local SGD steps are w <- w - lr (grad F_k(w) + mu (w - w_global)). The
proximal term limits client drift on heterogeneous sites; mu = 0 is FedAvg
bit for bit. mu lives in `state.hparams["mu"]` (change it with
`fm.set_hyperparams(state, mu=...)`, no recompilation). FLamby's FedProx
(`flamby/strategies/fed_prox.py`) is the same method.
"""

from __future__ import annotations

import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1
from fedjax_med.core.options import check_nonnegative_float, reject_unknown


def fedprox_client_update(ctx: kit.ClientContext, params, client_state, data, key):
  """FedAvg's client on the proximal objective F_k(w) + (mu / 2) ||w - w_global||^2."""
  del client_state
  grad_fn = kit.proximal(kit.gradient_fn(ctx), ctx.hparams["mu"], params)
  local = kit.local_training(ctx, params, data, key, grad_fn=grad_fn)
  return kit.ClientResult(kit.pseudo_gradient(params, local.params),
                          values={"num_steps": local.num_steps, "mean_loss": local.mean_loss})


def fedprox(loss_fn, *, mu: float, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation = SGD_LR_1,
            local_epochs: int | None = None, local_steps: int | None = None,
            batch_size: int = 32, weighting: str = "num_examples",
            aggregator: agg.Aggregator | None = None, shuffle: bool = True,
            cohort_size: int | None = None, sampling: str = "uniform",
            gradient_estimator=None, downlink=None, client_chunk_size=None,
            **unknown_options) -> FederatedAlgorithm:
  """Builds FedProx; arguments as `fedavg`, plus `mu >= 0`, the proximal weight."""
  reject_unknown("fedprox", unknown_options, COMMON_OPTIONS + ("mu",))
  mu = check_nonnegative_float("fedprox", "mu", mu)
  return kit.build_algorithm(
      "fedprox", loss_fn, client_update=fedprox_client_update, hparams={"mu": mu},
      client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size)


__all__ = ["fedprox", "fedprox_client_update"]
