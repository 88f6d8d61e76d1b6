"""Privacy and security for federated rounds: what leaks, measured.

    import fedjax_med as fm
    from fedjax_med import privacy

    # Patient-level DP inside each site (DP-SGD, Poisson sampling), per-site epsilon:
    algo = fm.algorithms.dp_sgd_fedavg(loss_fn, max_examples=train.max_examples, clip_norm=1.0,
                                 noise_multiplier=1.1, expected_batch_size=16,
                                 client_optimizer=optax.sgd(0.1), local_steps=5)
    acct = privacy.PatientLevelAccountant(train.num_examples, delta=1e-5,
                                          expected_batch_size=16)
    state, hist = fm.run_rounds(algo, algo.init(params), train, 20, key, callback=acct)
    acct.report()     # {site: epsilon_k, "max": ...} from dp-accounting (RDP or PLD)

    # Site-level DP (DP-FedAvg): clip each site's update, Gaussian noise on the sum:
    algo = fm.algorithms.dp_fedavg(loss_fn, clip_norm=0.5, noise_multiplier=1.0, num_sites=4,
                             client_optimizer=optax.sgd(0.05), local_epochs=1, batch_size=4)
    acct = privacy.SiteLevelAccountant(delta=1e-5)  # report(): eps, delta, "replace_one"

    # Calibration: sigma for a target (epsilon, delta):
    sigma = privacy.calibrate_noise_multiplier(3.0, 1e-5, num_steps=100, sampling_rate=0.1)

    # Secure aggregation (Bonawitz et al. 2017) and Paillier HE as reducers:
    agg = privacy.secure_weighted_mean(threshold=3)
    agg = privacy.paillier_weighted_mean()          # needs fedjax_med[he]

Modules: `accounting` (dp-accounting events, epsilon, calibration, ledgers),
`patient_level` (the DP-SGD gradient estimator), `site_level` (the DP-FedAvg
aggregation links). They are plug-ins: a `GradientEstimator` for local
training and `Aggregator` links for the server, with no algorithm inside; the
algorithms that use them (`fm.algorithms.dp_sgd_fedavg`, `dp_fedavg`) live in
`fedjax_med.algorithms.dp_fedavg`, and `privacy.dp_fedavg` /
`privacy.dp_sgd_fedavg` are aliases kept for one version (until 0.3). Secure aggregation
and Paillier are aggregation protocols (`fedjax_med.aggregators.secure`,
`fedjax_med.aggregators.homomorphic`), re-exported here with their old module
names. Each module docstring states its threat model; docs/privacy.md
collects them. Robust aggregation lives in `fedjax_med.aggregators.robust`.
"""

from fedjax_med.aggregators import homomorphic
from fedjax_med.aggregators import secure as secure_aggregation
from fedjax_med.privacy import accounting
from fedjax_med.privacy import patient_level
from fedjax_med.privacy import site_level
from fedjax_med.privacy.accounting import (PatientLevelAccountant, SiteLevelAccountant,
                                           calibrate_noise_multiplier, dp_sgd_event, epsilon,
                                           sampling_rates, site_level_epsilon,
                                           site_level_event)
from fedjax_med.privacy.site_level import (clip_updates, gaussian_sum_mean,
                                          poisson_site_sampling, set_aggregator_hparams,
                                          site_level_dp)
from fedjax_med.privacy.patient_level import (check_batches_span_site, dp_sgd,
                                              needs_whole_site, poisson_row_mask)
from fedjax_med.aggregators.homomorphic import (paillier_keypair, paillier_sum,
                                            paillier_weighted_mean)
from fedjax_med.aggregators.secure import (TooManyDropouts, secure_sum,
                                                   secure_weighted_mean)

__all__ = [
    "accounting", "patient_level", "site_level", "homomorphic", "secure_aggregation",
    "PatientLevelAccountant", "SiteLevelAccountant", "calibrate_noise_multiplier",
    "dp_sgd_event", "epsilon", "sampling_rates", "site_level_epsilon", "site_level_event",
    "clip_updates", "gaussian_sum_mean", "poisson_site_sampling",
    "set_aggregator_hparams", "site_level_dp",
    "check_batches_span_site", "dp_sgd", "needs_whole_site",
    "poisson_row_mask",
    "paillier_keypair", "paillier_sum", "paillier_weighted_mean",
    "TooManyDropouts", "secure_sum", "secure_weighted_mean",
]
