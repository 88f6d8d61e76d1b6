"""F(w) = sum_k (n_k/n) F_k(w), checked by hand and against a NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, np_bce_mean, to_np


def test_weighted_objective_matches_numpy(sites, data):
  params = init_params()
  w, b = to_np(params)
  n = sum(len(y) for _, y in sites)
  expected = sum(len(y) / n * np_bce_mean(w, b, x.astype(np.float64), y) for x, y in sites)
  got = fm.weighted_objective(bce_loss, params, data)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # ... which is the mean over all pooled rows for a per-example loss.
  xs = np.concatenate([x for x, _ in sites]).astype(np.float64)
  ys = np.concatenate([y for _, y in sites])
  np.testing.assert_allclose(got, np_bce_mean(w, b, xs, ys), rtol=1e-6)
  per_site = fm.site_objectives(bce_loss, params, data)
  np.testing.assert_allclose(
      per_site, [np_bce_mean(w, b, x.astype(np.float64), y) for x, y in sites], rtol=1e-6)
  np.testing.assert_allclose(fm.site_weights(data), [7 / 15, 3 / 15, 5 / 15], rtol=1e-7)


def test_hand_computable_case():
  """Two sites, squared loss of a scalar 'mean' model: values known exactly."""
  loss = lambda p, x, y: (p - x[:, 0]) ** 2
  data = fm.FederatedData.from_sites([(np.array([[1.0], [3.0]]), np.zeros(2)),
                                      (np.array([[6.0]]), np.zeros(1))])
  # F_1(0) = (1 + 9)/2 = 5, F_2(0) = 36; F = 2/3 * 5 + 1/3 * 36 = 46/3
  np.testing.assert_allclose(fm.weighted_objective(loss, jnp.float32(0.0), data), 46 / 3,
                             rtol=1e-6)
  # Its minimiser is the pooled mean 10/3; the gradient vanishes there.
  g = jax.grad(lambda p: fm.weighted_objective(loss, p, data))(jnp.float32(10 / 3))
  np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_empty_site_and_padding_change_nothing(sites):
  params = init_params()
  base = fm.weighted_objective(bce_loss, params, fm.FederatedData.from_sites(sites))
  with_empty = fm.FederatedData.from_sites(sites + [(np.zeros((0, 3)), np.zeros(0))])
  padded = fm.FederatedData.from_sites(sites, pad_to=20)
  np.testing.assert_allclose(fm.weighted_objective(bce_loss, params, with_empty), base,
                             rtol=1e-7)
  np.testing.assert_allclose(fm.weighted_objective(bce_loss, params, padded), base,
                             rtol=1e-7)


def test_batch_level_loss_sees_mask():
  @fm.batch_loss
  def mean_of_max(params, x, y, mask):
    # Not a sum of per-example terms: the max over the real rows.
    return jnp.max(jnp.where(mask, x[:, 0] * params, -jnp.inf))

  data = fm.FederatedData.from_sites([(np.array([[1.0], [5.0]]), np.zeros(2)),
                                      (np.array([[2.0]]), np.zeros(1))], pad_to=4)
  # F_1 = 5, F_2 = 2, weights 2/3, 1/3 -> 4.
  np.testing.assert_allclose(fm.weighted_objective(mean_of_max, jnp.float32(1.0), data),
                             4.0, rtol=1e-6)


def test_loss_shape_contract_is_enforced(data):
  scalar_loss = lambda p, x, y: jnp.mean(bce_loss(p, x, y))
  with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
    fm.weighted_objective(scalar_loss, init_params(), data)
