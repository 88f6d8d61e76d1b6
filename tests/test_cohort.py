"""Client sampling: a cohort round equals a full round on the cohort's sites."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core import cohort as cohort_lib
from conftest import bce_loss, init_params, make_sites


@pytest.fixture
def five():
  return fm.FederatedData.from_sites(make_sites([6, 2, 9, 4, 3], seed=7))


def test_uniform_sampling_is_distinct_and_uniform():
  spec = cohort_lib.CohortSpec(size=2)
  n = jnp.array([6, 2, 9, 4, 3])
  counts = np.zeros(5)
  for r in range(2000):
    idx = np.asarray(cohort_lib.sample_indices(spec, n, jax.random.PRNGKey(r)))
    assert len(set(idx.tolist())) == 2
    counts[idx] += 1
  np.testing.assert_allclose(counts / 2000, 2 / 5, atol=0.04)


def test_proportional_sampling_follows_n_k():
  spec = cohort_lib.CohortSpec(size=3, sampling="num_examples")
  n = jnp.array([6, 2, 9, 4, 3])
  draws = np.concatenate([np.asarray(cohort_lib.sample_indices(spec, n, jax.random.PRNGKey(r)))
                          for r in range(3000)])
  freq = np.bincount(draws, minlength=5) / draws.size
  np.testing.assert_allclose(freq, np.asarray(n) / 24, atol=0.015)


@pytest.mark.parametrize("make", [
    lambda: fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                                 cohort_size=3),
    lambda: fm.algorithms.fedprox(bce_loss, mu=0.1, client_optimizer=optax.sgd(0.2),
                                  batch_size=2, cohort_size=3),
    lambda: fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(0.5), cohort_size=3),
])
def test_cohort_round_equals_full_round_on_the_cohort(five, make):
  algo = make()
  params = init_params()
  key = jax.random.PRNGKey(21)
  state, metrics = algo.round(algo.init(params), five, key)
  cohort = np.asarray(metrics["cohort"])
  assert len(set(cohort.tolist())) == 3
  # The same algorithm without sampling, on exactly those sites (ids kept -> keys kept).
  name = algo.name
  kwargs = {"fedavg": dict(client_optimizer=optax.sgd(0.2), batch_size=2),
            "fedprox": dict(mu=0.1, client_optimizer=optax.sgd(0.2), batch_size=2),
            "fedsgd": dict(server_optimizer=optax.sgd(0.5))}[name]
  reference = getattr(fm.algorithms, name)(bce_loss, **kwargs)
  want = reference.round(reference.init(params), five.subset(cohort), key)[0].params
  np.testing.assert_allclose(state.params["w"], want["w"], rtol=1e-6, atol=1e-7)


def test_proportional_sampling_averages_draws_uniformly(five):
  params = init_params()
  key = jax.random.PRNGKey(2)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=4, sampling="num_examples")
  state, metrics = algo.round(algo.init(params), five, key)
  draws = np.asarray(metrics["cohort"])
  single = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2)
  local = {int(k): np.asarray(single.round(single.init(params), five.subset([int(k)]),
                                           key)[0].params["w"]) for k in set(draws.tolist())}
  want = np.mean([local[int(k)] for k in draws], axis=0)
  np.testing.assert_allclose(state.params["w"], want, rtol=1e-5, atol=1e-6)


def test_cohort_errors(five):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=9)
  with pytest.raises(ValueError, match="cohort_size=9 > number of sites K=5"):
    algo.round(algo.init(init_params()), five, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="needs weighting='num_examples'"):
    fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), cohort_size=2,
                         sampling="num_examples", weighting="uniform")
  with pytest.raises(ValueError, match="unknown sampling"):
    fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), cohort_size=2,
                         sampling="stratified")
  with pytest.raises(ValueError, match="cohort_size must be an integer >= 1"):
    fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), cohort_size=0)
