"""FedAvg followed by local fine-tuning (FLamby's FedAvgFineTuning; Ogier du Terrail et al.,
NeurIPS 2022 Datasets and Benchmarks).

Federation trains one global model with FedAvg; afterwards every site
fine-tunes a copy of it for `finetune_steps` local optimizer steps on its own
training data, giving one personal model per site, evaluated on that site's
own test set. `round` is FedAvg's round; `personalize(state, data, key)`
returns the fine-tuned models stacked on a leading K axis (one jit, sites
vmapped).

FLamby's benchmark uses 3 fine-tuning SGD steps at the client learning rate
(TCGA-BRCA: 0.1), continuing each client's batch stream; here each site
starts a fresh shuffled stream from the personalisation key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

from fedjax_med.core import kit
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1
from fedjax_med.core import aggregation as agg
from fedjax_med.core.algorithm import FederatedAlgorithm, arrays_only
from fedjax_med.core.local import LocalSchedule, client_keys, local_training, make_schedule
from fedjax_med.core.objective import loss_and_grad
from fedjax_med.core.options import check_optimizer, check_positive_int, reject_unknown
from fedjax_med.core.state import init_client_optimizer, select_prefixed

# The fine-tuning optimizer's traced hyperparameters are state.hparams["finetune_<name>"].
FINETUNE_PREFIX = "finetune"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  loss_fn: Any
  optimizer: optax.GradientTransformation
  schedule: LocalSchedule


def fedavg_finetune(loss_fn, *, client_optimizer: optax.GradientTransformation,
                    finetune_steps: int = 3,
                    finetune_optimizer: optax.GradientTransformation | None = None,
                    server_optimizer: optax.GradientTransformation = SGD_LR_1,
                    local_epochs: int | None = None, local_steps: int | None = None,
                    batch_size: int = 32, weighting: str = "num_examples",
                    aggregator: agg.Aggregator | None = None, shuffle: bool = True,
                    cohort_size: int | None = None, sampling: str = "uniform",
                    gradient_estimator=None, downlink=None, client_chunk_size=None,
                    **unknown_options) -> FederatedAlgorithm:
  """Builds FedAvg + fine-tuning; arguments as `fedavg`, plus

  Args:
    finetune_steps: local steps of fine-tuning per site after federation.
    finetune_optimizer: optimizer for fine-tuning (default: client_optimizer).
      Its injected hyperparameters are its own, traced in `state.hparams` as
      `finetune_<name>` (e.g. `set_hyperparams(state,
      finetune_learning_rate=0.01)`); `set_hyperparams(client=...)` does not
      change them.
  """
  reject_unknown("fedavg_finetune", unknown_options,
                 COMMON_OPTIONS + ("finetune_steps", "finetune_optimizer"))
  optimizer = check_optimizer("fedavg_finetune", "finetune_optimizer",
                              finetune_optimizer if finetune_optimizer is not None
                              else client_optimizer)
  config = FinetuneConfig(
      loss_fn=loss_fn, optimizer=optimizer,
      schedule=make_schedule("fedavg_finetune", batch_size, None,
                             check_positive_int("fedavg_finetune", "finetune_steps",
                                                finetune_steps), shuffle))
  base = kit.build_algorithm(
      "fedavg_finetune", loss_fn, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size, prefixed_optimizers={FINETUNE_PREFIX: optimizer})

  def personalize(state, data, key):
    """Per-site fine-tuned models `[K, ...]` from the global `state.params`."""
    return _finetune_jit(config, state.params, select_prefixed(FINETUNE_PREFIX, state.hparams),
                         arrays_only(data), key)

  return base._replace(personalize=personalize)


@functools.partial(jax.jit, static_argnums=0)
def _finetune_jit(config: FinetuneConfig, params, finetune_hparams, data, key):
  grad_fn = loss_and_grad(config.loss_fn)

  def site(x_k, y_k, mask_k, key_k):
    opt_state = init_client_optimizer(config.optimizer, params, finetune_hparams)
    return local_training(grad_fn, config.optimizer, config.schedule, params, opt_state,
                          x_k, y_k, mask_k, key_k).params

  return jax.vmap(site)(data.x, data.y, data.mask, client_keys(key, data.site_ids))


__all__ = ["fedavg_finetune"]
