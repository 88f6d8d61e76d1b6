"""FedAdam/FedYogi/FedAdagrad == a float64 NumPy loop: each site's local SGD
(written from the BCE gradient), the n_k-weighted average, then Reddi et al.
2021 ("Adaptive Federated Optimization", ICLR), Algorithm 2 (no bias
correction, tau outside the square root)."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, count_compilations, init_params, ref_local_sgd, to_np


def algorithm2(adaptivity, x, delta, m, v, eta, b1, b2, tau):
  m = b1 * m + (1 - b1) * delta
  if adaptivity == "adagrad":
    v = v + delta**2
  elif adaptivity == "adam":
    v = b2 * v + (1 - b2) * delta**2
  else:
    v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
  return x + eta * m / (np.sqrt(v) + tau), m, v


def reference_fedopt(adaptivity, params, sites, mask, keys, lr, batch, hypers):
  """Float64: x_{t+1} from Algorithm 2 with Delta_t = sum_k p_k w_k - x_t.

  `hypers[t]` = (eta, b1, b2, tau) used in round t. Returns [(w, b)] per round.
  """
  w, b = to_np(params)
  x = np.concatenate([w, [b]])
  m, v = np.zeros_like(x), np.zeros_like(x)
  n = np.array([len(y) for _, y in sites], np.float64)
  p = n / n.sum()
  out = []
  for key, (eta, b1, b2, tau) in zip(keys, hypers):
    avg = np.zeros_like(x)
    for k, (xs, ys) in enumerate(sites):
      wk, bk, _ = ref_local_sgd(x[:-1], x[-1], xs, ys, lr, batch, mask[k],
                                jax.random.fold_in(key, k), epochs=1)
      avg += p[k] * np.concatenate([wk, [bk]])
    x, m, v = algorithm2(adaptivity, x, avg - x, m, v, eta, b1, b2, tau)
    out.append((x[:-1].copy(), x[-1]))
  return out


# float32 run vs float64 loop over 5 rounds: measured max abs error 2.6e-7
# (|x| < 1, all three adaptivities); tolerances ~2-3x above.
RTOL, ATOL = 1e-6, 6e-7


@pytest.mark.parametrize("name, adaptivity", [("fedadam", "adam"), ("fedyogi", "yogi"),
                                               ("fedadagrad", "adagrad")])
def test_fedopt_equals_numpy_clients_then_algorithm2(sites, data, name, adaptivity):
  eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  lr, batch = 0.2, 2
  algo = getattr(fm.algorithms, name)(bce_loss, server_learning_rate=eta, beta1=b1, beta2=b2,
                                      tau=tau, client_optimizer=optax.sgd(lr), local_epochs=1,
                                      batch_size=batch)
  params = init_params()
  state = algo.init(params)
  keys = [jax.random.PRNGKey(r) for r in range(5)]
  got = []
  for key in keys:
    state, _ = algo.round(state, data, key)
    got.append(state.params)
  want = reference_fedopt(adaptivity, params, sites, np.asarray(data.mask), keys, lr, batch,
                          [(eta, b1, b2, tau)] * 5)
  for t, (g, (w, b)) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g["w"], w, rtol=RTOL, atol=ATOL, err_msg=f"round {t}")
    np.testing.assert_allclose(g["b"], b, rtol=RTOL, atol=ATOL, err_msg=f"round {t}")


def test_server_hyperparameters_are_traced(sites, data):
  """set_hyperparams changes the server's eta and tau mid-run: the result is
  Algorithm 2 with the new values from round 2 on, and nothing recompiles."""
  client = optax.sgd(0.2)
  algo = fm.algorithms.fedadam(bce_loss, client_optimizer=client, batch_size=2,
                               server_learning_rate=0.01)
  params = init_params()
  keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(1)]
  state = algo.init(params)
  state, _ = algo.round(state, data, keys[0])
  with count_compilations() as compiles:
    state = fm.set_hyperparams(state, server={"learning_rate": 0.1, "tau": 1e-8})
    state, _ = algo.round(state, data, keys[1])
    # A second FedAdam with other server values shares the compiled round.
    again = fm.algorithms.fedadam(bce_loss, client_optimizer=client, batch_size=2,
                                  server_learning_rate=0.5, beta1=0.5)
    state2, _ = again.round(again.init(params), data, keys[1])
    jax.block_until_ready((state, state2))
  assert compiles[0] == 0
  # defaults beta1 = 0.9, beta2 = 0.999 (Reddi et al.'s / FLamby's values).
  want = reference_fedopt("adam", params, sites, np.asarray(data.mask), keys, 0.2, 2,
                          [(0.01, 0.9, 0.999, 1e-3), (0.1, 0.9, 0.999, 1e-8)])
  # measured error 2.3e-6: with tau = 1e-8 the step eta m / sqrt(v) (~0.3) carries
  # the relative error of Delta = avg - x, a float32 difference of O(0.3)
  # numbers that is O(1e-2) (relative error ~1e-5); tolerance 4x above.
  np.testing.assert_allclose(state.params["w"], want[1][0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(state.params["b"], want[1][1], rtol=0, atol=1e-5)
  want2 = reference_fedopt("adam", params, sites, np.asarray(data.mask), keys[1:], 0.2, 2,
                           [(0.5, 0.5, 0.999, 1e-3)])
  # measured relative error 4.7e-6 (|x| ~ 6 after one step of eta m / sqrt(v) with
  # eta = 0.5, b1 = 0.5; same conditioning as above); tolerance 4x above.
  np.testing.assert_allclose(state2.params["w"], want2[0][0], rtol=2e-5, atol=0)


def test_fedopt_rejects_server_optimizer_option():
  with pytest.raises(ValueError, match="unknown option.*server_optimizer"):
    fm.algorithms.fedadam(bce_loss, client_optimizer=optax.sgd(0.1), server_learning_rate=0.1,
                          server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError):
    fm.algorithms.fedyogi(bce_loss, client_optimizer=optax.sgd(0.1), server_learning_rate=0.1,
                          beta1=1.5)
