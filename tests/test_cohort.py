"""Client sampling: each scheme's round against float64 loops and exact enumeration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core import cohort as cohort_lib
from conftest import bce_loss, init_params, make_sites, np_bce_grad, ref_local_sgd, to_np


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


def _coefficients(scheme, cohort, n):
  """Each cohort entry's aggregation coefficient, from the schemes' equations."""
  n = np.asarray(n, np.float64)
  c, k = len(cohort), len(n)
  if scheme == "uniform":           # renormalised over the cohort
    return n[cohort] / n[cohort].sum()
  if scheme == "uniform_unbiased":  # Li et al. 2020, scheme II: p_k K / C
    return n[cohort] / n.sum() * k / c
  return np.full(c, 1.0 / c)        # scheme I: each draw 1 / C


@pytest.mark.parametrize("scheme", ["uniform", "uniform_unbiased", "num_examples"])
def test_cohort_fedavg_round_matches_numpy_loop(five, scheme):
  """FedAvg with a cohort == a float64 loop over the drawn sites (conftest.ref_local_sgd)."""
  sites = make_sites([6, 2, 9, 4, 3], seed=7)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=3, sampling=scheme)
  params = init_params()
  key = jax.random.PRNGKey(21)
  state, metrics = algo.round(algo.init(params), five, key)
  cohort = np.asarray(metrics["cohort"])
  w0, b0 = to_np(params)
  mask = np.asarray(five.mask)
  coeff = _coefficients(scheme, cohort, [len(y) for _, y in sites])
  dw, db = np.zeros_like(w0), 0.0
  for c_k, k in zip(coeff, cohort):
    x, y = sites[k]
    wk, bk, _ = ref_local_sgd(w0, b0, x, y, 0.2, 2, mask[k], jax.random.fold_in(key, int(k)),
                              epochs=1)
    dw, db = dw + c_k * (w0 - wk), db + c_k * (b0 - bk)
  np.testing.assert_allclose(state.params["w"], w0 - dw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], b0 - db, rtol=1e-5, atol=1e-6)


def _enumerated_mean(scheme, grads, n, c):
  """E[aggregate] over all C-subsets (uniform without replacement), exactly."""
  subsets = list(itertools.combinations(range(len(n)), c))
  values = [sum(ck * grads[k] for ck, k in zip(_coefficients(scheme, np.array(s), n), s))
            for s in subsets]
  return np.mean(values, axis=0), np.std(values, axis=0)


@pytest.mark.parametrize("scheme", ["uniform", "uniform_unbiased"])
def test_cohort_schemes_expectation_against_exact_enumeration(scheme):
  """FedSGD's aggregate over 4000 rounds vs the exact expectation over all 6 cohorts.

  Sizes 199/172/30/85 (heart disease), C = 2. The default scheme's exact
  expectation differs from sum_k p_k g_k (biased), scheme II's equals it. The
  Monte-Carlo mean must lie within 5 standard errors of the exact value (false
  alarm ~6e-7 per coordinate); the biased scheme's exact gap (0.031 in the
  bias coordinate) is 15.7 standard errors, so confusing the two schemes
  fails with certainty (power ~1 - Phi(-10.7)).
  """
  sizes = [199, 172, 30, 85]
  rng = np.random.default_rng(0)
  sites = []
  for k, n_k in enumerate(sizes):
    x = rng.normal(loc=0.5 * k, size=(n_k, 3)).astype(np.float32)
    y = (rng.uniform(size=n_k) < 0.2 + 0.2 * k).astype(np.float32)
    sites.append((x, y))
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  w, b = to_np(params)
  grads = [np.append(*np_bce_grad(w, b, x.astype(np.float64), y)) for x, y in sites]
  algo = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0), cohort_size=2,
                              sampling=scheme)
  state = algo.init(params)
  keys = jax.random.split(jax.random.PRNGKey(5), 4000)
  new = jax.jit(jax.vmap(algo.pure_round, in_axes=(None, None, 0)))(state, data, keys)[0]
  steps = np.concatenate([w - np.asarray(new.params["w"], np.float64),
                          (b - np.asarray(new.params["b"], np.float64))[:, None]], axis=1)
  exact, spread = _enumerated_mean(scheme, grads, np.array(sizes), 2)
  full = sum(n_k / sum(sizes) * g for n_k, g in zip(sizes, grads))
  stderr = spread / np.sqrt(len(keys))
  assert np.all(np.abs(steps.mean(axis=0) - exact) < 5 * stderr + 1e-6)
  if scheme == "uniform_unbiased":
    np.testing.assert_allclose(exact, full, rtol=1e-12)
  else:
    assert np.max(np.abs(exact - full) / stderr) > 10


def test_empty_cohort_leaves_a_stateful_server_optimizer_alone():
  """A round whose cohort holds only empty sites changes neither the model nor
  FedAdam's moments (before the fix its zero update still moved the model)."""
  sites = make_sites([6], seed=3) + [(np.zeros((0, 3), np.float32), np.zeros(0, np.float32))] * 2
  data = fm.FederatedData.from_sites(sites)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              server_optimizer=optax.adam(0.1), cohort_size=1)
  state = algo.init(init_params())
  seen = set()
  for r in range(40):
    before = state
    state, metrics = algo.round(state, data, jax.random.PRNGKey(r))
    site = int(np.asarray(metrics["cohort"])[0])
    seen.add(site == 0)
    if site != 0:
      for a, b in zip(jax.tree_util.tree_leaves((before.params, before.server_opt_state)),
                      jax.tree_util.tree_leaves((state.params, state.server_opt_state))):
        np.testing.assert_array_equal(a, b)
  assert seen == {True, False}  # both kinds of round happened


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
