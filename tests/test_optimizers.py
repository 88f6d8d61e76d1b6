"""FedAdagrad / FedAdam / FedYogi == a NumPy float64 transcription of Reddi et al. 2021.

The reference below is Algorithm 2 of "Adaptive Federated Optimization" (ICLR
2021) written as plain loops over rounds t with the aggregated model
difference Delta_t = sum_k p_k w_k - x_t given, in Reddi's (and FLamby's)
sign convention. The optax transformations receive fedjax_med's
pseudo-gradient g_t = -Delta_t and are applied with optax.apply_updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med import optimizers as fm_opt
from conftest import bce_loss, count_compilations, init_params, ref_local_sgd, to_np

ADAPTIVITIES = ("adagrad", "adam", "yogi")
FACTORIES = {"adagrad": fm_opt.server_adagrad, "adam": fm_opt.server_adam,
             "yogi": fm_opt.server_yogi}
# float32 against float64: measured max relative error 6.6e-6 (first-step closed
# form at |Delta| ~ tau) and max absolute error 1.0e-7 on O(1) parameters.
RTOL, ATOL = 1e-5, 3e-7


def reference_algorithm2(x0, deltas, adaptivity, eta, beta1, beta2, tau, v0):
  """Reddi et al. 2021, Algorithm 2, float64; leaves are lists of ndarrays.

  Returns the list of x_1..x_T, the final (m, v) and, for Yogi, how often
  sign(v_{t-1} - Delta_t^2) was +1 and -1 (to show both branches ran).
  """
  x = [np.asarray(a, np.float64).copy() for a in x0]
  m = [np.zeros_like(a) for a in x]
  v = [np.full_like(a, v0) for a in x]
  xs, signs = [], {1.0: 0, -1.0: 0, 0.0: 0}
  for delta in deltas:
    for i, d in enumerate(delta):
      d = np.asarray(d, np.float64)
      m[i] = beta1 * m[i] + (1 - beta1) * d
      if adaptivity == "adagrad":
        v[i] = v[i] + d * d
      elif adaptivity == "adam":
        v[i] = beta2 * v[i] + (1 - beta2) * d * d
      else:
        s = np.sign(v[i] - d * d)
        for value in (1.0, -1.0, 0.0):
          signs[value] += int(np.sum(s == value))
        v[i] = v[i] - (1 - beta2) * d * d * s
      x[i] = x[i] + eta * m[i] / (np.sqrt(v[i]) + tau)
    xs.append([a.copy() for a in x])
  return xs, m, v, signs


def random_deltas(num_steps, seed):
  """Two leaves, [3, 4] and [5], with a per-round scale so v rises and falls."""
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.uniform(-2.0, 1.0, size=num_steps))
  return [[(s * rng.normal(size=(3, 4))).astype(np.float32),
           (s * rng.normal(size=5)).astype(np.float32)] for s in scales]


def run_optax(opt, x0, deltas):
  """Applies `opt` to g_t = -Delta_t; returns the list of x_1..x_T and the state."""
  params = {"w": jnp.asarray(x0[0]), "b": jnp.asarray(x0[1])}
  state = opt.init(params)
  step = jax.jit(opt.update)
  xs = []
  for delta in deltas:
    g = {"w": -jnp.asarray(delta[0]), "b": -jnp.asarray(delta[1])}
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    xs.append([np.asarray(params["w"]), np.asarray(params["b"])])
  return xs, state


def fedopt_state(opt_state):
  """The ScaleByFedOptState inside a chain (optionally inside inject_hyperparams)."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, fm_opt.ScaleByFedOptState))
           if isinstance(s, fm_opt.ScaleByFedOptState)]
  assert len(found) == 1
  return found[0]


def first_update(opt, delta):
  """x_1 - x_0 for one array leaf, starting from x_0 = 0."""
  params = jnp.zeros_like(jnp.asarray(delta))
  updates, _ = opt.update(-jnp.asarray(delta), opt.init(params), params)
  return np.asarray(updates, np.float64)


@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
@pytest.mark.parametrize("v0", [0.0, 1e-3 ** 2, 0.05])
def test_matches_numpy_algorithm2(adaptivity, v0):
  eta, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-3
  deltas = random_deltas(12, seed=3)
  rng = np.random.default_rng(7)
  x0 = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
  ref_xs, ref_m, ref_v, signs = reference_algorithm2(x0, deltas, adaptivity, eta, beta1,
                                                     beta2, tau, v0)
  opt = FACTORIES[adaptivity](eta, beta1=beta1, beta2=beta2, tau=tau,
                              initial_accumulator_value=v0)
  got_xs, state = run_optax(opt, x0, deltas)
  for t, (got, ref) in enumerate(zip(got_xs, ref_xs)):
    for g, r in zip(got, ref):
      np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL, err_msg=f"round {t}")
  # The state holds m of g = -m of Delta, and v (sign-independent).
  inner = fedopt_state(state)
  np.testing.assert_allclose(inner.m["w"], -ref_m[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(inner.m["b"], -ref_m[1], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(inner.v["w"], ref_v[0], rtol=RTOL, atol=1e-9)
  np.testing.assert_allclose(inner.v["b"], ref_v[1], rtol=RTOL, atol=1e-9)
  if adaptivity == "yogi":  # the run exercised both branches of the sign rule
    assert signs[1.0] > 0 and signs[-1.0] > 0


@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
def test_scale_by_fedopt_chain_is_the_factory(adaptivity):
  deltas = random_deltas(4, seed=0)
  x0 = [np.zeros((3, 4), np.float32), np.zeros(5, np.float32)]
  chained = optax.chain(fm_opt.scale_by_fedopt(adaptivity, beta1=0.7, beta2=0.9, tau=0.01),
                        optax.scale_by_learning_rate(0.3))
  factory = FACTORIES[adaptivity](0.3, beta1=0.7, beta2=0.9, tau=0.01)
  for a, b in zip(run_optax(chained, x0, deltas)[0], run_optax(factory, x0, deltas)[0]):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
def test_first_step_closed_form(adaptivity):
  eta, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
  delta = np.array([-2.0, -0.3, 0.0, 1e-4, 0.5, 3.0], np.float32)
  got = first_update(FACTORIES[adaptivity](eta, beta1=beta1, beta2=beta2, tau=tau), delta)
  d = delta.astype(np.float64)
  if adaptivity == "adagrad":
    want = eta * (1 - beta1) * d / (np.abs(d) + tau)
  else:  # Adam and Yogi coincide on step 1 from v_{-1} = 0
    want = eta * (1 - beta1) * d / (np.sqrt(1 - beta2) * np.abs(d) + tau)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-9)
  assert np.all(np.sign(got) == np.sign(d))  # moves towards the clients


@pytest.mark.parametrize("v0, delta, v1_yogi, v1_adam", [
    (4.0, 1.0, 4.0 - 0.1, 0.9 * 4.0 + 0.1),    # v > Delta^2: v decreases by (1-b2) Delta^2
    (0.25, 1.0, 0.25 + 0.1, 0.9 * 0.25 + 0.1),  # v < Delta^2: v increases by (1-b2) Delta^2
    (1.0, -1.0, 1.0, 1.0),                      # v = Delta^2: sign 0, v unchanged
])
def test_yogi_sign_rule_by_hand(v0, delta, v1_yogi, v1_adam):
  eta, beta1, beta2, tau = 1.0, 0.5, 0.9, 0.01
  for factory, v1 in ((fm_opt.server_yogi, v1_yogi), (fm_opt.server_adam, v1_adam)):
    opt = factory(eta, beta1=beta1, beta2=beta2, tau=tau, initial_accumulator_value=v0)
    params = jnp.zeros(1)
    updates, state = opt.update(-jnp.full(1, delta), opt.init(params), params)
    np.testing.assert_allclose(fedopt_state(state).v, [v1], rtol=1e-6)
    np.testing.assert_allclose(updates, [eta * (1 - beta1) * delta / (np.sqrt(v1) + tau)],
                               rtol=1e-6)
  # Yogi's change is additive: |v1 - v0| = (1 - b2) Delta^2 whatever v0 is.
  if v0 != delta ** 2:
    assert abs(abs(v1_yogi - v0) - (1 - beta2) * delta ** 2) < 1e-12


def test_differs_from_optax_adam_by_bias_correction():
  eta, beta1, beta2, tau = 0.1, 0.9, 0.999, 1e-3
  delta = np.array([0.5, -2.0, 0.01], np.float32)
  ours = first_update(fm_opt.server_adam(eta, beta1=beta1, beta2=beta2, tau=tau), delta)
  theirs = first_update(optax.adam(eta, b1=beta1, b2=beta2, eps=tau), delta)
  d = delta.astype(np.float64)
  # optax.adam step 1: m_hat = Delta, v_hat = Delta^2 -> eta Delta / (|Delta| + tau).
  np.testing.assert_allclose(theirs, eta * d / (np.abs(d) + tau), rtol=RTOL)
  np.testing.assert_allclose(
      ours, eta * (1 - beta1) * d / (np.sqrt(1 - beta2) * np.abs(d) + tau), rtol=RTOL)
  # Without bias correction the first step is (1-b1)/sqrt(1-b2) ~ 3.2x larger
  # where |Delta| >> tau / sqrt(1-b2) (~0.03 here), and differs everywhere.
  assert np.all(np.abs(ours[:2]) > 2.0 * np.abs(theirs[:2]))
  assert not np.any(np.isclose(ours, theirs, rtol=0.1))


@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
def test_initial_accumulator_value(adaptivity):
  eta, beta1, beta2, tau, v0 = 0.1, 0.9, 0.99, 1e-3, 0.04
  delta = np.array([-1.0, 0.1, 0.0], np.float32)
  opt = FACTORIES[adaptivity](eta, beta1=beta1, beta2=beta2, tau=tau,
                              initial_accumulator_value=v0)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = fedopt_state(opt.init(params))
  for leaf in jax.tree_util.tree_leaves(state.v):
    np.testing.assert_array_equal(leaf, np.full(leaf.shape, v0, np.float32))
  for leaf in jax.tree_util.tree_leaves(state.m):
    np.testing.assert_array_equal(leaf, 0.0)
  d = delta.astype(np.float64)
  if adaptivity == "adagrad":
    v1 = v0 + d * d
  elif adaptivity == "adam":
    v1 = beta2 * v0 + (1 - beta2) * d * d
  else:
    v1 = v0 - (1 - beta2) * d * d * np.sign(v0 - d * d)
  np.testing.assert_allclose(first_update(opt, delta),
                             eta * (1 - beta1) * d / (np.sqrt(v1) + tau),
                             rtol=RTOL, atol=1e-9)
  # Delta = 0 moves nothing, whatever v_{-1} is.
  assert first_update(opt, delta)[2] == 0.0


def test_learning_rate_schedule():
  deltas = random_deltas(3, seed=1)
  x0 = [np.zeros((3, 4), np.float32), np.zeros(5, np.float32)]
  a = run_optax(fm_opt.server_yogi(optax.linear_schedule(0.2, 0.05, 2)), x0, deltas)[0]
  # Round t uses eta_t = 0.2, 0.125, 0.05: Algorithm 2 with a per-round eta.
  # (defaults beta1 = 0.9, beta2 = 0.999, tau = 1e-3, v_{-1} = 0)
  x = [np.zeros((3, 4)), np.zeros(5)]
  m = [np.zeros_like(l) for l in x]
  v = [np.zeros_like(l) for l in x]
  for t, (eta, delta) in enumerate(zip((0.2, 0.125, 0.05), deltas)):
    for i, d in enumerate(delta):
      d = np.asarray(d, np.float64)
      m[i] = 0.9 * m[i] + 0.1 * d
      v[i] = v[i] - 0.001 * d * d * np.sign(v[i] - d * d)
      x[i] = x[i] + eta * m[i] / (np.sqrt(v[i]) + 1e-3)
      np.testing.assert_allclose(a[t][i], x[i], rtol=RTOL, atol=ATOL, err_msg=f"round {t}")


@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
def test_inject_hyperparams_traced_no_retrace(adaptivity):
  base = dict(learning_rate=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
  opt = optax.inject_hyperparams(FACTORIES[adaptivity])(**base)
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
  state0 = opt.init(params)
  assert set(state0.hyperparams) >= set(base)
  deltas = random_deltas(2, seed=5)
  gs = [{"w": -jnp.asarray(d[0]), "b": -jnp.asarray(d[1])} for d in deltas]
  traces = [0]

  @jax.jit
  def two_steps(state):
    traces[0] += 1  # Python side effect: runs once per trace
    p = params
    for g in gs:
      u, state = opt.update(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  def flat(p):
    return np.concatenate([np.ravel(p["w"]), np.ravel(p["b"])])

  baseline = flat(two_steps(state0))
  changes = dict(learning_rate=0.2, beta1=0.5, beta2=0.9, tau=0.1)
  for name, value in changes.items():
    hyper = dict(state0.hyperparams)
    hyper[name] = jnp.asarray(value, hyper[name].dtype)
    got = flat(two_steps(state0._replace(hyperparams=hyper)))
    # The float64 Algorithm 2 at the changed value (not a second optax run).
    hyper_ref = {**base, name: value}
    ref = reference_algorithm2([np.zeros((3, 4)), np.zeros(5)], deltas, adaptivity,
                               hyper_ref["learning_rate"], hyper_ref["beta1"],
                               hyper_ref["beta2"], hyper_ref["tau"], 0.0)[0][-1]
    want = np.concatenate([np.ravel(ref[0]), np.ravel(ref[1])])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7, err_msg=name)
    if name == "beta2" and adaptivity == "adagrad":
      np.testing.assert_array_equal(got, baseline)  # documented as unused
    else:
      assert not np.allclose(got, baseline), name
  assert traces[0] == 1


def test_fedavg_server_fedadam_sign_and_no_recompile(sites, data):
  """One FedAvg round with FedAdam moves w towards sum_k p_k w_k by the closed form."""
  params = init_params()
  key = jax.random.PRNGKey(0)
  client = optax.sgd(0.1)
  # sum_k p_k w_k from the float64 client loop (not from the project's FedAvg).
  n = np.array([len(y) for _, y in sites], np.float64)
  w0, b0 = to_np(params)
  runs = [ref_local_sgd(w0, b0, x, y, 0.1, 4, np.asarray(data.mask)[k],
                        jax.random.fold_in(key, k), epochs=1)
          for k, (x, y) in enumerate(sites)]
  w_avg = {"w": sum(nk / n.sum() * r[0] for nk, r in zip(n, runs)),
           "b": sum(nk / n.sum() * r[1] for nk, r in zip(n, runs))}
  eta, beta1, beta2, tau = 0.01, 0.9, 0.999, 1e-3
  server = optax.inject_hyperparams(fm_opt.server_adam)(learning_rate=eta, beta1=beta1,
                                                     beta2=beta2, tau=tau)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=client, local_epochs=1,
                              batch_size=4, server_optimizer=server)
  state = algo.init(params)
  got = algo.round(state, data, key)[0].params
  for name in ("w", "b"):
    d = np.asarray(w_avg[name], np.float64) - np.asarray(params[name], np.float64)
    want = np.asarray(params[name], np.float64) + eta * (1 - beta1) * d / (
        np.sqrt(1 - beta2) * np.abs(d) + tau)
    np.testing.assert_allclose(got[name], want, rtol=RTOL, atol=ATOL)
  with count_compilations() as compiles:
    changed = fm.set_hyperparams(state, server={"learning_rate": 2 * eta, "tau": 0.1})
    again = algo.round(changed, data, key)[0].params
  assert compiles[0] == 0
  d = np.asarray(w_avg["b"], np.float64) - float(params["b"])
  np.testing.assert_allclose(
      again["b"], float(params["b"]) + 2 * eta * (1 - beta1) * d / (
          np.sqrt(1 - beta2) * abs(d) + 0.1), rtol=RTOL, atol=ATOL)


def test_state_dtypes_are_kept():
  opt = fm_opt.scale_by_fedopt("yogi", beta1=jnp.float32(0.9), beta2=jnp.float32(0.99),
                               tau=jnp.float32(1e-3))
  params = {"w": jnp.zeros(4, jnp.bfloat16)}
  state = opt.init(params)
  updates, new_state = opt.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
  assert updates["w"].dtype == jnp.bfloat16
  assert new_state.m["w"].dtype == jnp.bfloat16 and new_state.v["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"),
    (dict(beta2=1.0), "beta2"), (dict(beta2=1.5), "beta2"),
    (dict(tau=0.0), "tau"), (dict(tau=-1e-3), "tau"), (dict(tau=float("nan")), "tau"),
    (dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
])
@pytest.mark.parametrize("adaptivity", ADAPTIVITIES)
def test_bad_arguments(adaptivity, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fm_opt.scale_by_fedopt(adaptivity, **kwargs)
  with pytest.raises(ValueError, match=match):
    FACTORIES[adaptivity](0.1, **kwargs)


def test_unknown_adaptivity_is_named():
  with pytest.raises(ValueError, match="'rmsprop'"):
    fm_opt.scale_by_fedopt("rmsprop")
  with pytest.raises(fm.OptionError, match="'Adam'"):
    fm_opt.scale_by_fedopt("Adam")


def test_arrays_are_not_validated():
  """Traced values cannot be checked in Python; concrete arrays pass through too."""
  opt = fm_opt.scale_by_fedopt("adam", beta1=jnp.asarray(0.9), beta2=jnp.asarray(0.99),
                               tau=jnp.asarray(1e-3),
                               initial_accumulator_value=jnp.asarray(0.0))
  params = jnp.zeros(2)
  updates, _ = opt.update(jnp.ones(2), opt.init(params), params)
  np.testing.assert_allclose(updates, 0.1 / (np.sqrt(0.01) + 1e-3), rtol=RTOL)


@pytest.mark.parametrize("old, new", [("fedadagrad", "server_adagrad"), ("fedadam", "server_adam"),
                                      ("fedyogi", "server_yogi")])
def test_version_0_1_names_warn_and_build_the_same_transformation(old, new):
  x0 = (np.zeros(3, np.float32), np.float32(0.0))
  deltas = [(np.asarray([0.5, -2.0, 0.0], np.float32), np.float32(0.25))] * 3
  with pytest.warns(DeprecationWarning, match=new):
    opt_old = getattr(fm_opt, old)(0.1, tau=0.01)
  xs_old, _ = run_optax(opt_old, x0, deltas)
  xs_new, _ = run_optax(getattr(fm_opt, new)(0.1, tau=0.01), x0, deltas)
  for a, b in zip(xs_old, xs_new):
    jax.tree.map(np.testing.assert_array_equal, a, b)
