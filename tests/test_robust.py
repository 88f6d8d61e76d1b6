"""Robust aggregation: hand-computed small cases, float64 NumPy references, then 4
hospitals + 3 faulty sites."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med import robust
from fedjax_med.core import aggregation as agg

KEY = jax.random.PRNGKey(0)


def ctx(k):
  return agg.full_context(jnp.arange(1, k + 1, dtype=jnp.int32))


def test_reject_nonfinite_drops_counts_and_renormalises():
  updates = {"a": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0], [5.0, jnp.inf]])}
  weights = jnp.array([1.0, 5.0, 3.0, 2.0])
  chain = agg.chain(robust.reject_nonfinite(), agg.weighted_mean())
  out, _, m = chain.aggregate(updates, weights, chain.init(None), KEY, ctx(4))
  # sites 1 and 3 dropped; weights 1 and 3 renormalised to 1/4, 3/4
  np.testing.assert_allclose(out["a"], [(1 + 9) / 4, (2 + 12) / 4])
  assert int(m["num_rejected"]) == 2
  np.testing.assert_array_equal(m["rejected"], [False, True, False, True])


def test_norm_bound_by_hand():
  updates = {"a": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
  link = robust.norm_bound(1.0)
  out, w, _, m = link.apply(updates, jnp.ones(2), link.init(None), KEY, ctx(2))
  np.testing.assert_allclose(out["a"], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(out["a"][1], updates["a"][1])  # unchanged, bit for bit
  assert int(m["num_norm_bounded"]) == 1


def test_coordinate_median_by_hand():
  updates = {"a": jnp.array([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 7.0], [9.0, 9.0]]),
             "b": jnp.array([1.0, 2.0, 3.0, 4.0, 1000.0])}
  weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])  # last site excluded
  red = robust.coordinate_median()
  out, _, m = red.aggregate(updates, weights, (), KEY, ctx(5))
  # column 0 of the 4 valid rows: {1, 2, 100, 3} -> (2 + 3) / 2; column 1: {10, -5, 0, 7} -> 3.5
  np.testing.assert_allclose(out["a"], [2.5, 3.5])
  np.testing.assert_allclose(out["b"], 2.5)
  assert int(m["num_aggregated"]) == 4
  odd, _, _ = red.aggregate({"a": jnp.array([[5.0], [-1.0], [2.0]])}, jnp.ones(3), (), KEY,
                            ctx(3))
  np.testing.assert_allclose(odd["a"], [2.0])
  none, _, _ = red.aggregate({"a": jnp.array([[5.0], [1.0]])}, jnp.zeros(2), (), KEY, ctx(2))
  np.testing.assert_array_equal(none["a"], [0.0])


def test_trimmed_mean_by_hand():
  u = {"a": jnp.array([[1.0], [2.0], [3.0], [4.0], [100.0], [-50.0], [7.0]])}
  # 6 valid (last excluded); beta = 0.2 -> b = floor(1.2) = 1: drop -50 and 100
  out, _, _ = robust.trimmed_mean(0.2).aggregate(u, jnp.array([1.0] * 6 + [0.0]), (), KEY,
                                                 ctx(7))
  np.testing.assert_allclose(out["a"], [(1 + 2 + 3 + 4) / 4])
  # beta = 0.34 of 6 -> b = 2: keep {2, 3}
  out, _, _ = robust.trimmed_mean(0.34).aggregate(u, jnp.array([1.0] * 6 + [0.0]), (), KEY,
                                                  ctx(7))
  np.testing.assert_allclose(out["a"], [2.5])
  # beta = 0: unweighted mean of the valid rows (weights ignored beyond w > 0)
  out, _, _ = robust.trimmed_mean(0.0).aggregate(u, jnp.array([3.0] * 6 + [0.0]), (), KEY,
                                                 ctx(7))
  np.testing.assert_allclose(out["a"], [60.0 / 6])
  # against numpy per coordinate on random data
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5)).astype(np.float32)
  out, _, _ = robust.trimmed_mean(0.25).aggregate({"a": jnp.asarray(x)}, jnp.ones(9), (), KEY,
                                                  ctx(9))
  ref = np.sort(x, axis=0)[2:7].mean(0)
  np.testing.assert_allclose(out["a"], ref, rtol=1e-5)


def test_inject_faults_follows_site_positions():
  u = {"a": jnp.ones((4, 2))}
  link = robust.inject_faults({1: "nan", 2: 1000.0, 3: "sign_flip"})
  c = agg.AggregationContext(jnp.array([3, 1, 0, 2], jnp.int32), 4, jnp.ones(4, jnp.int32))
  out, _, _, _ = link.apply(u, jnp.ones(4), (), KEY, c)
  out = np.asarray(out["a"])
  np.testing.assert_array_equal(out[0], [-1, -1])
  assert np.isnan(out[1]).all()
  np.testing.assert_array_equal(out[2], [1, 1])
  np.testing.assert_array_equal(out[3], [1000, 1000])


def test_bad_options():
  with pytest.raises(ValueError, match="trim_fraction"):
    robust.trimmed_mean(0.5)
  with pytest.raises(ValueError, match="max_norm"):
    robust.norm_bound(0.0)
  with pytest.raises(ValueError, match="unknown fault"):
    robust.inject_faults({0: "zero"})


# ----------------------------------------------------------------------------- NumPy references
# float64 references written from the definitions, over the real sites only: a site
# counts at a coordinate when its weight is > 0 and its entry there is not NaN (a NaN
# entry is a missing value, see robust.py); no usable value -> 0 (no update).


def np_trimmed_mean(u, w, beta):
  """[C, D] -> [D]: per coordinate, np.sort the m usable values, drop floor(beta m) each side."""
  u = np.asarray(u, np.float64)
  out = np.zeros(u.shape[1])
  for j in range(u.shape[1]):
    vals = np.sort(u[(w > 0) & ~np.isnan(u[:, j]), j])
    m = len(vals)
    if m:
      b = math.floor(beta * m)
      with np.errstate(invalid="ignore"):    # +inf and -inf both kept: NaN, as the formula
        out[j] = vals[b:m - b].mean()
  return out


def np_median(u, w):
  u = np.asarray(u, np.float64)
  out = np.zeros(u.shape[1])
  for j in range(u.shape[1]):
    vals = u[(w > 0) & ~np.isnan(u[:, j]), j]
    if len(vals):
      out[j] = np.median(vals)
  return out


C_MAX = 9


def _random_case(rng, d=6, specials=True):
  """[C_MAX, d] float32 updates and [C_MAX] weights: 0 to 9 weighted sites (one
  compiled shape; the number of sites varies through the weights)."""
  c = C_MAX
  u = rng.normal(size=(c, d)).astype(np.float32) * 3
  w = rng.choice([0.0, 1.0, 2.5], size=c, p=[0.3, 0.35, 0.35]).astype(np.float32)
  if specials:
    hit = rng.random((c, d))
    u[hit < 0.12] = np.nan
    u[(hit >= 0.12) & (hit < 0.17)] = np.inf
    u[(hit >= 0.17) & (hit < 0.22)] = -np.inf
    if rng.random() < 0.3:
      u[rng.integers(c)] = np.nan            # a whole NaN site
  return u, w


# float32 sum of <= 9 values of |x| < 20 against float64: error < 9 * 2^-24 * 180 < 1e-4;
# a leaked fill value (+inf) or NaN fails any finite tolerance.
TOL = dict(rtol=1e-6, atol=1e-4)


def test_trimmed_mean_with_a_nan_site_and_no_trim_is_not_the_fill():
  """beta = 0 (b = 0) and one NaN site: the old code summed the +inf padding."""
  u = {"a": jnp.array([[1.0, 4.0], [jnp.nan, 5.0], [3.0, jnp.nan]])}
  out, _, _ = robust.trimmed_mean(0.0).aggregate(u, jnp.ones(3), (), KEY, ctx(3))
  np.testing.assert_allclose(out["a"], np_trimmed_mean(u["a"], np.ones(3), 0.0), **TOL)
  np.testing.assert_allclose(out["a"], [2.0, 4.5])
  # also with an excluded (weight 0) site beside the NaN one, and every beta
  u = {"a": jnp.array([[1.0], [jnp.nan], [3.0], [100.0], [-7.0]])}
  w = np.array([1.0, 1.0, 1.0, 0.0, 1.0], np.float32)
  for beta in (0.0, 0.2, 0.3, 0.45):
    out, _, _ = robust.trimmed_mean(beta).aggregate(u, jnp.asarray(w), (), KEY, ctx(5))
    assert np.all(np.isfinite(out["a"])), beta
    np.testing.assert_allclose(out["a"], np_trimmed_mean(u["a"], w, beta), **TOL)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.25, 0.34, 0.49])
def test_trimmed_mean_against_numpy_sort(beta):
  rng = np.random.default_rng(int(beta * 100))
  red = jax.jit(robust.trimmed_mean(beta).aggregate)
  for trial in range(40):
    u, w = _random_case(rng, specials=trial % 4 != 0)
    out, _, m = red({"a": jnp.asarray(u)}, jnp.asarray(w), (), KEY, ctx(C_MAX))
    ref = np_trimmed_mean(u, w, beta)
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), ref,
                               err_msg=f"beta {beta} trial {trial}\n{u}\n{w}", **TOL)
    assert int(m["num_aggregated"]) == int(np.sum(w > 0))


def test_coordinate_median_against_numpy():
  rng = np.random.default_rng(7)
  red = jax.jit(robust.coordinate_median().aggregate)
  for trial in range(60):
    u, w = _random_case(rng, specials=trial % 4 != 0)
    out, _, _ = red({"a": jnp.asarray(u)}, jnp.asarray(w), (), KEY, ctx(C_MAX))
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), np_median(u, w),
                               err_msg=f"trial {trial}\n{u}\n{w}", **TOL)
  # a coordinate where every weighted site is NaN: no update there, like no site at all
  u = {"a": jnp.array([[jnp.nan, 1.0], [jnp.nan, 2.0], [5.0, 3.0]])}
  for red in (robust.coordinate_median(), robust.trimmed_mean(0.0), robust.trimmed_mean(0.3)):
    out, _, _ = red.aggregate(u, jnp.array([1.0, 1.0, 0.0]), (), KEY, ctx(3))
    np.testing.assert_array_equal(out["a"], [0.0, 1.5])


def test_norm_bound_and_reject_nonfinite_against_numpy():
  rng = np.random.default_rng(3)
  bound = robust.norm_bound(2.0)
  bound_apply, reject_apply = jax.jit(bound.apply), jax.jit(robust.reject_nonfinite().apply)
  w = np.ones(C_MAX, np.float32)
  for trial in range(10):
    u = {"a": rng.normal(size=(C_MAX, 3)).astype(np.float32) * rng.uniform(0.1, 3),
         "b": rng.normal(size=(C_MAX,)).astype(np.float32)}
    out, _, _, _ = bound_apply(jax.tree_util.tree_map(jnp.asarray, u), jnp.asarray(w),
                               bound.init(None), KEY, ctx(C_MAX))
    flat = np.concatenate([u["a"].astype(np.float64), u["b"][:, None].astype(np.float64)], 1)
    factor = np.minimum(1.0, 2.0 / np.sqrt((flat ** 2).sum(1)))   # M / max(||u||, M)
    np.testing.assert_allclose(out["a"], u["a"] * factor[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], u["b"] * factor, rtol=1e-5, atol=1e-6)
    # reject_nonfinite: a row with any NaN/inf in any leaf -> update 0, weight 0
    bad, _ = _random_case(rng, d=3)
    out, w_out, _, m = reject_apply({"a": jnp.asarray(bad), "b": jnp.asarray(u["b"])},
                                    jnp.asarray(w), (), KEY, ctx(C_MAX))
    ok = np.isfinite(bad).all(1)
    np.testing.assert_array_equal(out["a"], np.where(ok[:, None], bad, 0.0))
    np.testing.assert_array_equal(w_out, np.where(ok, w, 0.0))
    assert int(m["num_rejected"]) == int((~ok).sum())


# ----------------------------------------------------------------------------- heart disease

ROUNDS = 20
# Measured (seeds 0, 1, 2; 20 rounds; test accuracy, site mean / pooled test BCE):
#   plain FedAvg, 4 clean sites        0.704 0.692 0.684 / loss 0.559 0.561 0.560
#   plain FedAvg, 7 sites with faults  NaN model from round 1
#   reject_nonfinite + mean, faults    0.699 0.706 0.722 / loss 8.17 7.27 6.69 (x1000 site)
#   median           clean -> faults   0.735->0.738 0.722->0.717 0.737->0.719, loss <= 1.10x
#   trimmed(0.2)     clean -> faults   0.734->0.734 0.732->0.718 0.737->0.732, loss <= 1.11x
#   norm_bound(0.1)  clean -> faults   0.684->0.713 0.690->0.689 0.708->0.705, loss <= 1.02x
# The test runs seed 0; margins below leave room for float/platform differences.
NEAR_CLEAN = 0.05


def _faulty_federation(train):
  """The 4 hospitals + 3 sites of 60 patients drawn from the pooled training rows."""
  sites = train.sites()
  px = np.concatenate([x for x, _ in sites])
  py = np.concatenate([y for _, y in sites])
  rng = np.random.default_rng(0)
  extra = []
  for _ in range(3):
    idx = rng.choice(len(py), 60, replace=False)
    extra.append((px[idx], py[idx]))
  return fm.FederatedData.from_sites(sites + extra, label_type="binary")


@pytest.mark.slow
def test_robust_aggregators_survive_faulty_sites_and_plain_fedavg_does_not():
  train, test = fm.datasets.heart_disease()
  seven = _faulty_federation(train)
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  params = model.init(jax.random.PRNGKey(0), train.x[0, :1])
  faults = robust.inject_faults({4: "nan", 5: 1000.0, 6: "sign_flip"})
  mean = agg.weighted_mean()

  def run(data, aggregator):
    algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), local_epochs=1,
                                batch_size=4, aggregator=aggregator)
    state, hist = fm.run_rounds(algo, algo.init(params), data, ROUNDS, jax.random.PRNGKey(100),
                                progress=False)
    finite = all(np.isfinite(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(state.params))
    acc = (fm.evaluation.binary_report(model.apply, state.params, test)["mean"]["accuracy"]
           if finite else float("nan"))
    return acc, float(fm.weighted_objective(loss_fn, state.params, test)), hist

  clean_acc, clean_loss, _ = run(train, mean)
  # Plain FedAvg: the NaN site poisons the model at round 1.
  plain_acc, plain_loss, hist = run(seven, agg.chain(faults, mean))
  assert np.isnan(plain_acc) and not np.isfinite(plain_loss)
  assert not np.isfinite(hist["update_norm"][0])
  # Dropping the NaN site is not enough for a plain mean: the x1000 site blows up the loss.
  rej_acc, rej_loss, hist = run(seven, agg.chain(faults, robust.reject_nonfinite(), mean))
  np.testing.assert_array_equal(hist["num_rejected"], 1)
  assert rej_loss > 5 * clean_loss

  robust_chains = {
      "median": robust.coordinate_median(),
      "trimmed": robust.trimmed_mean(0.2),
      "norm_bound": None,
  }
  for name, reducer in robust_chains.items():
    if reducer is None:
      clean = agg.chain(robust.norm_bound(0.1), mean)
      faulty = agg.chain(faults, robust.reject_nonfinite(), robust.norm_bound(0.1), mean)
    else:
      clean = agg.chain(reducer)
      faulty = agg.chain(faults, robust.reject_nonfinite(), reducer)
    c_acc, c_loss, _ = run(train, clean)
    f_acc, f_loss, hist = run(seven, faulty)
    assert np.all(hist["num_rejected"] == 1), name
    assert f_acc >= c_acc - NEAR_CLEAN, (name, c_acc, f_acc)
    assert f_loss <= 1.25 * c_loss, (name, c_loss, f_loss)
    assert f_acc > 0.65, (name, f_acc)
