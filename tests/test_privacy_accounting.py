"""Accounting: every epsilon equals dp-accounting called directly on the same event."""

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med.privacy import accounting
from fedjax_med.algorithms.dp_fedavg import dp_sgd_fedavg
from fedjax_med.algorithms.dp_fedavg import dp_fedavg

# XLA:CPU compiles DP-SGD rounds about 2.6x slower under the harness's unrolled threefry
# lowering (tests/_unrolled_threefry.py), so this file keeps JAX's own CPU lowering.
pytestmark = pytest.mark.jax_cpu_threefry_lowering

DELTA = 1e-5


def direct(event, delta=DELTA, kind="rdp", relation=None):
  rel = relation or dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  acc = (rdp.RdpAccountant(neighboring_relation=rel) if kind == "rdp"
         else pld.PLDAccountant(rel))
  return acc.compose(event).get_epsilon(delta)


def test_dp_sgd_event_is_the_poisson_sampled_gaussian():
  event = accounting.dp_sgd_event(1.3, 0.05, 40)
  expected = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.3)), 40)
  assert event == expected
  assert accounting.dp_sgd_event(1.0, 1.0, 3) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.0), 3)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_directly(kind):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 20)
  ours = accounting.epsilon(accounting.dp_sgd_event(1.5, 0.1, 20), DELTA, kind)
  assert abs(ours - direct(event, kind=kind)) <= 1e-6
  assert 0 < ours < np.inf


def test_patient_level_accountant_per_site_epsilon_from_round_metrics():
  """K = 4 sites of different n_k: each has its own epsilon, equal to the direct call."""
  sites = make_sites([40, 25, 10, 17], seed=5)
  data = fm.FederatedData.from_sites(sites)
  b, sigma, steps, rounds = 4.0, 1.2, 3, 4
  algo = dp_sgd_fedavg(bce_loss, max_examples=data.max_examples, clip_norm=1.0,
                       noise_multiplier=sigma, expected_batch_size=b,
                       client_optimizer=optax.sgd(0.1), local_steps=steps)
  acct = accounting.PatientLevelAccountant(data.num_examples, DELTA, expected_batch_size=b)
  state, _ = fm.run_rounds(algo, algo.init(init_params()), data, rounds,
                           jax.random.PRNGKey(0), callback=acct, progress=False)
  eps = acct.epsilons()
  assert len(acct.history) == rounds
  n = np.array([40, 25, 10, 17])
  for k in range(4):
    q = min(1.0, b / n[k])
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps * rounds)
    assert abs(eps[k] - direct(event)) <= 1e-6
    # after round r, site k has spent (r + 1) * steps steps
    event_r1 = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert abs(acct.history[0][k] - direct(event_r1)) <= 1e-6
  # the smallest site samples the largest fraction and spends the most
  assert np.argmax(eps) == 2 and np.argmin(eps) == 0
  assert len(set(np.round(eps, 6))) == 4
  assert np.all(np.diff(np.stack(acct.history), axis=0) > 0)  # epsilon grows every round
  rep = acct.report()
  assert rep["max"] == pytest.approx(eps.max())


def test_pld_ledger_matches_direct_pld():
  acct = accounting.PatientLevelAccountant([50, 20], DELTA, sampling_rate=0.1,
                                           accountant="pld")
  acct.add_steps(0, 2.0, 10)
  acct.add_steps(1, 2.0, 5)
  acct.add_steps(1, 3.0, 5)  # noise changed mid-run: a composed event
  eps = acct.epsilons()
  e0 = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 10)
  e1 = dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 5),
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(3.0)), 5)])
  assert abs(eps[0] - direct(e0, kind="pld")) <= 1e-6
  assert abs(eps[1] - direct(e1, kind="pld")) <= 1e-6
  # the fast RDP ledger equals RDP on the composed event too
  acct_rdp = accounting.PatientLevelAccountant([50, 20], DELTA, sampling_rate=0.1)
  acct_rdp._steps = acct._steps
  assert abs(acct_rdp.epsilons()[1] - direct(e1)) <= 1e-6


def test_no_noise_is_infinite_epsilon_and_no_steps_is_zero():
  assert accounting.epsilon(accounting.dp_sgd_event(0.0, 0.1, 5), DELTA) == np.inf
  assert accounting.epsilon(accounting.dp_sgd_event(1.0, 0.1, 0), DELTA) == 0.0
  acct = accounting.PatientLevelAccountant([10, 0], DELTA, expected_batch_size=2)
  acct.add_steps(0, 0.0, 3)
  acct.add_steps(1, 1.0, 3)  # empty site: q = 0, nothing recorded
  np.testing.assert_array_equal(acct.epsilons(), [np.inf, 0.0])


def test_site_level_accountant_from_dp_fedavg_rounds():
  sites = make_sites([12, 8, 9, 5], seed=2)
  data = fm.FederatedData.from_sites(sites)
  sigma, rounds = 1.1, 3
  algo = dp_fedavg(bce_loss, clip_norm=0.5, noise_multiplier=sigma, num_sites=4,
                   client_optimizer=optax.sgd(0.1), local_epochs=1, batch_size=4)
  acct = accounting.SiteLevelAccountant(DELTA)  # replace one site: sensitivity 2C
  fm.run_rounds(algo, algo.init(init_params()), data, rounds, jax.random.PRNGKey(0),
                callback=acct, progress=False)
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), rounds)
  assert abs(acct.epsilon() - direct(event, relation=REL.REPLACE_ONE)) <= 1e-6
  assert abs(acct.history[0] - direct(
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), 1),
      relation=REL.REPLACE_ONE)) <= 1e-6


def test_site_level_event_poisson_and_fixed_cohorts():
  q_event = accounting.site_level_event(1.0, 10, sampling_rate=0.5,
                                       neighboring_relation="add_or_remove_one")
  assert q_event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 10)
  assert abs(accounting.epsilon(q_event, DELTA) - direct(q_event)) <= 1e-6
  wor = accounting.site_level_event(2.0, 10, num_sites=10, cohort_size=3)
  expected = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      10, 3, dp_accounting.GaussianDpEvent(1.0)), 10)  # replace-one: sensitivity 2C
  assert wor == expected
  ours = accounting.epsilon(wor, DELTA)
  assert abs(ours - direct(expected, relation=dp_accounting.NeighboringRelation.REPLACE_ONE)) \
      <= 1e-6
  with pytest.raises(ValueError, match="does not support"):
    accounting.epsilon(wor, DELTA, "pld")


def test_calibration_hits_the_target():
  steps, q, target = 50, 0.1, 2.0
  sigma = accounting.calibrate_noise_multiplier(target, DELTA, num_steps=steps,
                                                sampling_rate=q, tol=1e-3)
  assert accounting.epsilon(accounting.dp_sgd_event(sigma, q, steps), DELTA) <= target
  assert accounting.epsilon(accounting.dp_sgd_event(sigma - 0.01, q, steps), DELTA) > target
  # the same as dp_accounting.calibrate_dp_mechanism called directly
  ref = dp_accounting.calibrate_dp_mechanism(
      rdp.RdpAccountant,
      lambda s: dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps),
      target, DELTA, dp_accounting.ExplicitBracketInterval(0.05, 500.0), tol=1e-3)
  assert abs(sigma - ref) <= 1e-9
  # site level with fixed cohorts (replace one site), against dp-accounting directly
  s2 = accounting.calibrate_noise_multiplier(4.0, 1e-3, num_steps=20, num_sites=10,
                                             cohort_size=5, tol=1e-3)

  def cohort_eps(s):
    rel = dp_accounting.NeighboringRelation.REPLACE_ONE
    g = dp_accounting.GaussianDpEvent(s / 2)
    a = rdp.RdpAccountant(neighboring_relation=rel).compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(10, 5, g), 20))
    b = rdp.RdpAccountant(neighboring_relation=rel).compose(dp_accounting.SelfComposedDpEvent(
        g, 20))
    return rdp.rdp_privacy_accountant.compute_epsilon(a.orders, np.minimum(a.rdp, b.rdp),
                                                      1e-3)[0]

  assert cohort_eps(s2) <= 4.0 < cohort_eps(s2 - 2e-3)
  # every site every round, replace one: Gaussian(sigma / 2)
  s3 = accounting.calibrate_noise_multiplier(4.0, 1e-3, num_steps=20,
                                             neighboring_relation="replace_one", tol=1e-3)
  g3 = lambda s: direct(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s / 2),
                                                          20), 1e-3)
  assert g3(s3) <= 4.0 < g3(s3 - 2e-3)


def test_bad_inputs_raise_clear_errors():
  for delta in (0.0, 1.0, -0.1, 2.0):
    with pytest.raises(ValueError, match="delta must be in the open interval"):
      accounting.epsilon(accounting.dp_sgd_event(1.0, 0.1, 3), delta)
    with pytest.raises(ValueError, match="delta"):
      accounting.calibrate_noise_multiplier(1.0, delta, num_steps=3, sampling_rate=0.1)
    with pytest.raises(ValueError, match="delta"):
      accounting.PatientLevelAccountant([3], delta, sampling_rate=0.5)
  with pytest.raises(ValueError, match="unreachable"):
    accounting.calibrate_noise_multiplier(1e-4, DELTA, num_steps=1000, sampling_rate=1.0,
                                          max_noise_multiplier=50.0)
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.calibrate_noise_multiplier(0.0, DELTA, num_steps=10)
  with pytest.raises(ValueError, match="sampling_rate"):
    accounting.dp_sgd_event(1.0, 1.5, 3)
  with pytest.raises(ValueError, match="noise_multiplier"):
    accounting.dp_sgd_event(-1.0, 0.5, 3)
  with pytest.raises(ValueError, match="unknown accountant"):
    accounting.epsilon(accounting.dp_sgd_event(1.0, 0.5, 3), DELTA, "moments")
  with pytest.raises(ValueError, match="cohort_size=5 > num_sites=3"):
    accounting.site_level_event(1.0, 3, num_sites=3, cohort_size=5)
  with pytest.raises(ValueError, match="exactly one"):
    accounting.sampling_rates([3, 4])


# ----------------------------------------------------------------------------- issue 17

REL = dp_accounting.NeighboringRelation


def test_site_level_epsilon_has_one_relation_for_every_cohort_mode():
  """K = 20 sites, sigma = 1, 50 rounds. Default relation: replace one site's data (K is
  public: dp_fedavg refuses data with another K). Replacing a site moves the clipped sum by
  up to 2C, so every mode is accounted with Gaussian(sigma / 2) under REPLACE_ONE:
  C = K is 50 x Gaussian(0.5); C = 19 is 50 x SampledWithoutReplacement(20, 19,
  Gaussian(0.5)) (Wang, Balle & Kasiviswanathan 2019), whose RDP bound is combined with the
  unsampled Gaussian's by taking the smaller at each order (for each cohort the round is a
  Gaussian of sensitivity 2C; a mixture with equal weights is no worse than its worst
  component). Sampling fewer sites can then only help: eps(C = 19) <= eps(C = 20). (The
  old code reported 240 at C = 19 and 57 at C = 20, the latter under add/remove with
  sigma.)"""
  k, sigma, rounds, delta = 20, 1.0, 50, 1e-5
  full = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), rounds)
  wor = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      k, k - 1, dp_accounting.GaussianDpEvent(sigma / 2)), rounds)
  eps = {}
  for c in (k - 1, k, None):
    acct = (accounting.SiteLevelAccountant(delta, num_sites=k, cohort_size=c) if c
            else accounting.SiteLevelAccountant(delta))
    acct.add_rounds(sigma, rounds)
    rep = acct.report()
    assert rep["neighboring_relation"] == "replace_one" and rep["delta"] == delta
    assert rep["epsilon"] == acct.epsilon()
    eps[c] = rep["epsilon"]
  assert abs(eps[k] - direct(full, delta, relation=REL.REPLACE_ONE)) <= 1e-6
  assert abs(eps[None] - eps[k]) <= 1e-12
  wor_acc = rdp.RdpAccountant(neighboring_relation=REL.REPLACE_ONE).compose(wor)
  full_acc = rdp.RdpAccountant(neighboring_relation=REL.REPLACE_ONE).compose(full)
  np.testing.assert_array_equal(wor_acc.orders, full_acc.orders)
  ref = rdp.rdp_privacy_accountant.compute_epsilon(
      wor_acc.orders, np.minimum(wor_acc.rdp, full_acc.rdp), delta)[0]
  assert abs(eps[k - 1] - ref) <= 1e-6
  assert eps[k - 1] <= eps[k] + 1e-9
  # a small cohort is amplified: Wang et al.'s bound wins there
  small = accounting.site_level_epsilon(sigma, rounds, delta, num_sites=k, cohort_size=4)
  small_ref = direct(dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(k, 4, dp_accounting.GaussianDpEvent(
          sigma / 2)), rounds), delta, relation=REL.REPLACE_ONE)
  assert abs(small - min(small_ref, eps[k])) <= 1e-6 and small < 0.6 * eps[k]
  # the same in the one-call form, PLD for C = K (sigma = 4, 5 rounds: PLD is slow at small sigma)
  full5 = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0 / 2), 5)
  assert abs(accounting.site_level_epsilon(4.0, 5, delta, accountant="pld")
             - direct(full5, delta, "pld", REL.REPLACE_ONE)) <= 1e-6


def test_site_level_add_or_remove_relation_where_it_is_defined():
  """add_or_remove_one: every site is Gaussian(sigma), Poisson site sampling is
  PoissonSampled(q, Gaussian(sigma)); fixed-size cohorts C < K have no add/remove analysis
  (K would change) and replace_one has no RDP Poisson analysis here: both raise."""
  sigma, rounds = 1.3, 30
  acct = accounting.SiteLevelAccountant(DELTA, neighboring_relation="add_or_remove_one")
  acct.add_rounds(sigma, rounds)
  assert acct.report()["neighboring_relation"] == "add_or_remove_one"
  assert abs(acct.epsilon() - direct(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(sigma), rounds))) <= 1e-6
  pois = accounting.SiteLevelAccountant(DELTA, sampling_rate=0.3,
                                        neighboring_relation="add_or_remove_one")
  pois.add_rounds(sigma, rounds)
  assert abs(pois.epsilon() - direct(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(sigma)),
      rounds))) <= 1e-6
  with pytest.raises(ValueError, match="add_or_remove_one.*fixed-size cohorts"):
    accounting.site_level_event(sigma, rounds, num_sites=10, cohort_size=5,
                                neighboring_relation="add_or_remove_one")
  with pytest.raises(ValueError, match="Poisson site sampling.*add_or_remove_one"):
    accounting.SiteLevelAccountant(DELTA, sampling_rate=0.3)
  with pytest.raises(ValueError, match="neighboring_relation"):
    accounting.SiteLevelAccountant(DELTA, neighboring_relation="swap")


def test_patient_level_accountant_checks_n_k_against_the_data():
  """Built with n = [40, 25] but fed rounds on data with n = [40, 20]: q_k would be wrong."""
  sites = make_sites([40, 20], seed=5)
  data = fm.FederatedData.from_sites(sites)
  algo = dp_sgd_fedavg(bce_loss, max_examples=data.max_examples, clip_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=4.0,
                       client_optimizer=optax.sgd(0.1), local_steps=1)
  acct = accounting.PatientLevelAccountant([40, 25], DELTA, expected_batch_size=4.0)
  state = algo.init(init_params())
  _, metrics = algo.round(state, data, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"site 1 .*n_k = 25.*20 real rows"):
    acct.observe(state, metrics)
  with pytest.raises(ValueError, match="3 sites"):
    accounting.PatientLevelAccountant([40, 20, 5], DELTA, expected_batch_size=4.0).observe(
        state, {**metrics, "cohort": np.array([0, 3])})
  with pytest.raises(ValueError, match="num_examples"):
    accounting.PatientLevelAccountant([40, 20], DELTA, expected_batch_size=4.0).observe(
        state, {"client_steps": metrics["client_steps"]})
  ok = accounting.PatientLevelAccountant([40, 20], DELTA, expected_batch_size=4.0)
  ok.observe(state, metrics)  # consistent: accepted
