"""FedSGD round == one gradient step on the pooled objective."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, np_bce_grad, to_np


@pytest.mark.parametrize("lr", [0.1, 0.7])
def test_fedsgd_is_one_step_on_weighted_objective(data, lr):
  params = init_params()
  algo = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(lr))
  state, metrics = algo.round(algo.init(params), data, jax.random.PRNGKey(0))
  grad = jax.grad(lambda p: fm.weighted_objective(bce_loss, p, data))(params)
  expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grad)
  for name in ("w", "b"):
    np.testing.assert_allclose(state.params[name], expected[name], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["train_loss"],
                             fm.weighted_objective(bce_loss, params, data), rtol=1e-6)


def test_fedsgd_matches_numpy_pooled_gradient(sites, data):
  params = init_params()
  w, b = to_np(params)
  xs = np.concatenate([x for x, _ in sites]).astype(np.float64)
  ys = np.concatenate([y for _, y in sites]).astype(np.float64)
  gw, gb = np_bce_grad(w, b, xs, ys)
  algo = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(0.5))
  state = algo.init(params)
  for r in range(3):
    state, _ = algo.round(state, data, jax.random.PRNGKey(r))
    w, b = w - 0.5 * gw, b - 0.5 * gb
    gw, gb = np_bce_grad(w, b, xs, ys)
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], b, rtol=1e-5, atol=1e-6)


def test_fedsgd_uniform_weights_sites_equally(sites, data):
  params = init_params()
  w, b = to_np(params)
  grads = [np_bce_grad(w, b, x.astype(np.float64), y) for x, y in sites]
  gw = np.mean([g[0] for g in grads], axis=0)
  gb = np.mean([g[1] for g in grads])
  algo = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0), weighting="uniform")
  state, _ = algo.round(algo.init(params), data, jax.random.PRNGKey(0))
  np.testing.assert_allclose(state.params["w"], w - gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], b - gb, rtol=1e-5, atol=1e-6)


def test_fedsgd_empty_site_contributes_nothing(sites):
  params = init_params()
  for weighting in ("num_examples", "uniform"):
    algo = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0),
                                weighting=weighting)
    empty = fm.FederatedData.from_sites(sites[:1] + [(np.zeros((0, 3)), np.zeros(0))]
                                        + sites[1:])
    got = algo.round(algo.init(params), empty, jax.random.PRNGKey(0))[0].params
    ref = fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0),
                               weighting=weighting)
    want = ref.round(ref.init(params), fm.FederatedData.from_sites(sites),
                     jax.random.PRNGKey(0))[0].params
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
