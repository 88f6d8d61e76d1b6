"""Cyclic: sites one after another in a key-derived order; K = 1 is local training."""

import jax
import numpy as np
import optax
import pytest

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


def test_local_steps_cohort_server_step_and_traced_lr_match_reference(sites, data):
  """local_steps, a cohort of 2, a server step sgd(0.5) and a client learning rate set
  with set_hyperparams (traced, reached through the kit's client context): float64 loop
  over the cohort's sites in the id-derived order, then w <- w - 0.5 (w - w_end)."""
  params = init_params()
  client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.25)
  algo = fm.algorithms.cyclic(bce_loss, client_optimizer=client, local_steps=3, batch_size=2,
                              cohort_size=2, server_optimizer=optax.sgd(0.5))
  state = algo.init(params)
  mask = np.asarray(data.mask)
  w, b = to_np(params)
  for r, lr in enumerate([0.25, 0.1]):
    state = fm.set_hyperparams(state, client={"learning_rate": lr})
    key = jax.random.PRNGKey(40 + r)
    state, metrics = algo.round(state, data, key)
    cohort = np.asarray(metrics["cohort"])
    assert len(set(cohort.tolist())) == 2
    order = cohort[ref_visit_order(key, cohort.tolist())]
    np.testing.assert_array_equal(metrics["visit_order"], order)
    we, be = w, b
    for k in order:
      x, y = sites[k]
      we, be, taken = ref_local_sgd(we, be, x, y, lr, 2, mask[k],
                                    jax.random.fold_in(key, int(k)), steps=3)
      assert taken == 3
    w, b = w - 0.5 * (w - we), b - 0.5 * (b - be)
    np.testing.assert_array_equal(metrics["client_steps"], [3, 3])
    np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.params["b"], b, rtol=2e-5, atol=2e-6)


def test_kit_pieces_for_rounds_of_another_shape():
  """fm.kit.make_config / initial_state / client_context (what Cyclic and FedBuff
  are built from): the checks, defaults and initial state build_algorithm documents;
  the server optimizer's state is optax's own init."""
  kit = fm.kit
  with pytest.raises(fm.OptionError, match="give local_epochs or local_steps, not both"):
    kit.make_config("mine", bce_loss, client_optimizer=optax.sgd(0.1), local_epochs=1,
                    local_steps=2)
  with pytest.raises(fm.OptionError, match="mine: unknown weighting 'nope'"):
    kit.make_config("mine", bce_loss, client_optimizer=optax.sgd(0.1), weighting="nope")
  with pytest.raises(fm.OptionError, match="client_update must be a function"):
    kit.make_config("mine", bce_loss, client_optimizer=optax.sgd(0.1), client_update=3)
  client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.25, momentum=0.5)
  server = optax.adam(0.1)
  config, estimator = kit.make_config("mine", bce_loss, client_optimizer=client,
                                      server_optimizer=server, batch_size=4, static=("s", 1))
  assert config.name == "mine" and config.static == ("s", 1)
  assert config.schedule == fm.LocalSchedule(batch_size=4, epochs=1, steps=None, shuffle=True)
  assert config.client_update is kit.fedavg_client_update
  assert config.server_update is kit.apply_server_update
  assert estimator.hparams == {}
  params = init_params()
  state = kit.initial_state(config, params, hparams={"alpha": 2.0},
                            client_hparams={"momentum": 0.0})
  assert state.client_hparams == {"learning_rate": np.float32(0.25), "momentum": np.float32(0.0)}
  assert state.hparams == {"alpha": np.float32(2.0)} and int(state.round) == 0
  want = server.init(params)
  got_leaves, got_tree = jax.tree_util.tree_flatten(state.server_opt_state)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree
  for a, b in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(a, b)
  ctx = kit.client_context(config, state)
  assert ctx.config is config and ctx.hparams is state.hparams
  assert ctx.client_hparams is state.client_hparams and ctx.round is state.round
