"""Device availability wrapper: p = 1 is the full round, offline = empty, skips, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.algorithms.availability import (AVAILABILITY_STREAM, online_sites,
                                                with_availability)
from conftest import bce_loss, init_params, make_sites, ref_local_sgd, to_np

SIZES = [7, 3, 5, 6]
SGD = optax.sgd(0.1)   # one object: algorithms built from it share compiled rounds


@pytest.fixture(scope="module")
def data():
  return fm.FederatedData.from_sites(make_sites(SIZES), label_type="binary")


@pytest.fixture(scope="module")
def fedavg():
  return fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, local_epochs=1,
                              batch_size=2)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def reference_online(p, site_ids, key):
  """U_k < p_k with U_k from fold_in(fold_in(key, STREAM), id), written out here."""
  sub = jax.random.fold_in(key, AVAILABILITY_STREAM)
  u = np.array([float(jax.random.uniform(jax.random.fold_in(sub, int(i)))) for i in site_ids])
  return u < p


def offline_removed(data, online):
  """The same federation with the offline sites' rows removed (n_k = 0)."""
  sites = []
  for k, (x, y) in enumerate(data.sites()):
    sites.append((x, y) if online[k] else (x[:0], y[:0]))
  return fm.FederatedData.from_sites(sites, label_type=data.label_type,
                                     site_ids=np.asarray(data.site_ids), pad_to=data.max_examples)


def test_probability_one_is_the_full_participation_round(data, fedavg):
  wrapped = with_availability(fedavg, 1.0)
  params = init_params()
  state = fedavg.init(params)
  wstate = wrapped.init(params)
  for r in range(3):
    key = jax.random.PRNGKey(r)
    state, m = fedavg.round(state, data, key)
    wstate, wm = wrapped.round(wstate, data, key)
    assert_trees_equal(state.params, wstate.params)
    assert bool(np.all(wm["online"])) and not bool(wm["skipped"])
    np.testing.assert_array_equal(np.asarray(m["client_train_loss"]),
                                  np.asarray(wm["client_train_loss"]))
  assert int(wstate.round) == 3


@pytest.mark.parametrize("which", ["scaffold", "ditto"])
def test_probability_one_equals_stateful_algorithms(data, which):
  if which == "scaffold":
    algo = fm.algorithms.scaffold(bce_loss, client_learning_rate=0.1, local_epochs=1,
                                  batch_size=2)
  else:
    algo = fm.algorithms.ditto(bce_loss, lam=0.1, client_optimizer=SGD,
                               local_epochs=1, batch_size=2)
  wrapped = with_availability(algo, [1.0] * 4)
  params = init_params()
  state, wstate = algo.init(params, 4), wrapped.init(params, 4)
  key = jax.random.PRNGKey(5)
  state, _ = algo.round(state, data, key)
  wstate, _ = wrapped.round(wstate, data, key)
  assert_trees_equal(state.params, wstate.params)
  assert_trees_equal(state.client_states, wstate.client_states)


def test_offline_sites_are_exactly_empty_sites(data):
  ditto = fm.algorithms.ditto(bce_loss, lam=0.1, client_optimizer=SGD,
                              local_epochs=1, batch_size=2)
  wrapped = with_availability(ditto, 0.5)
  params = init_params()
  wstate = wrapped.init(params, 4)
  seen_offline = 0
  for r in range(6):
    key = jax.random.PRNGKey(100 + r)
    online = reference_online(0.5, np.asarray(data.site_ids), key)
    wstate_new, wm = wrapped.round(wstate, data, key)
    np.testing.assert_array_equal(np.asarray(wm["online"]), online)
    if not online.any():
      continue
    seen_offline += int((~online).sum())
    ref, _ = ditto.round(wstate._replace(hparams={"lam": wstate.hparams["lam"]}),
                         offline_removed(data, online), key)
    assert_trees_equal(ref.params, wstate_new.params)
    assert_trees_equal(ref.client_states, wstate_new.client_states)
    # Offline sites' personal models did not move.
    for k in np.flatnonzero(~online):
      assert_trees_equal(jax.tree_util.tree_map(lambda a: a[k], wstate.client_states),
                         jax.tree_util.tree_map(lambda a: a[k], wstate_new.client_states))
    wstate = wstate_new
  assert seen_offline > 0


def test_fedavg_with_availability_matches_numpy_loop(data):
  """Independent check: FedAvg over the online sites only, as a float64 loop
  (McMahan et al.'s w <- sum_{k online} n_k w_k / sum_{k online} n_k; a round
  with nobody online leaves w unchanged)."""
  wrapped = with_availability(fm.algorithms.fedavg(bce_loss, client_optimizer=SGD,
                                                   local_epochs=1, batch_size=2), 0.5)
  params = init_params()
  state = wrapped.init(params)
  sites = make_sites(SIZES)
  mask = np.asarray(data.mask)
  w, b = to_np(params)
  n = np.array(SIZES, np.float64)
  seen = set()
  for r in range(5):
    key = jax.random.PRNGKey(200 + r)
    state, _ = wrapped.round(state, data, key)
    online = reference_online(0.5, np.arange(4), key)
    seen.add(int(online.sum()))
    if online.any():
      runs = [ref_local_sgd(w, b, x, y, 0.1, 2, mask[k], jax.random.fold_in(key, k), epochs=1)
              for k, (x, y) in enumerate(sites)]
      p = np.where(online, n, 0.0) / np.sum(np.where(online, n, 0.0))
      w = sum(pk * rk[0] for pk, rk in zip(p, runs))
      b = sum(pk * rk[1] for pk, rk in zip(p, runs))
    # measured max abs error 4.9e-8 over 5 rounds (|w| < 1); tolerance ~4x above.
    np.testing.assert_allclose(state.params["w"], w, rtol=0, atol=2e-7, err_msg=f"round {r}")
    np.testing.assert_allclose(state.params["b"], b, rtol=0, atol=2e-7, err_msg=f"round {r}")
  assert len(seen) > 1   # rounds with different numbers of online sites


def test_availability_frequency_and_site_id_keying():
  ids = jnp.arange(10, dtype=jnp.int32)
  draws = np.stack([np.asarray(online_sites(jnp.float32(0.3), ids, jax.random.PRNGKey(r)))
                    for r in range(300)])
  assert abs(draws.mean() - 0.3) < 0.03          # 3000 Bernoulli(0.3): sd 0.008
  assert 0.15 < draws.mean(axis=0).min() and draws.mean(axis=0).max() < 0.45
  key = jax.random.PRNGKey(7)
  perm = np.array([3, 1, 0, 2, 9, 8, 7, 6, 5, 4])
  a = np.asarray(online_sites(jnp.float32(0.5), ids, key))
  b = np.asarray(online_sites(jnp.float32(0.5), ids[perm], key))
  np.testing.assert_array_equal(a[perm], b)
  # Per-site probabilities: a site with p_k = 0 is never online.
  p = jnp.asarray([0.0] + [1.0] * 9, jnp.float32)
  assert not any(bool(online_sites(p, ids, jax.random.PRNGKey(r))[0]) for r in range(50))


def test_round_without_online_site_is_skipped(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, local_epochs=1,
                              batch_size=2, server_optimizer=optax.sgd(1.0, momentum=0.9))
  wrapped = with_availability(algo, 0.3)
  state = wrapped.init(init_params())
  # Build up server momentum with a round where someone is online.
  keys = [jax.random.PRNGKey(r) for r in range(200)]
  online = [reference_online(0.3, np.arange(4), k) for k in keys]
  first_active = next(k for k, o in zip(keys, online) if o.any())
  first_skip = next(k for k, o in zip(keys, online) if not o.any())
  state, m = wrapped.round(state, data, first_active)
  assert not bool(m["skipped"])
  after, m = wrapped.round(state, data, first_skip)
  assert bool(m["skipped"]) and int(m["num_online"]) == 0
  assert_trees_equal(state, after)                  # momentum did not move the model


def test_cohort_sampling_by_size_draws_online_sites_only(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, local_epochs=1,
                              batch_size=2, cohort_size=2, sampling="num_examples")
  wrapped = with_availability(algo, 0.5)
  state = wrapped.init(init_params())
  for r in range(8):
    _, m = wrapped.round(state, data, jax.random.PRNGKey(r))
    if bool(m["skipped"]):
      continue
    online = np.asarray(m["online"])
    assert online[np.asarray(m["cohort"])].all()


def test_traced_probability_and_run_seeds(data, fedavg):
  wrapped = with_availability(fedavg, 0.5)
  params = init_params()
  state = fm.set_hyperparams(wrapped.init(params), availability=1.0)
  full, _ = fedavg.round(fedavg.init(params), data, jax.random.PRNGKey(3))
  got, _ = wrapped.round(state, data, jax.random.PRNGKey(3))
  assert_trees_equal(full.params, got.params)
  keys = np.stack([jax.random.PRNGKey(s) for s in (0, 1)])
  states, hist = fm.run_seeds(wrapped, fm.stack_states([wrapped.init(params)] * 2), data, 3, keys)
  assert hist["online"].shape == (2, 3, 4)
  seq, _ = fm.run_rounds(wrapped, wrapped.init(params), data, 3, keys[1], progress=False)
  np.testing.assert_allclose(np.asarray(states.params["w"][1]), np.asarray(seq.params["w"]),
                             rtol=1e-6, atol=1e-7)


def test_bad_input(data, fedavg):
  with pytest.raises(fm.OptionError, match="probability 0"):
    with_availability(fedavg, 0.0)
  with pytest.raises(fm.OptionError, match="probability 0"):
    with_availability(fedavg, [0.0, 0.0])
  for bad in (-0.1, 1.5, float("nan"), "high", True, [[0.5]], []):
    with pytest.raises(fm.OptionError):
      with_availability(fedavg, bad)
  with pytest.raises(fm.OptionError, match="unknown option"):
    with_availability(fedavg, 0.5, seed=3)
  with pytest.raises(TypeError, match="FederatedAlgorithm"):
    with_availability(lambda s: s, 0.5)
  twice = with_availability(with_availability(fedavg, 0.5), 0.5)
  with pytest.raises(fm.OptionError, match="wrapped twice"):
    twice.init(init_params())
  wrong_k = with_availability(fedavg, [0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="K=4"):
    wrong_k.round(wrong_k.init(init_params()), data, jax.random.PRNGKey(0))
