"""The differentially private algorithms: FedAvg with DP plugged in.

Two algorithms assembled from `fm.algorithms.fedavg` and the privacy plug-ins
(`fedjax_med.privacy`), which know nothing of algorithms:

* `dp_sgd_fedavg`: patient-level DP. Every site's local steps use the
  `privacy.dp_sgd` gradient estimator (Poisson sampling over the whole site,
  per-example clipping, Gaussian noise; Abadi et al., CCS 2016), accounted
  per site by `privacy.PatientLevelAccountant`.
* `dp_fedavg`: site-level DP (McMahan, Ramage, Talwar & Zhang, ICLR 2018).
  The aggregation chain is `privacy.site_level_dp` (optional Poisson site
  sampling, clipping of each site's update, Gaussian noise on the sum over a
  fixed public denominator W), accounted by `privacy.SiteLevelAccountant`.

The mechanisms, their threat models and the accounting are documented in
`fedjax_med/privacy/patient_level.py` and `site_level.py`.
"""

from __future__ import annotations

import optax

from fedjax_med.algorithms.fedavg import SGD_LR_1, fedavg
from fedjax_med.core.algorithm import FederatedAlgorithm, with_data_check
from fedjax_med.core.options import OptionError, check_positive_int
from fedjax_med.privacy import accounting
from fedjax_med.privacy.patient_level import dp_sgd
from fedjax_med.privacy.site_level import site_level_dp


def dp_sgd_fedavg(loss_fn, *, max_examples: int, clip_norm: float, noise_multiplier: float,
                  client_optimizer: optax.GradientTransformation,
                  expected_batch_size: float | None = None,
                  sampling_rate: float | None = None, local_steps: int = 1,
                  server_optimizer: optax.GradientTransformation = SGD_LR_1,
                  weighting: str = "num_examples", aggregator=None,
                  cohort_size: int | None = None, sampling: str = "uniform",
                  downlink=None) -> FederatedAlgorithm:
  """FedAvg whose sites train with patient-level DP-SGD (`dp_sgd`).

  Each round every participating site runs `local_steps` DP-SGD steps; each
  step Poisson-samples the site's rows (batch = the whole padded site,
  `batch_size = max_examples`), so the accountant's event
  PoissonSampled(q_k, Gaussian(sigma)) is exactly what runs.

  Args:
    loss_fn: per-example loss `(params, x, y) -> [B]`.
    max_examples: N_max of the data the algorithm will see (e.g.
      `train.max_examples`); rounds on data with more padded rows raise.
    clip_norm, noise_multiplier, expected_batch_size / sampling_rate: see `dp_sgd`.
    client_optimizer: optax transformation of the local steps (e.g. optax.sgd).
    local_steps: DP-SGD steps per site per round.
    server_optimizer, weighting, aggregator, cohort_size, sampling, downlink:
      as `fm.algorithms.fedavg` (n_k, used for weighting, is treated as public).

  Returns:
    A FederatedAlgorithm (name "dp_sgd_fedavg"); pair it with
    `PatientLevelAccountant(data.num_examples, delta, expected_batch_size=...)`
    as a `run_rounds` callback to get every site's epsilon after every round.
  """
  n_max = check_positive_int("dp_sgd_fedavg", "max_examples", max_examples)
  steps = check_positive_int("dp_sgd_fedavg", "local_steps", local_steps)
  estimator = dp_sgd(clip_norm, noise_multiplier, expected_batch_size=expected_batch_size,
                     sampling_rate=sampling_rate)
  algo = fedavg(loss_fn, client_optimizer=client_optimizer,
                server_optimizer=server_optimizer, local_steps=steps, batch_size=n_max,
                weighting=weighting, aggregator=aggregator, shuffle=False,
                cohort_size=cohort_size, sampling=sampling, gradient_estimator=estimator,
                downlink=downlink)
  return with_batch_check(algo, n_max, "dp_sgd_fedavg")


def with_batch_check(algo: FederatedAlgorithm, n_max: int, name: str) -> FederatedAlgorithm:
  """`algo` whose rounds refuse data padded beyond n_max rows (the DP-SGD batch)."""

  def check(data):
    rows = data.mask.shape[1]
    if rows > n_max:
      raise ValueError(
          f"{name}: data has N_max = {rows} padded rows per site but the algorithm was"
          f" built with max_examples = {n_max}; a DP-SGD step must see the whole site"
          f" (Poisson sampling over all its rows). Rebuild with max_examples >= {rows}")

  return with_data_check(algo, check, name)


def dp_fedavg(loss_fn, *, clip_norm: float, noise_multiplier: float,
              client_optimizer: optax.GradientTransformation, num_sites: int | None = None,
              sampling_rate: float | None = None, cohort_size: int | None = None,
              local_epochs: int | None = None, local_steps: int | None = None,
              batch_size: int = 32, server_optimizer: optax.GradientTransformation = SGD_LR_1,
              pre: tuple = (), gradient_estimator=None, shuffle: bool = True,
              downlink=None) -> FederatedAlgorithm:
  """DP-FedAvg: FedAvg with site-level DP aggregation (`site_level_dp`).

  Exactly one way of choosing participants:
  * every site every round: give `num_sites=K` (W = K);
  * Poisson site sampling: `num_sites=K, sampling_rate=q` (W = q K);
  * fixed-size cohorts: `cohort_size=C` (W = C; account with
    `SiteLevelAccountant(delta, num_sites=K, cohort_size=C)`).
  Accounting: `SiteLevelAccountant`, whose report names the neighbouring
  relation ("replace_one" by default; Poisson sampling needs
  neighboring_relation="add_or_remove_one").

  Args:
    loss_fn, client_optimizer, local_epochs, local_steps, batch_size,
    server_optimizer, shuffle, gradient_estimator, downlink: as `fm.algorithms.fedavg`
      (a `dp_sgd` estimator here gives patient- and site-level DP at once; it
      needs `batch_size >= N_max` of the data, else the round raises).
    clip_norm, noise_multiplier: C and sigma.
    pre: ClientTransforms before clipping (e.g. robust links).
  """
  if cohort_size is None and num_sites is None:
    raise OptionError("dp_fedavg: give num_sites=K (all sites each round or Poisson"
                      " sampling) or cohort_size=C (fixed-size cohorts)")
  if cohort_size is not None and sampling_rate is not None:
    raise OptionError("dp_fedavg: give sampling_rate (Poisson) or cohort_size (fixed"
                      " size), not both")
  if cohort_size is not None:
    expected = float(cohort_size)
  else:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
      raise OptionError(f"dp_fedavg: num_sites must be an integer >= 1, got {num_sites!r}")
    q = 1.0 if sampling_rate is None else accounting.check_rate(
        "dp_fedavg", "sampling_rate", sampling_rate)
    expected = q * num_sites
  aggregator = site_level_dp(clip_norm, noise_multiplier, expected_sites=expected,
                             sampling_rate=sampling_rate, pre=tuple(pre))
  algo = fedavg(loss_fn, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
                weighting="uniform", aggregator=aggregator, shuffle=shuffle,
                cohort_size=cohort_size, sampling="uniform",
                gradient_estimator=gradient_estimator, downlink=downlink)

  def check(data):
    k = data.mask.shape[0]
    if cohort_size is None and k != num_sites:
      raise ValueError(f"dp_fedavg: built for num_sites={num_sites} (denominator W ="
                       f" {expected:g}) but the data has K = {k} sites; rebuild with"
                       f" num_sites={k}")

  return with_data_check(algo, check, "dp_fedavg")


__all__ = ["dp_sgd_fedavg", "dp_fedavg", "with_batch_check"]
