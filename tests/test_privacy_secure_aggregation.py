"""Secure aggregation (Bonawitz et al. 2017): exact sums, uniform masked words, dropouts."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med.privacy import secure_aggregation as sa

K = 6


def updates(k=K, d=50, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(k, d)) * 2, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(k,)), jnp.float32)}


def plain_sum(u, keep):
  return {n: np.asarray(v, np.float64)[keep].sum(0) for n, v in u.items()}


def test_shamir_any_t_shares_reconstruct():
  rng = random.Random(0)
  secret = 0xDEADBEEFCAFEF00D
  shares = sa.shamir_share(secret, 7, 4, rng)
  for subset in ([0, 1, 2, 3], [6, 2, 4, 0], [1, 3, 5, 6], list(range(7))):
    assert sa.shamir_reconstruct([shares[i] for i in subset]) == secret
  # t - 1 shares interpolate some other value (a uniformly random one in GF(p))
  assert sa.shamir_reconstruct(shares[:3]) != secret


def test_sum_equals_plain_sum_up_to_quantisation():
  u = updates()
  res = sa.secure_sum(u, jax.random.PRNGKey(1), threshold=4)
  ref = plain_sum(u, np.ones(K, bool))
  flat_ref = np.concatenate([ref["b"].ravel(), ref["w"].ravel()])  # ravel order: b, w
  bound = sa.quantization_bound(K, sa.DEFAULT_SCALE, flat_ref)
  got = np.concatenate([np.asarray(res.total["b"]).ravel(), np.asarray(res.total["w"]).ravel()])
  assert np.all(np.abs(got - flat_ref) <= bound)
  assert res.clipped == 0
  # the bound is tight-ish: the error is not trivially zero
  assert np.max(np.abs(got - flat_ref)) > 0


def test_pairwise_masks_cancel_exactly_in_the_ring():
  encoded = jax.random.bits(jax.random.PRNGKey(0), (K, 40), jnp.uint32)
  self_seeds, pair_seeds = sa.setup_seeds(jax.random.PRNGKey(1), K)
  masked = sa.mask_inputs(encoded, self_seeds, pair_seeds)
  self_masks = jnp.stack([sa.prg(self_seeds[i], 40) for i in range(K)])
  # sum_i y_i = sum_i e_i + sum_i PRG(b_i) (mod 2^32): the pairwise masks cancel
  np.testing.assert_array_equal(
      jnp.sum(masked, 0, dtype=jnp.uint32) - jnp.sum(self_masks, 0, dtype=jnp.uint32),
      jnp.sum(encoded, 0, dtype=jnp.uint32))
  assert not np.array_equal(np.asarray(masked), np.asarray(encoded))


def test_single_masked_update_is_uniform():
  """Site 0 sends a constant update; its masked words look uniform on Z_{2^32}."""
  d = 20000
  u = {"w": jnp.zeros((4, d), jnp.float32).at[0].set(1.0)}
  res = sa.secure_sum(u, jax.random.PRNGKey(5), threshold=3)
  words = res.server_view.masked_inputs[0].astype(np.float64)
  ks = stats.kstest(words / 2.0**32, "uniform")
  assert ks.pvalue > 0.01
  counts = np.bincount((res.server_view.masked_inputs[0] >> 24).astype(np.int64), minlength=256)
  assert stats.chisquare(counts).pvalue > 0.01
  # the plaintext encoding (1.0 * 2^20 everywhere) is a single word: maximally non-uniform
  enc, _ = sa.encode(jnp.ones(d), sa.DEFAULT_SCALE, sa.DEFAULT_CLIP_RANGE)
  assert len(np.unique(np.asarray(enc))) == 1
  np.testing.assert_allclose(np.asarray(res.total["w"]), [1.0] * d, atol=4 / 2**21)


@pytest.mark.parametrize("dropped", [[], [2], [0, 5]])
def test_dropouts_up_to_k_minus_t_are_recovered(dropped):
  t = 4  # K - t = 2 dropouts allowed
  u = updates(seed=3)
  res = sa.secure_sum(u, jax.random.PRNGKey(2), threshold=t, dropped=dropped)
  keep = np.ones(K, bool)
  keep[dropped] = False
  ref = plain_sum(u, keep)
  for name in ("w", "b"):
    bound = sa.quantization_bound(keep.sum(), sa.DEFAULT_SCALE, ref[name])
    assert np.all(np.abs(np.asarray(res.total[name]) - ref[name]) <= bound)
  view = res.server_view
  assert set(view.masked_inputs) == set(np.flatnonzero(keep).tolist())
  assert set(view.revealed_self_seeds) == set(np.flatnonzero(keep).tolist())
  assert {u for u, _ in view.revealed_pair_seeds} == set(dropped)
  assert view.shares_received == t * (keep.sum() + len(dropped) * (K - 1))


def test_too_many_dropouts_fail_loudly():
  with pytest.raises(sa.TooManyDropouts, match="too many dropouts: only 3 of 6"):
    sa.secure_sum(updates(), jax.random.PRNGKey(0), threshold=4, dropped=[0, 1, 2])


def test_bad_options():
  with pytest.raises(ValueError, match=r"threshold t = 7 > number of sites K = 6"):
    sa.secure_sum(updates(), jax.random.PRNGKey(0), threshold=7)
  with pytest.raises(ValueError, match="threshold t must be >= 1"):
    sa.secure_sum(updates(), jax.random.PRNGKey(0), threshold=0)
  with pytest.raises(ValueError, match="overflows"):
    sa.secure_sum(updates(), jax.random.PRNGKey(0), threshold=3, scale=2.0**30)
  with pytest.raises(ValueError, match="dropped site 9"):
    sa.secure_sum(updates(), jax.random.PRNGKey(0), threshold=3, dropped=[9])
  with pytest.raises(ValueError, match="threshold t = 5 > number of sites K = 3"):
    sa.secure_weighted_mean(threshold=5).init({"a": jnp.zeros(1)}, 3)


def test_clipping_range_is_applied_and_counted():
  u = {"w": jnp.array([[20.0, 1.0], [1.0, -30.0]])}
  res = sa.secure_sum(u, jax.random.PRNGKey(0), threshold=2)
  np.testing.assert_allclose(np.asarray(res.total["w"]), [17.0, -15.0], atol=1e-5)
  assert res.clipped == 2


def test_aggregator_in_a_round_matches_weighted_mean():
  sites = make_sites([9, 4, 6, 7], seed=3)
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  kwargs = dict(client_optimizer=optax.sgd(0.3), local_epochs=1, batch_size=3)
  plain = fm.algorithms.fedavg(bce_loss, **kwargs)
  secure = fm.algorithms.fedavg(bce_loss, aggregator=sa.secure_weighted_mean(threshold=3),
                                **kwargs)
  s1, s2 = plain.init(params), secure.init(params)
  for r in range(3):
    key = jax.random.PRNGKey(r)
    s1, _ = plain.round(s1, data, key)
    s2, m = secure.round(s2, data, key)
    assert int(m["secagg_dropouts"]) == 0
  np.testing.assert_allclose(s2.params["w"], s1.params["w"], atol=3 * 4 / 2**21)
  np.testing.assert_allclose(s2.params["b"], s1.params["b"], atol=3 * 4 / 2**21)


def test_aggregator_recovers_a_dropped_site_and_fails_below_threshold():
  """A site with weight 0 (here: empty) sends nothing; its masks are recovered."""
  u = updates(k=4, d=5, seed=1)
  weights = jnp.array([3.0, 0.0, 1.0, 2.0])
  ctx = fm.aggregators.full_context(jnp.array([3, 0, 1, 2]))
  agg = sa.secure_weighted_mean(threshold=3)
  out, _, m = jax.jit(agg.aggregate)(u, weights, (), jax.random.PRNGKey(0), ctx)
  ref, _, _ = fm.aggregators.weighted_mean().aggregate(u, weights, (), None, ctx)
  np.testing.assert_allclose(out["w"], ref["w"], atol=4 / 2**21)
  assert int(m["secagg_dropouts"]) == 1
  with pytest.raises(Exception, match="too many dropouts"):
    jax.block_until_ready(agg.aggregate(u, jnp.array([1.0, 0.0, 0.0, 1.0]), (),
                                        jax.random.PRNGKey(0), ctx))
