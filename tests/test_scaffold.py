"""SCAFFOLD == a sequential loop written from Karimireddy et al. 2020, Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, ref_local_sgd, to_np


def reference_scaffold(params, sites, mask, lr, batch, epochs, keys, cohorts, weighting):
  """Float64 Algorithm 1 (option II), global step 1, weights p over the cohort,
  server control variate c <- c + sum_{k in S} q_k dc_k (q_k = 1/N or n_k/n)."""
  x = to_np(params)
  c = (np.zeros_like(x[0]), 0.0)
  ck = [(np.zeros_like(x[0]), 0.0) for _ in sites]
  n = np.array([len(y) for _, y in sites], np.float64)
  q = n / n.sum() if weighting == "num_examples" else np.ones_like(n) / len(n)
  for key, cohort in zip(keys, cohorts):
    new_x_w, new_x_b = x[0].copy(), x[1]
    p = n[cohort] / n[cohort].sum() if weighting == "num_examples" else (
        np.ones(len(cohort)) / len(cohort))
    dc_w, dc_b = np.zeros_like(x[0]), 0.0
    updated = {}
    for pk, k in zip(p, cohort):
      xx, yy = sites[k]
      corr = lambda w, b, k=k: (c[0] - ck[k][0], c[1] - ck[k][1])
      yw, yb, tau = ref_local_sgd(x[0], x[1], xx, yy, lr, batch, mask[k],
                                  jax.random.fold_in(key, k), epochs=epochs, extra_grad=corr)
      c_new = (ck[k][0] - c[0] + (x[0] - yw) / (tau * lr),
               ck[k][1] - c[1] + (x[1] - yb) / (tau * lr))
      dc_w += q[k] * (c_new[0] - ck[k][0])
      dc_b += q[k] * (c_new[1] - ck[k][1])
      updated[k] = c_new
      new_x_w += pk * (yw - x[0])
      new_x_b += pk * (yb - x[1])
    ck = [updated.get(k, ck[k]) for k in range(len(sites))]
    c = (c[0] + dc_w, c[1] + dc_b)
    x = (new_x_w, new_x_b)
  return x, c, ck


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
@pytest.mark.parametrize("cohort_size", [None, 2])
def test_scaffold_equals_reference(weighting, cohort_size):
  sites = make_sites([6, 3, 5, 4], seed=2)
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  lr, batch, epochs = 0.3, 2, 2
  algo = fm.algorithms.scaffold(bce_loss, client_learning_rate=lr, local_epochs=epochs,
                                batch_size=batch, weighting=weighting,
                                cohort_size=cohort_size)
  state = algo.init(params, data.num_sites)
  keys, cohorts = [], []
  for r in range(4):
    key = jax.random.PRNGKey(50 + r)
    state, metrics = algo.round(state, data, key)
    keys.append(key)
    cohorts.append(np.asarray(metrics["cohort"]))
  if cohort_size is not None:
    assert all(len(c) == 2 for c in cohorts)
  x, c, ck = reference_scaffold(params, sites, np.asarray(data.mask), lr, batch, epochs, keys,
                                cohorts, weighting)
  # float32 run vs float64 loop, 4 rounds: measured max abs error 9.4e-8 on the
  # model (|x| < 1.5) and 7.2e-8 on the control variates (max rel 9e-7 at
  # entries ~0.05); tolerances ~5x above.
  rtol, atol = 1e-6, 5e-7
  np.testing.assert_allclose(state.params["w"], x[0], rtol=rtol, atol=atol)
  np.testing.assert_allclose(state.params["b"], x[1], rtol=rtol, atol=atol)
  np.testing.assert_allclose(state.algorithm_state["control"]["w"], c[0], rtol=rtol, atol=atol)
  np.testing.assert_allclose(state.algorithm_state["control"]["b"], c[1], rtol=rtol, atol=atol)
  for k in range(len(sites)):
    np.testing.assert_allclose(state.client_states["control"]["w"][k], ck[k][0],
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(state.client_states["control"]["b"][k], ck[k][1],
                               rtol=rtol, atol=atol)
  # The server variate is the q-weighted mean of the client variates, always
  # (measured: to 1.7e-8).
  n = np.array([len(y) for _, y in sites], np.float64)
  q = n / n.sum() if weighting == "num_examples" else np.ones(4) / 4
  np.testing.assert_allclose(state.algorithm_state["control"]["w"],
                             q @ np.asarray(state.client_states["control"]["w"], np.float64),
                             rtol=0, atol=1e-7)


def test_first_round_is_fedavg(data):
  """Zero control variates: SCAFFOLD's first round (any number of steps) is FedAvg.
  (An equivalence between two of the project's algorithms; the independent check
  is test_scaffold_equals_reference.)"""
  params = init_params()
  key = jax.random.PRNGKey(1)
  common = dict(local_steps=1, batch_size=3)
  sc = fm.algorithms.scaffold(bce_loss, client_learning_rate=0.2, **common)
  avg = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), **common)
  a = sc.round(sc.init(params, 3), data, key)[0].params
  b = avg.round(avg.init(params), data, key)[0].params
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6, atol=1e-7)


def test_non_participants_keep_their_control_variates(data):
  algo = fm.algorithms.scaffold(bce_loss, client_learning_rate=0.2, local_epochs=1,
                                batch_size=2, cohort_size=1)
  state = algo.init(init_params(), 3)
  state, _ = algo.round(state, data, jax.random.PRNGKey(0))
  before = np.asarray(state.client_states["control"]["w"])
  state, metrics = algo.round(state, data, jax.random.PRNGKey(1))
  after = np.asarray(state.client_states["control"]["w"])
  chosen = int(metrics["cohort"][0])
  for k in range(3):
    if k != chosen:
      np.testing.assert_array_equal(after[k], before[k])
  assert not np.array_equal(after[chosen], before[chosen])


def test_scaffold_errors(data):
  with pytest.raises(ValueError, match="client_learning_rate must be > 0"):
    fm.algorithms.scaffold(bce_loss, client_learning_rate=0.0)
  algo = fm.algorithms.scaffold(bce_loss, client_learning_rate=0.1, batch_size=2)
  with pytest.raises(ValueError, match="built for 2 sites but data has 3"):
    algo.round(algo.init(init_params(), 2), data, jax.random.PRNGKey(0))
