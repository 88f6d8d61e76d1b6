"""FedDyn and q-FFL, written only with the public kit, against float64 NumPy loops.

References are transcriptions of the papers' updates (Acar et al. ICLR 2021,
Algorithm 1; Li et al. ICLR 2020, q-FedAvg) on the BCE logistic model of
conftest, with local SGD in the documented row order (`ref_local_sgd`).
Measured float32-vs-float64 error: <= 3e-7 absolute on parameters of size
~1 after 3 rounds; tolerance rtol 2e-5 / atol 2e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, np_bce_mean, ref_local_sgd, to_np

RTOL, ATOL = 2e-5, 2e-6


def _sites():
  return make_sites([7, 3, 0, 5], seed=11)


@pytest.mark.parametrize("cohort_size", [None, 2])
def test_feddyn_matches_numpy_loop(cohort_size):
  sites = _sites()
  data = fm.FederatedData.from_sites(sites)
  alpha, lr, batch = 0.3, 0.2, 2
  algo = fm.algorithms.feddyn(bce_loss, alpha=alpha, client_optimizer=optax.sgd(lr),
                              local_epochs=1, batch_size=batch, cohort_size=cohort_size)
  state = algo.init(init_params(), len(sites))
  w, b = to_np(init_params())
  hk = [(np.zeros_like(w), 0.0) for _ in sites]
  h = (np.zeros_like(w), 0.0)
  mask = np.asarray(data.mask)
  num_sites = len(sites)
  m = sum(len(y) > 0 for _, y in sites)       # the paper's m devices: the sites holding data
  for r in range(3):
    key = jax.random.PRNGKey(30 + r)
    state, metrics = algo.round(state, data, key)
    cohort = np.asarray(metrics["cohort"])
    participants = [int(k) for k in cohort if len(sites[k][1]) > 0]
    trained = {}
    for k in participants:
      x, y = sites[k]
      hw, hb = hk[k]
      dyn = lambda v, c, w0=w, b0=b, hw=hw, hb=hb: (-hw + alpha * (v - w0),
                                                     -hb + alpha * (c - b0))
      wk, bk, _ = ref_local_sgd(w, b, x, y, lr, batch, mask[k],
                                jax.random.fold_in(key, k), epochs=1, extra_grad=dyn)
      trained[k] = (wk, bk)
      hk[k] = (hw - alpha * (wk - w), hb - alpha * (bk - b))
    sum_w = sum(trained[k][0] - w for k in participants)
    sum_b = sum(trained[k][1] - b for k in participants)
    h = (h[0] - alpha * sum_w / m, h[1] - alpha * sum_b / m)
    mean_w = np.mean([trained[k][0] for k in participants], axis=0)
    mean_b = np.mean([trained[k][1] for k in participants])
    w, b = mean_w - h[0] / alpha, mean_b - h[1] / alpha
    np.testing.assert_allclose(state.params["w"], w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.params["b"], b, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.algorithm_state["h"]["w"], h[0], rtol=RTOL, atol=ATOL)
    for k in range(num_sites):
      np.testing.assert_allclose(state.client_states["h"]["w"][k], hk[k][0],
                                 rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("q", [0.0, 1.0, 2.5])
def test_qffl_matches_numpy_loop(q):
  sites = _sites()
  data = fm.FederatedData.from_sites(sites)
  lr, batch, lip = 0.3, 3, 1 / 0.3
  algo = fm.algorithms.qffl(bce_loss, q=q, lipschitz=lip, client_optimizer=optax.sgd(lr),
                            local_epochs=2, batch_size=batch)
  state = algo.init(init_params())
  w, b = to_np(init_params())
  mask = np.asarray(data.mask)
  for r in range(3):
    key = jax.random.PRNGKey(50 + r)
    state, metrics = algo.round(state, data, key)
    deltas_w, deltas_b, hs = [], [], []
    for k, (x, y) in enumerate(sites):
      if len(y) == 0:
        continue
      f = np_bce_mean(w, b, x.astype(np.float64), y.astype(np.float64))
      wk, bk, _ = ref_local_sgd(w, b, x, y, lr, batch, mask[k], jax.random.fold_in(key, k),
                                epochs=2)
      dw, db = lip * (w - wk), lip * (b - bk)
      deltas_w.append(f ** q * dw)
      deltas_b.append(f ** q * db)
      hs.append(q * f ** (q - 1) * (np.sum(dw ** 2) + db ** 2) + lip * f ** q)
    w = w - sum(deltas_w) / sum(hs)
    b = b - sum(deltas_b) / sum(hs)
    np.testing.assert_allclose(state.params["w"], w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.params["b"], b, rtol=RTOL, atol=ATOL)


def test_qffl_q0_is_uniform_fedavg():
  """q = 0: w <- mean_k w_bar_k over the sites holding data (FedAvg, weighting='uniform')."""
  sites = _sites()
  data = fm.FederatedData.from_sites(sites)
  lr = 0.3
  algo = fm.algorithms.qffl(bce_loss, q=0.0, lipschitz=1 / lr, client_optimizer=optax.sgd(lr),
                            batch_size=2)
  key = jax.random.PRNGKey(3)
  state, _ = algo.round(algo.init(init_params()), data, key)
  w, b = to_np(init_params())
  mask = np.asarray(data.mask)
  trained = [ref_local_sgd(w, b, x, y, lr, 2, mask[k], jax.random.fold_in(key, k), epochs=1)
             for k, (x, y) in enumerate(sites) if len(y)]
  np.testing.assert_allclose(state.params["w"], np.mean([t[0] for t in trained], axis=0),
                             rtol=RTOL, atol=ATOL)


def test_hyperparameters_are_traced_and_options_checked():
  sites = _sites()
  data = fm.FederatedData.from_sites(sites)
  algo = fm.algorithms.feddyn(bce_loss, alpha=0.3, client_optimizer=optax.sgd(0.2),
                              batch_size=2)
  state = fm.set_hyperparams(algo.init(init_params(), 4), alpha=0.05)
  assert float(state.hparams["alpha"]) == pytest.approx(0.05)
  with pytest.raises(ValueError, match="alpha must be a number > 0"):
    fm.algorithms.feddyn(bce_loss, alpha=0.0, client_optimizer=optax.sgd(0.2))
  with pytest.raises(ValueError, match="fixed by the algorithm"):
    fm.algorithms.feddyn(bce_loss, alpha=0.1, client_optimizer=optax.sgd(0.2),
                         server_optimizer=optax.adam(0.1))
  with pytest.raises(ValueError, match="num_sites"):
    algo.init(init_params())
  with pytest.raises(ValueError, match="K = 4 sites"):
    algo.round(algo.init(init_params(), 3), data, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="q must be a number >= 0"):
    fm.algorithms.qffl(bce_loss, q=-1.0, lipschitz=1.0, client_optimizer=optax.sgd(0.2))
  q_algo = fm.algorithms.qffl(bce_loss, q=1.0, lipschitz=2.0, client_optimizer=optax.sgd(0.2))
  q_state = fm.set_hyperparams(q_algo.init(init_params()), q=2.0, lipschitz=5.0)
  assert float(q_state.hparams["q"]) == 2.0 and float(q_state.hparams["lipschitz"]) == 5.0
