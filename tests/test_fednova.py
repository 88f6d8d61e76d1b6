"""FedNova == a float64 NumPy loop written from Wang et al. 2020 (NeurIPS),
"Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", Sec. 4-5 and Appendix (local SGD with heavy-ball momentum).

The reference below never calls fedjax_med's training code: it runs each
site's SGD (+ momentum) on a least-squares objective in float64, in stored row
order (shuffle=False), builds the paper's a_k entry by entry and aggregates

    d_k = Delta_k / ||a_k||_1,  tau_eff = sum_k p_k ||a_k||_1,
    w <- w - tau_eff * sum_k p_k d_k.
"""

import math

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, count_compilations, init_params

SIZES = [3, 8, 0, 13]          # with batch 2 and 2 epochs: tau_k = 4, 8, 0, 14
BATCH, EPOCHS = 2, 2
# float32 run vs float64 loop, 3 rounds: measured max abs error 1.2e-7 with
# |w| <= 1.8 (rho in {0, 0.5, 0.9}, both weightings); tau_eff to 1.1e-7
# relative. Tolerances ~4x above. (The old tau_k normaliser misses by 1.2e-2
# at rho = 0.5 and 9.5e-2 at rho = 0.9.)
RTOL, ATOL = 2e-7, 5e-7


def sq_loss(params, x, y):
  """Per-example least squares 0.5 (x w + b - y)^2, [B]."""
  r = x @ params["w"] + params["b"] - y
  return 0.5 * r * r


def ls_sites(sizes=SIZES, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  sites = []
  for k, n in enumerate(sizes):
    x = rng.normal(loc=0.4 * k, size=(n, dim)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 * k + 0.1 * rng.normal(size=n)).astype(np.float32)
    sites.append((x, y))
  return sites


def wang_a(tau, rho):
  """The paper's a_k for heavy-ball momentum rho: entry i (i = 1..tau) is the
  total weight of the i-th local gradient in Delta_k / lr,
  a_{k,i} = (1 - rho^(tau - i + 1)) / (1 - rho)  (= 1 for plain SGD)."""
  if rho == 0.0:
    return np.ones(tau)
  return np.array([(1 - rho ** (tau - i + 1)) / (1 - rho) for i in range(1, tau + 1)])


def reference_fednova(w, b, sites, lr, rho, rounds, weighting):
  """Float64 FedNova rounds (server step 1); returns (w, b) and [tau_eff per round]."""
  w, b = np.array(w, np.float64), float(b)
  n = np.array([len(y) for _, y in sites], np.float64)
  if weighting == "num_examples":
    p = n / n.sum()
  else:
    p = (n > 0) / np.sum(n > 0)
  taus_eff = []
  for _ in range(rounds):
    dw, db, tau_eff = np.zeros_like(w), 0.0, 0.0
    for pk, (x, y) in zip(p, sites):
      tau = EPOCHS * math.ceil(len(y) / BATCH)
      if tau == 0:
        continue
      x, y = x.astype(np.float64), y.astype(np.float64)
      wk, bk, mw, mb, grads = w.copy(), b, np.zeros_like(w), 0.0, []
      for t in range(tau):
        j = t % math.ceil(len(y) / BATCH)
        xb, yb = x[j * BATCH:(j + 1) * BATCH], y[j * BATCH:(j + 1) * BATCH]
        r = xb @ wk + bk - yb
        gw, gb = xb.T @ r / len(yb), r.mean()
        grads.append((gw, gb))
        mw, mb = rho * mw + gw, rho * mb + gb       # heavy ball: m <- rho m + g
        wk, bk = wk - lr * mw, bk - lr * mb
      a = wang_a(tau, rho)
      # The reference's own check of the paper's algebra: Delta_k = lr G_k a_k.
      np.testing.assert_allclose(w - wk, lr * sum(ai * g[0] for ai, g in zip(a, grads)),
                                 rtol=1e-10, atol=1e-12)
      norm = np.sum(np.abs(a))
      dw += pk * (w - wk) / norm
      db += pk * (b - bk) / norm
      tau_eff += pk * norm
    w, b = w - tau_eff * dw, b - tau_eff * db
    taus_eff.append(tau_eff)
  return (w, b), taus_eff


def run(algo, params, data, rounds, state=None):
  state = algo.init(params) if state is None else state
  taus = []
  for r in range(rounds):
    state, metrics = algo.round(state, data, jax.random.PRNGKey(r))
    taus.append(float(metrics["tau_eff"]))
  return state, taus


@pytest.fixture(scope="module")
def ls_data():
  return fm.FederatedData.from_sites(ls_sites())


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_matches_wang_et_al_numpy_loop(ls_data, rho, weighting):
  """SGD (rho = 0) and SGD with heavy-ball momentum, unequal tau_k = 4, 8, 0, 14."""
  params = init_params()
  lr = 0.02
  client = optax.sgd(lr, momentum=rho) if rho else optax.sgd(lr)
  algo = fm.algorithms.fednova(sq_loss, client_optimizer=client, local_epochs=EPOCHS,
                               batch_size=BATCH, shuffle=False, weighting=weighting)
  state, taus = run(algo, params, ls_data, 3)
  (w, b), want_taus = reference_fednova(params["w"], params["b"], ls_sites(), lr, rho, 3,
                                        weighting)
  np.testing.assert_allclose(state.params["w"], w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(state.params["b"], b, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(taus, want_taus, rtol=5e-7)


def test_momentum_normaliser_differs_between_sites():
  """Why it matters: with rho = 0.9, ||a_k||_1 / tau_k is 3.6 at tau = 8 and
  8.2 at tau = 50 (the heart-disease range): dividing by tau_k instead mis-weights
  the sites by 2.3x."""
  ratio = lambda tau: wang_a(tau, 0.9).sum() / tau
  assert ratio(50) / ratio(8) == pytest.approx(2.29, abs=0.01)


def test_traced_momentum_follows_set_hyperparams(ls_data):
  """The normaliser reads the client's traced momentum: changing it with
  set_hyperparams gives the NumPy loop at the new rho, without recompiling."""
  params = init_params()
  client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.5)
  algo = fm.algorithms.fednova(sq_loss, client_optimizer=client, local_epochs=EPOCHS,
                               batch_size=BATCH, shuffle=False)
  run(algo, params, ls_data, 1)   # compile
  with count_compilations() as compiles:
    state = fm.set_hyperparams(algo.init(params),
                               client={"learning_rate": 0.02, "momentum": 0.9})
    state, taus = run(algo, params, ls_data, 2, state)
  assert compiles[0] == 0
  (w, b), want_taus = reference_fednova(params["w"], params["b"], ls_sites(), 0.02, 0.9, 2,
                                        "num_examples")
  np.testing.assert_allclose(state.params["w"], w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(taus, want_taus, rtol=5e-7)


@pytest.mark.parametrize("client, match", [
    (optax.adam(0.01), "not SGD"),
    (optax.sgd(0.1, momentum=0.9, nesterov=True), "not SGD"),
    (optax.sgd(optax.linear_schedule(0.1, 0.01, 10)), "not SGD"),
    (optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1)), "not SGD"),
    (optax.sgd(0.1, momentum=1.0), "momentum"),
])
def test_refuses_clients_without_a_known_normaliser(client, match):
  with pytest.raises(fm.OptionError, match=match):
    fm.algorithms.fednova(sq_loss, client_optimizer=client)


def test_equal_steps_equal_fedavg(data):
  """Paper, Sec. 4: with equal a_k (same tau, same rho) FedNova is FedAvg.
  (An equivalence between two of the project's algorithms; the independent
  check is test_matches_wang_et_al_numpy_loop.)"""
  params = init_params()
  key = jax.random.PRNGKey(3)
  for client in (optax.sgd(0.2), optax.sgd(0.2, momentum=0.9)):
    common = dict(client_optimizer=client, local_steps=4, batch_size=2)
    nova = fm.algorithms.fednova(bce_loss, **common)
    avg = fm.algorithms.fedavg(bce_loss, **common)
    a = nova.round(nova.init(params), data, key)
    b = avg.round(avg.init(params), data, key)
    # measured: equal to 3e-8 (float32 rounding of tau_eff * Delta / ||a||_1)
    np.testing.assert_allclose(a[0].params["w"], b[0].params["w"], rtol=0, atol=1.5e-7)
  np.testing.assert_allclose(a[1]["tau_eff"], wang_a(4, 0.9).sum(), rtol=1e-6)
