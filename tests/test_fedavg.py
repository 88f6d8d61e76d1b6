"""FedAvg: vmapped round == a sequential per-client reference loop, plus the invariants.

The reference loop is plain Python/NumPy in float64: one client after another,
its own batches in the order of `fm.epoch_permutation` (or stored order with
shuffle=False), SGD on the mean BCE of each batch's real rows, then
w <- sum_k p_k w_k.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import (bce_loss, count_compilations, init_params, make_sites, ref_local_sgd,
                      ref_order, to_np)


def reference_local_sgd(w, b, x, y, lr, batch, mask_row, round_key, site_id, **kwargs):
  return ref_local_sgd(w, b, x, y, lr, batch, mask_row,
                       jax.random.fold_in(round_key, site_id), **kwargs)


def _order(round_key, site_id, epoch, mask_row, n_k, shuffle):
  return ref_order(jax.random.fold_in(round_key, site_id), epoch, mask_row, n_k, shuffle)


def reference_fedavg_round(params, sites, mask, lr, batch, round_key, weighting="num_examples",
                           server_lr=1.0, **schedule):
  w, b = to_np(params)
  locals_, sizes = [], []
  for k, (x, y) in enumerate(sites):
    locals_.append(reference_local_sgd(w, b, x, y, lr, batch, mask[k], round_key, k,
                                       **schedule))
    sizes.append(len(y))
  sizes = np.asarray(sizes, np.float64)
  p = sizes / sizes.sum() if weighting == "num_examples" else (sizes > 0) / (sizes > 0).sum()
  delta_w = sum(pk * (w - wk) for pk, (wk, _, _) in zip(p, locals_))
  delta_b = sum(pk * (b - bk) for pk, (_, bk, _) in zip(p, locals_))
  return w - server_lr * delta_w, b - server_lr * delta_b, [s for _, _, s in locals_]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fedavg_equals_sequential_reference(shuffle, weighting):
  sites = make_sites([9, 2, 5, 4], seed=3)
  data = fm.FederatedData.from_sites(sites)
  mask = np.asarray(data.mask)
  params = init_params()
  lr, batch, epochs = 0.3, 2, 3
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(lr), local_epochs=epochs,
                              batch_size=batch, weighting=weighting, shuffle=shuffle)
  state = algo.init(params)
  for r in range(3):
    key = jax.random.PRNGKey(100 + r)
    w, b, steps = reference_fedavg_round(state.params, sites, mask, lr, batch, key,
                                         weighting, epochs=epochs, shuffle=shuffle)
    state, metrics = algo.round(state, data, key)
    np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.params["b"], b, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(metrics["client_steps"], steps)
    # Exactly E * ceil(n_k / B) steps per client.
    np.testing.assert_array_equal(steps, [epochs * math.ceil(len(y) / batch) for _, y in sites])


def test_fedavg_local_steps_cycle_like_reference():
  """local_steps larger than a site's data: the stream restarts with a new shuffle."""
  sites = make_sites([5, 2, 3], seed=4)
  data = fm.FederatedData.from_sites(sites)
  mask = np.asarray(data.mask)
  params = init_params()
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), local_steps=7,
                              batch_size=2)
  key = jax.random.PRNGKey(7)
  w, b, steps = reference_fedavg_round(params, sites, mask, 0.2, 2, key, steps=7)
  state, metrics = algo.round(algo.init(params), data, key)
  np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(state.params["b"], b, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(metrics["client_steps"], [7, 7, 7])


def test_fedavg_server_lr_scales_pseudo_gradient(sites, data):
  params = init_params()
  key = jax.random.PRNGKey(3)
  w, b, _ = reference_fedavg_round(params, sites, np.asarray(data.mask), 0.1, 3, key,
                                   server_lr=0.5, epochs=2)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.1), local_epochs=2,
                              batch_size=3, server_optimizer=optax.sgd(0.5))
  state, _ = algo.round(algo.init(params), data, key)
  np.testing.assert_allclose(state.params["w"], w, rtol=2e-5, atol=2e-6)


def test_fedavg_adam_clients_match_per_client_loop(sites, data):
  """Stateful client optimizer: vmapped == each client alone (fresh Adam each round)."""
  params = init_params()
  opt = optax.adam(0.05)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=opt, local_epochs=2, batch_size=2)
  key = jax.random.PRNGKey(11)
  state, _ = algo.round(algo.init(params), data, key)
  grad = jax.grad(lambda p, x, y: jnp.mean(bce_loss(p, x, y)))
  mask = np.asarray(data.mask)
  local_models, n = [], []
  for k, (x, y) in enumerate(sites):
    p, s = params, opt.init(params)
    per_epoch = math.ceil(len(y) / 2)
    for t in range(2 * per_epoch):
      epoch, j = divmod(t, per_epoch)
      rows = _order(key, k, epoch, mask[k], len(y), True)[j * 2:(j + 1) * 2]
      u, s = opt.update(grad(p, x[rows], y[rows]), s, p)
      p = optax.apply_updates(p, u)
    local_models.append(p)
    n.append(len(y))
  p_k = np.asarray(n) / sum(n)
  want = sum(pk * np.asarray(m["w"], np.float64) for pk, m in zip(p_k, local_models))
  np.testing.assert_allclose(state.params["w"], want, rtol=1e-5, atol=1e-6)


def _run(algo, params, data, rounds=2, seed=0):
  state = algo.init(params)
  run_key = jax.random.PRNGKey(seed)
  for r in range(rounds):
    state, _ = algo.round(state, data, jax.random.fold_in(run_key, r))
  return state.params


@pytest.fixture
def algo():
  return fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), local_epochs=2,
                              batch_size=2)


def _close(a, b, rtol=1e-6, atol=1e-7):
  for name in ("w", "b"):
    np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol)


def test_padding_rows_change_nothing(algo, sites):
  params = init_params()
  base = _run(algo, params, fm.FederatedData.from_sites(sites))
  _close(_run(algo, params, fm.FederatedData.from_sites(sites, pad_to=16)), base)


def test_empty_site_changes_nothing(algo, sites):
  params = init_params()
  base = _run(algo, params, fm.FederatedData.from_sites(sites))
  empty = (np.zeros((0, 3), np.float32), np.zeros((0,), np.float32))
  _close(_run(algo, params, fm.FederatedData.from_sites(sites + [empty])), base)
  # Inserted in the middle, the other sites keeping their ids (and so their keys).
  middle = fm.FederatedData.from_sites([sites[0], empty, sites[1], sites[2]],
                                       site_ids=[0, 7, 1, 2])
  _close(_run(algo, params, middle), base)
  for weighting in ("uniform",):
    uni = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), local_epochs=2,
                               batch_size=2, weighting=weighting)
    _close(_run(uni, params, middle), _run(uni, params, fm.FederatedData.from_sites(sites)))


def test_permuting_sites_changes_nothing(algo, data):
  params = init_params()
  base = _run(algo, params, data)
  for perm in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
    _close(_run(algo, params, data.subset(perm)), base)


def test_uniform_and_weighted_differ_as_the_formula_says(sites, data):
  params = init_params()
  key = jax.random.PRNGKey(5)
  kwargs = dict(client_optimizer=optax.sgd(0.2), local_epochs=2, batch_size=2)
  weighted = fm.algorithms.fedavg(bce_loss, weighting="num_examples", **kwargs)
  uniform = fm.algorithms.fedavg(bce_loss, weighting="uniform", **kwargs)
  # Each site's local model: FedAvg on that site alone (same id, same key).
  local = [weighted.round(weighted.init(params), data.subset([k]), key)[0].params
           for k in range(3)]
  n = np.array([len(y) for _, y in sites], np.float64)
  w_loc = np.stack([np.asarray(m["w"], np.float64) for m in local])
  w_weighted = weighted.round(weighted.init(params), data, key)[0].params["w"]
  w_uniform = uniform.round(uniform.init(params), data, key)[0].params["w"]
  np.testing.assert_allclose(w_weighted, (n / n.sum()) @ w_loc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_uniform, w_loc.mean(0), rtol=1e-5, atol=1e-6)
  # Their difference is exactly sum_k (n_k/n - 1/K) w_k.
  np.testing.assert_allclose(np.asarray(w_weighted) - np.asarray(w_uniform),
                             (n / n.sum() - 1 / 3) @ w_loc, atol=2e-6)
  assert np.abs(np.asarray(w_weighted) - np.asarray(w_uniform)).max() > 1e-3


def test_same_seed_bit_identical_different_seed_differs(algo, data):
  params = init_params()
  a = _run(algo, params, data, rounds=3, seed=1)
  b = _run(algo, params, data, rounds=3, seed=1)
  c = _run(algo, params, data, rounds=3, seed=2)
  for name in ("w", "b"):
    assert np.array_equal(np.asarray(a[name]), np.asarray(b[name]))
  assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))


def test_no_recompilation_across_rounds_and_changed_hyperparameters(data):
  params = init_params()
  client_opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  server_opt = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=client_opt,
                              server_optimizer=server_opt, local_epochs=1, batch_size=2)
  state = algo.init(params)
  state, _ = algo.round(state, data, jax.random.PRNGKey(0))        # compiles once
  jax.block_until_ready(state)
  with count_compilations() as compiles:
    for r in range(1, 6):
      state, _ = algo.round(state, data, jax.random.PRNGKey(r))
    before = np.asarray(state.params["w"])
    state = fm.set_hyperparams(state, client={"learning_rate": 0.01},
                               server={"learning_rate": 0.5})
    state, _ = algo.round(state, data, jax.random.PRNGKey(9))
    # Same data shapes, new values: still no compile.
    other = fm.FederatedData.from_sites([(x + 1.0, y) for x, y in data.sites()])
    state, _ = algo.round(state, other, jax.random.PRNGKey(10))
    # A new algorithm object built from the same pieces shares the compiled round.
    again = fm.algorithms.fedavg(bce_loss, client_optimizer=client_opt,
                                 server_optimizer=server_opt, local_epochs=1, batch_size=2)
    state, _ = again.round(state, data, jax.random.PRNGKey(11))
    jax.block_until_ready(state)
  assert compiles[0] == 0
  assert not np.array_equal(before, np.asarray(state.params["w"]))


def test_changed_learning_rate_takes_effect(sites, data):
  """set_hyperparams really changes the step (not just the stored number)."""
  params = init_params()
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.3)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=opt, local_epochs=1, batch_size=2)
  key = jax.random.PRNGKey(2)
  state = fm.set_hyperparams(algo.init(params), client={"learning_rate": 0.05})
  got = algo.round(state, data, key)[0].params
  w, b, _ = reference_fedavg_round(params, sites, np.asarray(data.mask), 0.05, 2, key,
                                   epochs=1)
  np.testing.assert_allclose(got["w"], w, rtol=2e-5, atol=2e-6)


def test_set_hyperparams_rejects_untraced(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.1), batch_size=2)
  state = algo.init(init_params())
  with pytest.raises(ValueError, match="inject_hyperparams"):
    fm.set_hyperparams(state, client={"learning_rate": 0.5})
  with pytest.raises(ValueError, match="unknown algorithm hyperparameter"):
    fm.set_hyperparams(state, mu=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weighting="by_size"), r"fedavg: unknown weighting 'by_size'"),
    (dict(batch_size=0), r"fedavg: batch_size must be an integer >= 1"),
    (dict(batch_size=2.5), r"batch_size"),
    (dict(local_epochs=0), r"local_epochs must be an integer >= 1"),
    (dict(local_epochs=1, local_steps=3), r"not both"),
    (dict(local_epoch=2), r"unknown option.*'local_epoch'.*did you mean 'local_epochs'"),
    (dict(client_optimizer="sgd"), r"client_optimizer must be an optax"),
])
def test_bad_options_raise_value_error(kwargs, match):
  base = dict(client_optimizer=optax.sgd(0.1), batch_size=2)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fm.algorithms.fedavg(bce_loss, **base)


def test_fedsgd_bad_options():
  with pytest.raises(ValueError, match=r"fedsgd: unknown weighting"):
    fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0), weighting="n")
  with pytest.raises(ValueError, match=r"unknown option.*'lr'"):
    fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(1.0), lr=0.1)


def test_round_rejects_wrong_data_type(algo):
  state = algo.init(init_params())
  with pytest.raises(TypeError, match="FederatedData"):
    algo.round(state, {"x": np.zeros((2, 3, 3))}, jax.random.PRNGKey(0))


def test_gradient_estimator_hook_gets_traced_hparams_and_step_keys(data):
  """A custom estimator: gradient * scale + 0 * noise(step key); keys differ per step."""
  seen = []

  def build(loss_fn, hparams):
    base = fm.core.objective.loss_and_grad(loss_fn)

    def grad_fn(params, x, y, mask, key):
      loss, grads = base(params, x, y, mask)
      seen.append(key.shape)
      noise = jax.random.normal(key, ())
      return loss, jax.tree_util.tree_map(lambda g: hparams["scale"] * g + 0.0 * noise, grads)

    return grad_fn

  estimator = fm.core.objective.GradientEstimator(build, {"scale": 1.0})
  common = dict(client_optimizer=optax.sgd(0.2), local_epochs=1, batch_size=2)
  custom = fm.algorithms.fedavg(bce_loss, gradient_estimator=estimator, **common)
  plain = fm.algorithms.fedavg(bce_loss, **common)
  params = init_params()
  key = jax.random.PRNGKey(0)
  state = custom.init(params)
  assert float(state.hparams["scale"]) == 1.0
  a = custom.round(state, data, key)[0].params
  b = plain.round(plain.init(params), data, key)[0].params
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
  frozen = custom.round(fm.set_hyperparams(state, scale=0.0), data, key)[0].params
  np.testing.assert_array_equal(frozen["w"], params["w"])
  assert seen  # traced with a key argument


def test_downlink_hook_clients_train_from_what_they_receive(data):
  """downlink(w) = w + 0.5: equals FedAvg started from w + 0.5, applied to the exact w."""
  shift = lambda w, key: (jax.tree_util.tree_map(lambda a: a + 0.5, w), {"bytes_down": 7})
  common = dict(client_optimizer=optax.sgd(0.2), local_epochs=1, batch_size=2)
  algo = fm.algorithms.fedavg(bce_loss, downlink=shift, **common)
  plain = fm.algorithms.fedavg(bce_loss, **common)
  params = init_params()
  shifted = jax.tree_util.tree_map(lambda a: a + 0.5, params)
  key = jax.random.PRNGKey(3)
  got, metrics = algo.round(algo.init(params), data, key)
  ref = plain.round(plain.init(shifted), data, key)[0].params
  # w_new = w - (w_received - mean w_k) = ref - 0.5
  np.testing.assert_allclose(got.params["w"], np.asarray(ref["w"]) - 0.5, rtol=1e-6, atol=1e-6)
  assert int(metrics["bytes_down"]) == 7
