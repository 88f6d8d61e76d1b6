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
  # the shares are points of one degree-3 polynomial: exact Lagrange evaluation in
  # Python integers at x = 6 from shares 1..4 reproduces share 6 (independent formula)
  p = sa.SHAMIR_PRIME
  pts = shares[:4]
  val = 0
  for i, (xi, yi) in enumerate(pts):
    num = den = 1
    for j, (xj, _) in enumerate(pts):
      if i != j:
        num, den = num * (6 - xj), den * (xi - xj)
    val += yi * num * pow(den, -1, p)
  assert val % p == shares[5][1]


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
  """mask_inputs against the protocol's equation in Python integers mod 2^32, with the
  documented PRG (jax.random.bits of the seed words) and seeds from draw_seeds."""
  encoded = jax.random.bits(jax.random.PRNGKey(0), (K, 40), jnp.uint32)
  self_seeds, pair_seeds = sa.draw_seeds(K)
  assert np.array_equal(pair_seeds, np.swapaxes(pair_seeds, 0, 1))
  assert not pair_seeds[np.arange(K), np.arange(K)].any()
  masked = np.asarray(sa.mask_inputs(encoded, jnp.asarray(self_seeds), jnp.asarray(pair_seeds)))

  def bits(seed):
    return [int(v) for v in np.asarray(jax.random.bits(jnp.asarray(seed), (40,), jnp.uint32))]

  enc = np.asarray(encoded)
  total = [0] * 40
  for i in range(K):
    ref = [int(v) for v in enc[i]]
    ref = [a + m for a, m in zip(ref, bits(self_seeds[i]))]
    for j in range(K):
      if j != i:
        sign = 1 if i < j else -1
        ref = [a + sign * m for a, m in zip(ref, bits(pair_seeds[i, j]))]
    ref = [a % 2**32 for a in ref]
    assert [int(v) for v in masked[i]] == ref
    total = [a + b - m for a, b, m in zip(total, ref, bits(self_seeds[i]))]
  # sum_i y_i - sum_i PRG(b_i) = sum_i e_i (mod 2^32): the pairwise masks cancel
  assert [a % 2**32 for a in total] == [int(v) % 2**32 for v in enc.astype(np.uint64).sum(0)]


def test_single_masked_update_is_uniform():
  """Site 0 sends a constant update; its masked words look uniform on Z_{2^32}."""
  d = 20000
  u = {"w": jnp.zeros((4, d), jnp.float32).at[0].set(1.0)}
  res = sa.secure_sum(u, jax.random.PRNGKey(5), threshold=3)
  # The masks come from the OS CSPRNG (not reproducible), so each run is a fresh
  # draw: the level 1e-6 makes a false failure a one-in-a-million event per test,
  # while the plaintext words (a single value, below) fail both tests with p ~ 0.
  words = res.server_view.masked_inputs[0].astype(np.float64)
  ks = stats.kstest(words / 2.0**32, "uniform")
  assert ks.pvalue > 1e-6
  counts = np.bincount((res.server_view.masked_inputs[0] >> 24).astype(np.int64), minlength=256)
  assert stats.chisquare(counts).pvalue > 1e-6
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


# ----------------------------------------------------------------------------- issue 17


def _capture_books(monkeypatch):
  """Records every ShareBook the protocol builds (what the sites hold) with its inputs."""
  books = []
  real = sa.share_seeds

  def spy(self_seeds, pair_seeds, threshold, *args, **kwargs):
    book = real(self_seeds, pair_seeds, threshold, *args, **kwargs)
    books.append((np.array(self_seeds), np.array(pair_seeds), book))
    return book

  monkeypatch.setattr(sa, "share_seeds", spy)
  return books


def _replay_coefficients(rng, k, t):
  """The Shamir coefficients a public-seeded rng would draw, in share_seeds' order."""
  coeffs = {}
  for owner in range(k):
    for other in [None] + [j for j in range(k) if j != owner]:
      coeffs[(owner, other)] = [rng.randrange(sa.SHAMIR_PRIME) for _ in range(t - 1)]
  return coeffs


def _attack_secret(share, coeffs):
  """f(0) from ONE share (x, f(x)) when the other coefficients are known."""
  x, y = share
  return (y - sum(c * x ** (j + 1) for j, c in enumerate(coeffs))) % sa.SHAMIR_PRIME


def _attack_update(view, held, coeffs, target, k, d, scale):
  """The server plus one colluding site (its shares `held`) unmask site `target`'s input:
  recover b_target and s_target,j, strip the masks, decode. None if a recovered value is
  not even a 64-bit seed (the attack failed)."""
  b = _attack_secret(held[(target, None)], coeffs[(target, None)])
  pairs = {j: _attack_secret(held[(target, j)], coeffs[(target, j)])
           for j in range(k) if j != target}
  if b >= 2**64 or any(v >= 2**64 for v in pairs.values()):
    return None
  words = [view.masked_inputs[target].astype(np.uint64)]
  mask = np.asarray(jax.random.bits(jnp.asarray(sa._seed_words(b)), (d,), jnp.uint32),
                    np.uint64)
  e = words[0] - mask
  for j, v in pairs.items():
    m = np.asarray(jax.random.bits(jnp.asarray(sa._seed_words(v)), (d,), jnp.uint32),
                   np.uint64)
    e = e - m if target < j else e + m
  e = (e % 2**32).astype(np.uint32).view(np.int32)
  return e.astype(np.float64) / scale


def test_server_plus_one_site_cannot_unmask_an_individual_update(monkeypatch):
  """t = 3 of K = 4: the server's view plus ONE site's shares (t - 1 = 2 < t) must not
  determine another site's update. The attack: replay the Shamir coefficients from the
  public seed (secure_sum's old default seed_rng = 0; inside the aggregator the revealed
  self seed b_0), so one share gives each secret. It recovered site 0's update exactly on
  the old code; with coefficients from the OS's CSPRNG it must fail."""
  k, d, t = 4, 64, 3
  books = _capture_books(monkeypatch)
  u = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(k, d)), jnp.float32)}
  res = sa.secure_sum(u, jax.random.PRNGKey(0), threshold=t)
  _, _, book = books[-1]
  guess = _attack_update(res.server_view, book.held[1], _replay_coefficients(
      random.Random(0), k, t), 0, k, d, sa.DEFAULT_SCALE)
  truth = np.asarray(u["w"][0], np.float64)
  assert guess is None or np.max(np.abs(guess - truth)) > 1.0, "site 0's update recovered"
  # inside the aggregator: the server knows b_0 (revealed) and site 1's shares
  agg = sa.secure_weighted_mean(threshold=t)
  ctx = fm.aggregators.full_context(jnp.full((k,), 5, jnp.int32))
  jax.block_until_ready(jax.jit(agg.aggregate)(u, jnp.ones(k), (), jax.random.PRNGKey(1),
                                               ctx))
  self_seeds, pair_seeds, book = books[-1]
  coeffs = _replay_coefficients(random.Random(sa._seed_int(self_seeds[0])), k, t)
  recovered = _attack_secret(book.held[1][(2, None)], coeffs[(2, None)])
  assert recovered != sa._seed_int(self_seeds[2]), "site 2's self-mask seed recovered"


def test_fresh_secret_randomness_for_the_same_public_inputs(monkeypatch):
  """Two runs with the same updates and key: the seeds, the Shamir shares and the masked
  inputs are fresh (drawn from the OS's CSPRNG; equal with probability 2^-64 or less),
  and the unmasked sums are identical (the masks cancel exactly in Z_{2^32})."""
  books = _capture_books(monkeypatch)
  u = updates(k=4, d=16)
  r1 = sa.secure_sum(u, jax.random.PRNGKey(0), threshold=3)
  r2 = sa.secure_sum(u, jax.random.PRNGKey(0), threshold=3)
  (b1, p1, book1), (b2, p2, book2) = books
  assert not np.array_equal(b1, b2) and not np.array_equal(p1, p2)
  assert book1.held[1][(0, None)] != book2.held[1][(0, None)]
  assert not np.array_equal(r1.server_view.masked_inputs[0], r2.server_view.masked_inputs[0])
  np.testing.assert_array_equal(r1.words, r2.words)
  # the same secret shared twice by the default source: different shares
  s1 = sa.shamir_share(12345, 5, 3)
  s2 = sa.shamir_share(12345, 5, 3)
  assert s1 != s2 and sa.shamir_reconstruct(s1[:3]) == sa.shamir_reconstruct(s2[2:]) == 12345


def test_t_minus_1_shares_are_independent_of_the_secret():
  """Shamir with uniform coefficients: t - 1 = 2 shares are uniform on GF(p)^2 whatever the
  secret. 3000 sharings of secret 0 and of secret p - 1 (seeded rng, deterministic):
  holder 1's and 2's shares / p pass KS against U(0, 1) and a two-sample KS between the
  two secrets (alpha = 1e-3; power > 0.99 against a shift of 0.06 in the CDF at n = 3000).
  And for ANY candidate secret there is exactly one polynomial of degree t - 1 through
  it and the two shares (Lagrange), so the two shares cannot single out the secret."""
  rng = random.Random(7)
  p = sa.SHAMIR_PRIME
  draws = {s: np.array([[y / p for _, y in sa.shamir_share(s, 5, 3, rng)[:2]]
                        for _ in range(3000)]) for s in (0, p - 1)}
  for s, v in draws.items():
    for h in range(2):
      assert stats.kstest(v[:, h], "uniform").pvalue > 1e-3
  for h in range(2):
    assert stats.ks_2samp(draws[0][:, h], draws[p - 1][:, h]).pvalue > 1e-3
  shares = sa.shamir_share(424242, 5, 3, rng)[:2]
  for candidate in (0, 1, 424242, p - 1):
    points = [(0, candidate)] + shares
    # the degree-2 polynomial through the three points reproduces both shares
    for x, y in shares:
      assert sa.shamir_reconstruct([(px - x, py) for px, py in points]) == y


@pytest.mark.parametrize("scale", [2.0**8, 2.0**14, 2.0**20, 1e6, 3.0e5])
def test_quantisation_bound_holds_against_float64(scale):
  """K = 5 sites x 40000 random float32 values in [-R, R] (R = 16, plus some of magnitude
  up to 2^-10): |decoded - sum_k x_k (float64)| <= quantization_bound at every coordinate.
  The bound K / (2 s) + 2^-24 |sum| assumes x s exact in float32, true for s a power of two;
  other scales (the old code exceeded the bound by up to 1.29x at s = 1e6) are refused."""
  k, d = 5, 40000
  rng = np.random.default_rng(11)
  x = rng.uniform(-16, 16, size=(k, d)) * np.where(rng.uniform(size=(k, d)) < 0.1,
                                                   2.0**-14, 1.0)
  x = x.astype(np.float32)
  if np.log2(scale) != np.round(np.log2(scale)):
    with pytest.raises(sa.SecureAggregationError, match="power of two"):
      sa.secure_sum({"w": jnp.asarray(x)}, jax.random.PRNGKey(0), threshold=3, scale=scale)
    return
  res = sa.secure_sum({"w": jnp.asarray(x)}, jax.random.PRNGKey(0), threshold=3, scale=scale)
  ref = x.astype(np.float64).sum(0)
  got = np.asarray(res.total["w"], np.float64)
  bound = sa.quantization_bound(k, scale, got)
  ratio = np.abs(got - ref) / bound
  assert ratio.max() <= 1.0, ratio.max()
  assert ratio.max() > 0.5  # the bound is not loose by more than 2x here
