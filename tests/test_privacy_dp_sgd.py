"""Patient-level DP-SGD: clipping, Poisson sampling, noise, and its wiring into FedAvg."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, np_bce_grad
from fedjax_med.core.local import STEP_STREAM
from fedjax_med.privacy import patient_level as pl
from fedjax_med.algorithms.dp_fedavg import dp_sgd_fedavg
from fedjax_med.privacy.patient_level import dp_sgd

# XLA:CPU compiles DP-SGD rounds about 2.6x slower under the harness's unrolled threefry
# lowering (tests/_unrolled_threefry.py), so this file keeps JAX's own CPU lowering.
pytestmark = pytest.mark.jax_cpu_threefry_lowering


def test_per_example_clipping_bounds_and_leaves_small_gradients_unchanged():
  rng = np.random.default_rng(0)
  grads = {"w": jnp.asarray(rng.normal(size=(64, 5)) * rng.uniform(0.05, 3, (64, 1)),
                            jnp.float32),
           "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  c = 1.0
  clipped, norms = pl.clip_per_example(grads, jnp.float32(c))
  ref_norms = np.sqrt((np.asarray(grads["w"], np.float64) ** 2).sum(1)
                      + np.asarray(grads["b"], np.float64) ** 2)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  out = np.sqrt((np.asarray(clipped["w"], np.float64) ** 2).sum(1)
                + np.asarray(clipped["b"], np.float64) ** 2)
  assert np.all(out <= c * (1 + 1e-5))
  big = ref_norms > c
  assert big.any() and (~big).any()
  np.testing.assert_allclose(out[big], c, rtol=1e-5)  # clipped ones land on the sphere
  np.testing.assert_array_equal(np.asarray(clipped["w"])[~big], np.asarray(grads["w"])[~big])
  np.testing.assert_array_equal(np.asarray(clipped["b"])[~big], np.asarray(grads["b"])[~big])
  # direction preserved
  np.testing.assert_allclose(np.asarray(clipped["w"])[big],
                             np.asarray(grads["w"])[big] * (c / ref_norms[big])[:, None],
                             rtol=1e-5)


def test_per_example_gradients_match_numpy():
  x, y = make_sites([6], dim=3, seed=1)[0]
  params = init_params()
  _, grads = pl.per_example_gradients(bce_loss, params, jnp.asarray(x), jnp.asarray(y))
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  for i in range(6):
    gw, gb = np_bce_grad(w, b, x[i:i + 1].astype(np.float64), y[i:i + 1].astype(np.float64))
    np.testing.assert_allclose(grads["w"][i], gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["b"][i], gb, rtol=1e-5, atol=1e-6)


def _reference_poisson(key, n_rows, n_real, q):
  """Row i is sampled iff it is real and U(fold_in(key, i)) < q (row_uniforms' contract)."""
  u = np.array([float(jax.random.uniform(jax.random.fold_in(key, np.uint32(i))))
                for i in range(n_rows)])
  return (np.arange(n_rows) < n_real) & (u < q)


def np_clipped_sum(w, b, x, y, clip):
  """sum_i g_i min(1, C / ||g_i||) over the rows of x, float64 loop (BCE of a linear model)."""
  total_w, total_b = np.zeros_like(w), 0.0
  for i in range(len(y)):
    gw, gb = np_bce_grad(w, b, x[i:i + 1], y[i:i + 1])
    f = min(1.0, clip / np.sqrt(np.sum(gw ** 2) + gb ** 2))
    total_w, total_b = total_w + f * gw, total_b + f * gb
  return total_w, total_b


@pytest.mark.parametrize("mode", ["expected_batch_size", "sampling_rate"])
def test_no_noise_binding_clip_equals_float64_clipped_sum_on_the_poisson_sample(mode):
  """sigma = 0, C = 0.3 (binds on most rows): g = sum_{i in S} clip_C(g_i) / (q n_k), with
  S from row_uniforms' contract and the clipped sum from a float64 NumPy loop."""
  x, y = make_sites([23], dim=3, seed=4)[0]
  n_real, n_rows, clip = 23, 30, 0.3
  xp = np.zeros((n_rows, 3), np.float32)
  yp = np.zeros((n_rows,), np.float32)
  xp[:n_real], yp[:n_real] = x, y
  mask = jnp.arange(n_rows) < n_real
  params = init_params()
  q = 6.0 / n_real if mode == "expected_batch_size" else 0.3
  estimator = (dp_sgd(clip, 0.0, expected_batch_size=6.0) if mode == "expected_batch_size"
               else dp_sgd(clip, 0.0, sampling_rate=0.3))
  hp = {k: jnp.float32(v) for k, v in estimator.hparams.items()}
  grad_fn = jax.jit(estimator.build(bce_loss, hp))
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  norms = [np.sqrt(np.sum(gw ** 2) + gb ** 2) for gw, gb in
           (np_bce_grad(w, b, x[i:i + 1].astype(np.float64), y[i:i + 1].astype(np.float64))
            for i in range(n_real))]
  assert np.mean(np.array(norms) > clip) > 0.5  # the clip binds on most rows
  sizes = []
  for s in range(5):
    key = jax.random.PRNGKey(10 + s)
    _, g = grad_fn(params, jnp.asarray(xp), jnp.asarray(yp), mask, key)
    sampled = _reference_poisson(jax.random.fold_in(key, pl.SAMPLE_STREAM), n_rows, n_real, q)
    sizes.append(int(sampled.sum()))
    gw, gb = np_clipped_sum(w, b, xp[sampled].astype(np.float64),
                            yp[sampled].astype(np.float64), clip)
    # float32 per-example gradients and sum of <= 30 terms: relative error ~1e-6
    np.testing.assert_allclose(g["w"], gw / (q * n_real), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["b"], gb / (q * n_real), rtol=1e-5, atol=1e-6)
  assert len(set(sizes)) > 1  # a real Poisson sample: the batch size varies


def test_poisson_sampling_rate_is_q():
  mask = jnp.arange(400) < 300
  keys = jax.random.split(jax.random.PRNGKey(3), 200)
  draws = jax.vmap(lambda k: pl.poisson_row_mask(k, mask, jnp.float32(0.2)))(keys)
  draws = np.asarray(draws)
  assert not draws[:, 300:].any()  # padded rows never sampled
  rate = draws[:, :300].mean()
  assert abs(rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / (200 * 300))


def _zero_grad_loss(params, x, y):
  """Per-example loss with zero gradient: the DP-SGD gradient is pure noise."""
  del y
  return jnp.zeros(x.shape[0]) * jnp.sum(params["w"])


def test_noise_has_the_right_std():
  d, c, sigma = 4000, 0.7, 1.3
  params = {"w": jnp.zeros(d, jnp.float32)}
  x = jnp.zeros((10, 1))
  mask = jnp.arange(10) < 8
  est = dp_sgd(c, sigma, expected_batch_size=4.0)
  grad_fn = est.build(_zero_grad_loss, {k: jnp.float32(v) for k, v in est.hparams.items()})
  _, g = grad_fn(params, x, jnp.zeros(10), mask, jax.random.PRNGKey(0))
  noise = np.asarray(g["w"], np.float64) * 4.0  # expected batch q n_k = 4
  res = stats.kstest(noise, "norm", args=(0.0, sigma * c))
  assert res.pvalue > 0.01
  assert abs(noise.std() / (sigma * c) - 1) < 0.05
  # and a wrong std is rejected by the same test (the test has power)
  assert stats.kstest(noise, "norm", args=(0.0, 1.2 * sigma * c)).pvalue < 1e-4


def spy():
  """A link that reports the stacked site updates as a metric."""
  return fm.ClientTransform(init=lambda t, k=None: (),
                            apply=lambda u, w, s, k, c: (u, w, s, {"spy": u["w"]}))


def test_noise_independent_across_sites_and_rounds():
  d, c, sigma, b = 3000, 1.0, 1.0, 2.0
  sites = [(np.zeros((n, 1), np.float32), np.zeros(n, np.float32)) for n in (5, 9, 4)]
  data = fm.FederatedData.from_sites(sites)
  algo = dp_sgd_fedavg(_zero_grad_loss, max_examples=data.max_examples, clip_norm=c,
                       noise_multiplier=sigma, expected_batch_size=b,
                       client_optimizer=optax.sgd(1.0), local_steps=1,
                       aggregator=fm.aggregators.chain(spy(), fm.aggregators.weighted_mean()))
  state = algo.init({"w": jnp.zeros(d, jnp.float32)})
  noises = []
  for r in range(3):
    state, metrics = algo.round(state, data, jax.random.fold_in(jax.random.PRNGKey(7), r))
    # Delta_k = lr * g_k = noise_k / (q n_k) with q n_k = b for every site here
    noises.append(np.asarray(metrics["spy"], np.float64) * b / (sigma * c))
  z = np.concatenate(noises)  # [3 rounds x 3 sites, d]
  assert stats.kstest(z.ravel(), "norm").pvalue > 0.01
  corr = np.corrcoef(z)
  off = corr[~np.eye(len(z), dtype=bool)]
  assert np.max(np.abs(off)) < 4.5 / np.sqrt(d)  # no two (site, round) vectors correlated


def test_round_uses_the_local_step_key():
  """One round with noise 0 and a huge clip: every site's step is the plain gradient
  on the Poisson sample drawn from fold_in(fold_in(client_key, STEP_STREAM), 0)."""
  sites = make_sites([11, 6, 8], seed=9)
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  lr, b = 0.5, 3.0
  algo = dp_sgd_fedavg(bce_loss, max_examples=data.max_examples, clip_norm=1e6,
                       noise_multiplier=0.0, expected_batch_size=b,
                       client_optimizer=optax.sgd(lr), local_steps=1)
  key = jax.random.PRNGKey(21)
  state, metrics = algo.round(algo.init(params), data, key)
  w, bias = np.asarray(params["w"], np.float64), float(params["b"])
  n = np.array([11, 6, 8])
  new_w, new_b = 0.0, 0.0
  for k, (x, y) in enumerate(sites):
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, k), STEP_STREAM),
                                  0)
    q = b / n[k]
    sampled = _reference_poisson(jax.random.fold_in(step_key, pl.SAMPLE_STREAM),
                                 data.max_examples, n[k], q)[:n[k]]
    m = sampled.sum()
    if m:
      gw, gb = np_bce_grad(w, bias, x[sampled].astype(np.float64),
                           y[sampled].astype(np.float64))
      gw, gb = gw * m / b, gb * m / b
    else:
      gw, gb = 0.0 * w, 0.0
    p = n[k] / n.sum()
    new_w = new_w + p * (w - lr * gw)
    new_b = new_b + p * (bias - lr * gb)
  np.testing.assert_allclose(state.params["w"], new_w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(state.params["b"], new_b, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(metrics["client_steps"], [1, 1, 1])


def test_hparams_are_traced_and_checked():
  sites = make_sites([7, 5], seed=1)
  data = fm.FederatedData.from_sites(sites)
  algo = dp_sgd_fedavg(bce_loss, max_examples=data.max_examples, clip_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=2.0,
                       client_optimizer=optax.sgd(0.1))
  state = algo.init(init_params())
  assert set(state.hparams) == {"clip_norm", "noise_multiplier", "expected_batch_size"}
  state, _ = algo.round(state, data, jax.random.PRNGKey(0))
  state = fm.set_hyperparams(state, noise_multiplier=2.0, clip_norm=0.5)
  state, _ = algo.round(state, data, jax.random.PRNGKey(1))
  assert float(state.hparams["noise_multiplier"]) == 2.0
  bigger = fm.FederatedData.from_sites(make_sites([9, 5], seed=1))
  with pytest.raises(ValueError, match="max_examples = 7"):
    algo.round(state, bigger, jax.random.PRNGKey(0))


def test_bad_inputs():
  for clip in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="clip_norm"):
      dp_sgd(clip, 1.0, expected_batch_size=4)
  with pytest.raises(ValueError, match="noise_multiplier"):
    dp_sgd(1.0, -0.5, expected_batch_size=4)
  with pytest.raises(ValueError, match="exactly one"):
    dp_sgd(1.0, 1.0)
  with pytest.raises(ValueError, match="exactly one"):
    dp_sgd(1.0, 1.0, expected_batch_size=3, sampling_rate=0.1)
  with pytest.raises(ValueError, match="sampling_rate"):
    dp_sgd(1.0, 1.0, sampling_rate=0.0)
  with pytest.raises(ValueError, match="expected_batch_size"):
    dp_sgd(1.0, 1.0, expected_batch_size=-2)

  @fm.batch_loss
  def cox_like(params, x, y, mask):
    return jnp.sum(params["w"]) * 0.0

  est = dp_sgd(1.0, 1.0, expected_batch_size=2)
  with pytest.raises(ValueError, match="batch-level loss"):
    est.build(cox_like, est.hparams)


# ----------------------------------------------------------------------------- issue 17


def _indicator_loss(params, x, y):
  """f(w; e_i) = w . e_i: the gradient of row i is e_i (norm 1), so after T SGD steps with
  lr 1 and sigma = 0, Delta_i = (number of steps that sampled patient i) / (q n_k)."""
  del y
  return x @ params["w"]


def _inclusion_counts(algo, n, rounds, expected):
  """[rounds, n] times each patient was sampled in one round (read off Delta)."""
  data = fm.FederatedData.from_sites([(np.eye(n, dtype=np.float32), np.zeros(n, np.float32))])
  state = algo.init({"w": jnp.zeros(n, jnp.float32)})
  counts = []
  for r in range(rounds):
    new, metrics = algo.round(state, data, jax.random.fold_in(jax.random.PRNGKey(17), r))
    counts.append(-np.asarray(new.params["w"], np.float64) * expected)
  counts = np.stack(counts)
  np.testing.assert_array_equal(counts, np.round(counts))  # k / 4 is exact in float32
  return counts.astype(np.int64), metrics


BINOMIAL_BINS = 4  # 0, 1, 2, >= 3 inclusions


def _binned(p):
  return np.concatenate([p[:BINOMIAL_BINS - 1], [p[BINOMIAL_BINS - 1:].sum()]])


@pytest.mark.parametrize("path", ["dp_sgd_fedavg", "dp_fedavg+dp_sgd"])
def test_per_round_inclusion_counts_are_binomial_T_q(path):
  """Poisson sampling over the whole site, T steps per round: the number of steps that
  include a given patient is Binomial(T, q), independently across patients and rounds.

  n = 80 patients, expected batch b = 8 (q = 0.1), T = 5 steps, 100 rounds: 8000 counts.
  Chi-square goodness of fit on {0, 1, 2, >= 3} (3 df) at alpha = 1e-3, fixed seed.
  Power (noncentral chi-square, computed below): >= 0.99 against q' = 0.12 (a 20% error in
  the rate) and 1.0 against the audit's broken mechanism (batches of 8 out of 40 rows,
  P(0) = 0.51, P(>= 2) = 0). The accountant's event PoissonSampled(q, Gaussian) x T per
  round is then what ran (client_steps = T every round).
  """
  n, b, steps, rounds = 80, 8.0, 5, 100
  q = b / n
  est = dp_sgd(2.0, 0.0, expected_batch_size=b)  # C = 2 > ||e_i|| = 1: no clipping
  if path == "dp_sgd_fedavg":
    algo = dp_sgd_fedavg(_indicator_loss, max_examples=n, clip_norm=2.0, noise_multiplier=0.0,
                         expected_batch_size=b, client_optimizer=optax.sgd(1.0),
                         local_steps=steps)
  else:
    algo = fm.algorithms.dp_fedavg(_indicator_loss, clip_norm=1e6, noise_multiplier=0.0,
                                num_sites=1, client_optimizer=optax.sgd(1.0),
                                local_steps=steps, batch_size=n, gradient_estimator=est)
  counts, metrics = _inclusion_counts(algo, n, rounds, b)
  np.testing.assert_array_equal(metrics["client_steps"], [steps])
  observed = np.bincount(np.minimum(counts.ravel(), BINOMIAL_BINS - 1),
                         minlength=BINOMIAL_BINS)
  p0 = _binned(stats.binom.pmf(np.arange(steps + 1), steps, q))
  total = counts.size
  res = stats.chisquare(observed, total * p0)
  assert res.pvalue > 1e-3, (observed, total * p0, res)
  # the test's power at alpha = 1e-3 (3 df)
  crit = stats.chi2.ppf(1 - 1e-3, BINOMIAL_BINS - 1)
  p_alt = _binned(stats.binom.pmf(np.arange(steps + 1), steps, 0.12))
  lam = total * np.sum((p_alt - p0) ** 2 / p0)
  assert stats.ncx2.sf(crit, BINOMIAL_BINS - 1, lam) >= 0.99
  # independence across patients: mean pairwise correlation of counts ~ 0
  corr = np.corrcoef(counts.T)[~np.eye(n, dtype=bool)]
  assert abs(corr.mean()) < 4.0 / np.sqrt(rounds * n)


def test_dp_sgd_refuses_batches_that_do_not_span_the_site():
  """The audit's case: 40 patients, batch 8, expected batch 4. Each step would Poisson-sample
  a batch of 8 rows, so a patient is in 0 or 1 batch per epoch, not Binomial(T, q):
  the accountant's event never ran. dp_fedavg must refuse, naming the problem."""
  n = 40
  est = dp_sgd(2.0, 1.0, expected_batch_size=4.0)
  data = fm.FederatedData.from_sites([(np.eye(n, dtype=np.float32), np.zeros(n, np.float32))])
  for kwargs in (dict(local_epochs=1), dict(local_steps=5)):
    algo = fm.algorithms.dp_fedavg(_indicator_loss, clip_norm=1e6, noise_multiplier=0.0,
                                num_sites=1, client_optimizer=optax.sgd(1.0), batch_size=8,
                                gradient_estimator=est, **kwargs)
    with pytest.raises(ValueError, match="batch_size = 8 < N_max = 40"):
      algo.round(algo.init({"w": jnp.zeros(n)}), data, jax.random.PRNGKey(0))
  cohort = fm.algorithms.dp_fedavg(_indicator_loss, clip_norm=1e6, noise_multiplier=0.0,
                                cohort_size=1, client_optimizer=optax.sgd(1.0), batch_size=8,
                                gradient_estimator=est, local_steps=5)
  with pytest.raises(ValueError, match="batch_size = 8 < N_max = 40"):
    cohort.round(cohort.init({"w": jnp.zeros(n)}), data, jax.random.PRNGKey(0))
  # the check the core runs where an estimator meets a schedule
  with pytest.raises(ValueError, match="fedavg: dp_sgd needs every local batch to span"):
    pl.check_batches_span_site(est, batch_size=8, n_max=40, name="fedavg")
  pl.check_batches_span_site(est, batch_size=40, n_max=40, name="fedavg")
  pl.check_batches_span_site(fm.core.objective.mean_gradient(), batch_size=8, n_max=40)
  assert pl.needs_whole_site(est) and pl.needs_whole_site(est.build(_indicator_loss,
                                                                    est.hparams))


def test_any_algorithm_with_a_dp_sgd_estimator_refuses_small_batches():
  n = 40
  est = dp_sgd(2.0, 1.0, expected_batch_size=4.0)
  data = fm.FederatedData.from_sites([(np.eye(n, dtype=np.float32), np.zeros(n, np.float32))])
  algo = fm.algorithms.fedavg(_indicator_loss, client_optimizer=optax.sgd(1.0), batch_size=8,
                              local_steps=5, gradient_estimator=est)
  with pytest.raises(ValueError, match="span"):
    algo.round(algo.init({"w": jnp.zeros(n)}), data, jax.random.PRNGKey(0))


def _log_target_loss(params, x, y):
  """(log y - (x w + b))^2: non-finite at y = 0 (a padded row), fine at y > 0."""
  return (jnp.log(y) - (x @ params["w"] + params["b"])) ** 2


def _positive_sites(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(n, 3)).astype(np.float32),
           np.exp(rng.normal(size=n)).astype(np.float32)) for n in sizes]


def test_padded_rows_never_reach_the_loss():
  """A loss that is NaN at y = 0: one DP-SGD round on data padded to 16 rows plus an empty
  site gives finite parameters equal (float32 tolerance, rtol 1e-5) to the same round on
  the unpadded data (same keys: row i's draw and the noise do not depend on padding)."""
  sites = _positive_sites([12, 12])
  empty = (np.zeros((0, 3), np.float32), np.zeros((0,), np.float32))
  unpadded = fm.FederatedData.from_sites(sites)
  padded = fm.FederatedData.from_sites(sites + [empty], pad_to=16)
  params = init_params()
  key = jax.random.PRNGKey(3)
  algo = dp_sgd_fedavg(_log_target_loss, max_examples=16, clip_norm=0.5,
                       noise_multiplier=1.0, expected_batch_size=4.0,
                       client_optimizer=optax.sgd(0.1), local_steps=3)
  ref, _ = algo.round(algo.init(params), unpadded, key)
  got, metrics = algo.round(algo.init(params), padded, key)
  for name in ("w", "b"):
    assert np.all(np.isfinite(got.params[name]))
    np.testing.assert_allclose(got.params[name], ref.params[name], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(metrics["client_train_loss"]))
  # DP-FedAvg whose sites run DP-SGD: the same, on padded rows only (K is fixed there)
  dp = fm.algorithms.dp_fedavg(_log_target_loss, clip_norm=1.0, noise_multiplier=1.0,
                            num_sites=2, client_optimizer=optax.sgd(0.1), local_steps=2,
                            batch_size=16, gradient_estimator=dp_sgd(
                                0.5, 1.0, expected_batch_size=4.0))
  ref, _ = dp.round(dp.init(params), unpadded, key)
  got, _ = dp.round(dp.init(params), fm.FederatedData.from_sites(sites, pad_to=16), key)
  for name in ("w", "b"):
    assert np.all(np.isfinite(got.params[name]))
    np.testing.assert_allclose(got.params[name], ref.params[name], rtol=1e-5, atol=1e-6)
  # an all-empty site's gradient is exactly zero, never NaN
  est = dp_sgd(0.5, 1.0, expected_batch_size=4.0)
  grad_fn = est.build(_log_target_loss, {k: jnp.float32(v) for k, v in est.hparams.items()})
  loss, g = grad_fn(params, jnp.zeros((5, 3)), jnp.zeros(5), jnp.zeros(5, bool),
                    jax.random.PRNGKey(0))
  assert float(loss) == 0.0
  for leaf in jax.tree_util.tree_leaves(g):
    assert np.all(np.isfinite(leaf))
