"""Cyclic: sites one after another in a key-derived order; K = 1 is local training."""

import jax
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med.algorithms.cyclic import ORDER_STREAM
from conftest import bce_loss, init_params, make_sites, ref_local_sgd, to_np


def ref_visit_order(key, site_ids):
  """The documented order: ascending U(fold_in(fold_in(key, ORDER_STREAM), id)), by id."""
  order_key = jax.random.fold_in(key, ORDER_STREAM)
  draws = [float(jax.random.uniform(jax.random.fold_in(order_key, i))) for i in site_ids]
  return np.argsort(draws, kind="stable")


def test_single_site_equals_local_training():
  sites = make_sites([9])
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  common = dict(local_epochs=2, batch_size=2)
  cyc = fm.algorithms.cyclic(bce_loss, client_optimizer=optax.sgd(0.3), **common)
  loc = fm.algorithms.local_only(bce_loss, optimizer=optax.sgd(0.3), **common)
  s_c, s_l = cyc.init(params), loc.init(params, 1)
  for r in range(3):
    s_c, _ = cyc.round(s_c, data, jax.random.PRNGKey(r))
    s_l, _ = loc.round(s_l, data, jax.random.PRNGKey(r))
  np.testing.assert_allclose(s_c.params["w"], s_l.client_states["params"]["w"][0],
                             rtol=1e-6, atol=1e-7)


def test_cyclic_equals_sequential_reference(sites, data):
  params = init_params()
  key = jax.random.PRNGKey(6)
  algo = fm.algorithms.cyclic(bce_loss, client_optimizer=optax.sgd(0.25), local_epochs=1,
                              batch_size=2)
  state, metrics = algo.round(algo.init(params), data, key)
  order = ref_visit_order(key, [0, 1, 2])
  np.testing.assert_array_equal(metrics["visit_order"], order)
  w, b = to_np(params)
  mask = np.asarray(data.mask)
  for k in order:
    x, y = sites[k]
    w, b, _ = ref_local_sgd(w, b, x, y, 0.25, 2, mask[k], jax.random.fold_in(key, int(k)),
                            epochs=1)
  np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(state.params["b"], b, rtol=2e-5, atol=2e-6)


def test_order_changes_with_the_round_key(data):
  algo = fm.algorithms.cyclic(bce_loss, client_optimizer=optax.sgd(0.1), batch_size=2)
  state = algo.init(init_params())
  orders = {tuple(np.asarray(algo.round(state, data, jax.random.PRNGKey(r))[1]["visit_order"]))
            for r in range(12)}
  assert len(orders) > 1


def test_empty_site_and_permutation_leave_the_visits_unchanged(sites):
  """Issue 17 defect 10: adding an empty site changed the visit order (the
  permutation was drawn over C positions). Now the order follows site ids:
  the result equals the float64 sequential loop in the id-derived order."""
  params = init_params()
  empty = (np.zeros((0, 3), np.float32), np.zeros(0, np.float32))
  padded = fm.FederatedData.from_sites([sites[2], empty, sites[0], sites[1]],
                                       site_ids=[2, 7, 0, 1])
  algo = fm.algorithms.cyclic(bce_loss, client_optimizer=optax.sgd(0.25), local_epochs=1,
                              batch_size=2)
  w0, b0 = to_np(params)
  plain = fm.FederatedData.from_sites(sites)
  for r in range(6):
    key = jax.random.PRNGKey(100 + r)
    state, _ = algo.round(algo.init(params), padded, key)
    w, b = w0, b0
    mask = np.asarray(plain.mask)
    for k in ref_visit_order(key, [0, 1, 2]):
      x, y = sites[k]
      w, b, _ = ref_local_sgd(w, b, x, y, 0.25, 2, mask[k], jax.random.fold_in(key, int(k)),
                              epochs=1)
    np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.params["b"], b, rtol=2e-5, atol=2e-6)
