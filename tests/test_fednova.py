"""FedNova: equal step counts give FedAvg; unequal ones follow the normalised formula."""

import jax
import numpy as np
import optax

import fedjax_med as fm
from conftest import bce_loss, init_params


def test_equal_steps_equal_fedavg(data):
  params = init_params()
  key = jax.random.PRNGKey(3)
  common = dict(client_optimizer=optax.sgd(0.2), local_steps=4, batch_size=2)
  nova = fm.algorithms.fednova(bce_loss, **common)
  avg = fm.algorithms.fedavg(bce_loss, **common)
  a = nova.round(nova.init(params), data, key)
  b = avg.round(avg.init(params), data, key)
  np.testing.assert_allclose(a[0].params["w"], b[0].params["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(a[1]["tau_eff"], 4.0, rtol=1e-6)


def test_unequal_steps_follow_wang_et_al(sites, data):
  params = init_params()
  key = jax.random.PRNGKey(5)
  common = dict(client_optimizer=optax.sgd(0.2), local_epochs=1, batch_size=2)
  nova = fm.algorithms.fednova(bce_loss, **common)
  avg = fm.algorithms.fedavg(bce_loss, **common)
  # Each site's local model: FedAvg on that site alone (same id -> same key).
  w0 = np.asarray(params["w"], np.float64)
  local = [np.asarray(avg.round(avg.init(params), data.subset([k]), key)[0].params["w"])
           for k in range(3)]
  n = np.array([len(y) for _, y in sites], np.float64)
  tau = np.ceil(n / 2)
  p = n / n.sum()
  d = sum(pk * (w0 - wk) / tk for pk, wk, tk in zip(p, local, tau))
  want = w0 - (p @ tau) * d
  got, metrics = nova.round(nova.init(params), data, key)
  np.testing.assert_allclose(got.params["w"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics["client_steps"], tau)
  np.testing.assert_allclose(metrics["tau_eff"], p @ tau, rtol=1e-6)
  # ... which is not FedAvg here (7, 3, 5 rows -> 4, 2, 3 steps).
  fedavg_w = np.asarray(avg.round(avg.init(params), data, key)[0].params["w"])
  assert np.abs(fedavg_w - want).max() > 1e-4
