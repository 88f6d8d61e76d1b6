"""FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

FedAvg's local training and aggregation, with an adaptive server step on the
aggregated pseudo-gradient: Algorithm 2 of the paper, without bias
correction and with tau outside the square root, as in FLamby's
`flamby/strategies/fed_opt.py` (see `fedjax_med.core.server_optimizers`). All server
hyperparameters (learning rate, beta1, beta2, tau) are traced:
`fm.set_hyperparams(state, server={"learning_rate": 0.1})` recompiles nothing.
"""

from __future__ import annotations

import functools

import optax

from fedjax_med.core import server_optimizers as optimizers
from fedjax_med.core import kit
from fedjax_med.core.kit import COMMON_OPTIONS
from fedjax_med.core import aggregation as agg
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import reject_unknown
from fedjax_med.core.state import with_injected_hyperparams

_SERVER_OPTIONS = ("server_learning_rate", "beta1", "beta2", "tau",
                   "initial_accumulator_value")


@functools.lru_cache(maxsize=None)
def _server_transform(adaptivity: str, initial_accumulator_value: float):
  """One injected transform per variant, so separately built algorithms share a compile."""
  factory = {"adam": optimizers.server_adam, "yogi": optimizers.server_yogi,
             "adagrad": optimizers.server_adagrad}[adaptivity]
  return optax.inject_hyperparams(factory, static_args=("initial_accumulator_value",))(
      learning_rate=1.0, beta1=0.9, beta2=0.999, tau=1e-3,
      initial_accumulator_value=initial_accumulator_value)


def _build(name, adaptivity, loss_fn, client_optimizer, server_learning_rate, beta1, beta2,
           tau, initial_accumulator_value, unknown_options, **common):
  reject_unknown(name, unknown_options,
                 tuple(o for o in COMMON_OPTIONS if o != "server_optimizer") + _SERVER_OPTIONS)
  # Validates the values (raises OptionError on a bad beta or tau).
  optimizers.scale_by_fedopt(adaptivity, beta1, beta2, tau, initial_accumulator_value)
  server = _server_transform(adaptivity, float(initial_accumulator_value))
  algo = kit.build_algorithm(name, loss_fn, client_optimizer=client_optimizer,
                             server_optimizer=server, **common)
  values = {"learning_rate": server_learning_rate, "beta1": beta1, "beta2": beta2,
            "tau": tau}

  def init(params, num_sites: int | None = None):
    state = algo.init(params, num_sites)
    return state._replace(server_opt_state=with_injected_hyperparams(
        state.server_opt_state, values))

  return algo._replace(init=init)


def _make(name: str, adaptivity: str):

  def constructor(loss_fn, *, client_optimizer: optax.GradientTransformation,
                  server_learning_rate: float, beta1: float = 0.9, beta2: float = 0.999,
                  tau: float = 1e-3, initial_accumulator_value: float = 0.0,
                  local_epochs: int | None = None, local_steps: int | None = None,
                  batch_size: int = 32, weighting: str = "num_examples",
                  aggregator: agg.Aggregator | None = None, shuffle: bool = True,
                  cohort_size: int | None = None, sampling: str = "uniform",
                  gradient_estimator=None, downlink=None, client_chunk_size=None,
                  **unknown_options) -> FederatedAlgorithm:
    return _build(name, adaptivity, loss_fn, client_optimizer, server_learning_rate, beta1,
                  beta2, tau, initial_accumulator_value, unknown_options,
                  local_epochs=local_epochs, local_steps=local_steps,
                  batch_size=batch_size, weighting=weighting, aggregator=aggregator,
                  shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
                  gradient_estimator=gradient_estimator, downlink=downlink,
                  client_chunk_size=client_chunk_size)

  constructor.__name__ = name
  constructor.__doc__ = f"""Builds {name} (Reddi et al. 2021, Algorithm 2, server {adaptivity}).

  Arguments as `fedavg` (without server_optimizer), plus
    server_learning_rate: eta.
    beta1, beta2, tau: Algorithm 2's decay rates and adaptivity (FLamby's
      benchmark uses 0.9, 0.999, 1e-8; beta2 is unused by FedAdagrad).
    initial_accumulator_value: v_{{-1}} (0 as FLamby; the paper asks >= tau^2).
  """
  return constructor


fedadam = _make("fedadam", "adam")
fedyogi = _make("fedyogi", "yogi")
fedadagrad = _make("fedadagrad", "adagrad")

__all__ = ["fedadam", "fedyogi", "fedadagrad"]
