"""Site-level DP (DP-FedAvg): clipping of site updates, Gaussian noise on the sum, fixed W."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_med as fm
from conftest import bce_loss, count_compilations, init_params, make_sites
from fedjax_med.core import aggregation as agg
from fedjax_med.privacy import site_level as sl

KEY = jax.random.PRNGKey(0)


def ctx(k):
  return agg.full_context(jnp.full((k,), 5, jnp.int32))


def test_clip_updates_bounds_norms_and_keeps_small_updates():
  rng = np.random.default_rng(1)
  updates = {"w": jnp.asarray(rng.normal(size=(6, 4)) * [[0.1], [3], [0.2], [5], [0.3], [2]],
                              jnp.float32),
             "b": jnp.asarray(rng.normal(size=(6,)) * 0.1, jnp.float32)}
  link = sl.clip_updates(1.0)
  out, w, _, m = link.apply(updates, jnp.ones(6), link.init(None), KEY, ctx(6))
  norms_in = np.sqrt((np.asarray(updates["w"], np.float64) ** 2).sum(1)
                     + np.asarray(updates["b"], np.float64) ** 2)
  norms_out = np.sqrt((np.asarray(out["w"], np.float64) ** 2).sum(1)
                      + np.asarray(out["b"], np.float64) ** 2)
  assert np.all(norms_out <= 1.0 + 1e-5)
  small = norms_in <= 1.0
  np.testing.assert_array_equal(np.asarray(out["w"])[small], np.asarray(updates["w"])[small])
  np.testing.assert_allclose(norms_out[~small], 1.0, rtol=1e-5)
  assert float(m["dp_clipped_fraction"]) == pytest.approx((~small).mean())


def test_noisy_sum_mean_without_noise_is_sum_over_fixed_denominator():
  updates = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
  weights = jnp.array([10.0, 0.0, 1.0])  # weights only select; the sum is unweighted
  red = sl.gaussian_sum_mean(0.0, 1.0, denominator=4.0)
  out, _, m = red.aggregate(updates, weights, red.init(None), KEY, ctx(3))
  np.testing.assert_allclose(out["a"], [(1 + 5) / 4, (2 + 6) / 4])
  assert float(m["dp_noise_multiplier"]) == 0.0


def test_noise_on_the_sum_has_std_sigma_c():
  d, sigma, c, w = 5000, 1.7, 0.4, 3.0
  red = sl.gaussian_sum_mean(sigma, c, denominator=w)
  updates = {"a": jnp.zeros((3, d))}
  out, _, m = red.aggregate(updates, jnp.ones(3), red.init(None), jax.random.PRNGKey(3), ctx(3))
  noise = np.asarray(out["a"], np.float64) * w
  assert stats.kstest(noise, "norm", args=(0.0, sigma * c)).pvalue > 0.01
  assert stats.kstest(noise, "norm", args=(0.0, 1.15 * sigma * c)).pvalue < 1e-4
  assert float(m["dp_noise_stddev"]) == pytest.approx(sigma * c / w)


def spy_noise():
  return fm.ClientTransform(init=lambda t, k=None: (),
                            apply=lambda u, w, s, k, c: (jax.tree_util.tree_map(
                                jnp.zeros_like, u), w, s, {}))


def test_noise_is_fresh_every_round():
  """Zero updates (spy link zeroes them): each round's aggregate is pure noise; rounds
  are uncorrelated and jointly N(0, (sigma C / W)^2)."""
  sites = make_sites([6, 4], dim=3, seed=0)
  data = fm.FederatedData.from_sites(sites)
  d = 2000
  sigma, c = 1.0, 2.0

  def loss(params, x, y):
    return jnp.zeros(x.shape[0]) * jnp.sum(params["v"])

  algo = sl.dp_fedavg(loss, clip_norm=c, noise_multiplier=sigma, num_sites=2,
                      client_optimizer=optax.sgd(0.1), local_epochs=1, batch_size=4,
                      pre=(spy_noise(),))
  state = algo.init({"v": jnp.zeros(d)})
  deltas = []
  for r in range(4):
    before = np.asarray(state.params["v"], np.float64)
    state, _ = algo.round(state, data, jax.random.PRNGKey(100 + r))
    deltas.append((before - np.asarray(state.params["v"], np.float64)) * 2 / (sigma * c))
  z = np.stack(deltas)
  assert stats.kstest(z.ravel(), "norm").pvalue > 0.01
  off = np.corrcoef(z)[~np.eye(4, dtype=bool)]
  assert np.max(np.abs(off)) < 4.5 / np.sqrt(d)


def test_poisson_site_sampling_rate():
  link = sl.poisson_site_sampling(0.3)
  state = link.init(None)
  k = 50
  counts = 0
  for r in range(40):
    _, w, _, m = link.apply({"a": jnp.zeros((k, 1))}, jnp.ones(k), state,
                            jax.random.PRNGKey(r), ctx(k))
    counts += float(jnp.sum(w))
    np.testing.assert_array_equal(np.asarray(w) > 0, m["dp_sampled"])
  rate = counts / (40 * k)
  assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / (40 * k))


@pytest.mark.parametrize("clip_set", ["at_build", "by_set_hyperparams"])
def test_dp_fedavg_round_equals_hand_computed_chain(clip_set):
  """sigma = 0: Delta = sum_k clip(Delta_k) / K, Delta_k from plain local training.

  "by_set_hyperparams": built with C = 10 (nothing clipped), then C = 0.05 set
  through `fm.set_hyperparams(state, aggregator=...)`, which must reach the
  compiled round without recompiling it.
  """
  sites = make_sites([9, 4, 6], seed=3)
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  c = 0.05
  dp = fm.algorithms.dp_fedavg(bce_loss, clip_norm=c if clip_set == "at_build" else 10.0,
                               noise_multiplier=0.0, num_sites=3,
                               client_optimizer=optax.sgd(0.5), local_epochs=1, batch_size=2)

  def spy():
    return fm.ClientTransform(init=lambda t, k=None: (),
                              apply=lambda u, w, s, k, cx: (u, w, s, {"u": u}))

  plain = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.5), local_epochs=1,
                               batch_size=2, aggregator=fm.aggregators.chain(
                                   spy(), fm.aggregators.weighted_mean()))
  key = jax.random.PRNGKey(4)
  _, m = plain.round(plain.init(params), data, key)
  state = dp.init(params)
  if clip_set == "by_set_hyperparams":
    dp.round(state, data, key)  # compiles with C = 10
    state = fm.set_hyperparams(state, aggregator={"clip_norm": c})
    with count_compilations() as compiles:
      state, _ = dp.round(state, data, key)
    assert compiles[0] == 0
  else:
    state, _ = dp.round(state, data, key)
  u = {n: np.asarray(v, np.float64) for n, v in m["u"].items()}
  norms = np.sqrt((u["w"] ** 2).sum(1) + u["b"] ** 2)
  assert np.all(norms > c)  # every update clipped here
  f = np.minimum(1.0, c / norms)
  delta_w = (u["w"] * f[:, None]).sum(0) / 3
  delta_b = (u["b"] * f).sum() / 3
  np.testing.assert_allclose(state.params["w"], np.asarray(params["w"]) - delta_w,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], float(params["b"]) - delta_b,
                             rtol=1e-5, atol=1e-6)


def test_set_aggregator_hparams_changes_every_link_holding_the_name():
  chain = sl.site_level_dp(1.0, 1.0, expected_sites=4, sampling_rate=0.5)
  state = chain.init({"a": jnp.zeros(2)})
  new = sl.set_aggregator_hparams(state, clip_norm=0.25, noise_multiplier=3.0)
  assert float(new[1]["clip_norm"]) == 0.25 and float(new[2]["clip_norm"]) == 0.25
  assert float(new[2]["noise_multiplier"]) == 3.0
  with pytest.raises(ValueError, match="no link"):
    sl.set_aggregator_hparams(state, mu=1.0)
  with pytest.raises(ValueError, match="shape"):
    sl.set_aggregator_hparams(state, clip_norm=[1.0, 2.0])


def test_set_hyperparams_rejects_aggregator_numbers_no_link_holds():
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.5), local_epochs=1,
                              batch_size=2)
  state = algo.init(init_params())
  with pytest.raises(fm.OptionError, match="noise_multiplier"):
    fm.set_hyperparams(state, aggregator={"noise_multiplier": 1.0})


def test_bad_inputs():
  for c in (0.0, -1.0):
    with pytest.raises(ValueError, match="clip_norm"):
      sl.clip_updates(c)
    with pytest.raises(ValueError, match="clip_norm"):
      sl.dp_fedavg(bce_loss, clip_norm=c, noise_multiplier=1.0, num_sites=3,
                   client_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="noise_multiplier"):
    sl.gaussian_sum_mean(-1.0, 1.0, 3)
  with pytest.raises(ValueError, match="denominator"):
    sl.gaussian_sum_mean(1.0, 1.0, 0)
  with pytest.raises(ValueError, match="sampling_rate"):
    sl.poisson_site_sampling(1.5)
  with pytest.raises(ValueError, match="num_sites"):
    sl.dp_fedavg(bce_loss, clip_norm=1.0, noise_multiplier=1.0,
                 client_optimizer=optax.sgd(0.1))
  algo = sl.dp_fedavg(bce_loss, clip_norm=1.0, noise_multiplier=1.0, num_sites=4,
                      client_optimizer=optax.sgd(0.1))
  data = fm.FederatedData.from_sites(make_sites([3, 4, 5]))
  with pytest.raises(ValueError, match="num_sites=4"):
    algo.round(algo.init(init_params()), data, KEY)
  with pytest.raises(ValueError, match="not both"):
    sl.dp_fedavg(bce_loss, clip_norm=1.0, noise_multiplier=1.0, cohort_size=2,
                 sampling_rate=0.5, client_optimizer=optax.sgd(0.1))
