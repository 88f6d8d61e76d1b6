"""FedAdam/FedYogi/FedAdagrad == FedAvg's averaged update followed by a NumPy
transcription of Reddi et al. 2021, Algorithm 2 (no bias correction)."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, count_compilations, init_params


def algorithm2(adaptivity, x, delta, m, v, eta, b1, b2, tau):
  m = b1 * m + (1 - b1) * delta
  if adaptivity == "adagrad":
    v = v + delta**2
  elif adaptivity == "adam":
    v = b2 * v + (1 - b2) * delta**2
  else:
    v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
  return x + eta * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("name, adaptivity", [("fedadam", "adam"), ("fedyogi", "yogi"),
                                               ("fedadagrad", "adagrad")])
def test_fedopt_equals_fedavg_then_algorithm2(data, name, adaptivity):
  eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  common = dict(client_optimizer=optax.sgd(0.2), local_epochs=1, batch_size=2)
  algo = getattr(fm.algorithms, name)(bce_loss, server_learning_rate=eta, beta1=b1, beta2=b2,
                                      tau=tau, **common)
  avg = fm.algorithms.fedavg(bce_loss, **common)
  state = algo.init(init_params())
  x = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v = {k: np.zeros_like(v) for k, v in x.items()}
  for r in range(5):
    key = jax.random.PRNGKey(r)
    averaged = avg.round(avg.init(state.params), data, key)[0].params
    state, _ = algo.round(state, data, key)
    for k in x:
      delta = np.asarray(averaged[k], np.float64) - np.asarray(x[k])   # Reddi's Delta
      x[k], m[k], v[k] = algorithm2(adaptivity, x[k], delta, m[k], v[k], eta, b1, b2, tau)
      np.testing.assert_allclose(state.params[k], x[k], rtol=1e-4, atol=1e-6)
      x[k] = np.asarray(state.params[k], np.float64)   # follow the run (no drift build-up)


def test_server_hyperparameters_are_traced(data):
  client = optax.sgd(0.2)
  algo = fm.algorithms.fedadam(bce_loss, client_optimizer=client, batch_size=2,
                               server_learning_rate=0.01)
  state = algo.init(init_params())
  state, _ = algo.round(state, data, jax.random.PRNGKey(0))
  with count_compilations() as compiles:
    state = fm.set_hyperparams(state, server={"learning_rate": 0.1, "tau": 1e-8})
    state, _ = algo.round(state, data, jax.random.PRNGKey(1))
    # A second FedAdam with other server values shares the compiled round.
    again = fm.algorithms.fedadam(bce_loss, client_optimizer=client, batch_size=2,
                                  server_learning_rate=0.5, beta1=0.5)
    state2, _ = again.round(again.init(init_params()), data, jax.random.PRNGKey(1))
    jax.block_until_ready((state, state2))
  assert compiles[0] == 0


def test_fedopt_rejects_server_optimizer_option():
  with pytest.raises(ValueError, match="unknown option.*server_optimizer"):
    fm.algorithms.fedadam(bce_loss, client_optimizer=optax.sgd(0.1), server_learning_rate=0.1,
                          server_optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError):
    fm.algorithms.fedyogi(bce_loss, client_optimizer=optax.sgd(0.1), server_learning_rate=0.1,
                          beta1=1.5)
