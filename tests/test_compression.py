"""Compression: unbiasedness and variance bounds, identities, top-k, error feedback
against a sequential NumPy reference, exact bytes, and FedAvg integration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med import compression as C
from fedjax_med.aggregators.compression.qsgd import qsgd_levels
from fedjax_med.core import aggregation as agg
from fedjax_med.core.options import OptionError

NUM_KEYS = 20_000


def _vector(d=40, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=d), jnp.float32)


def _draws(compressor, x, num=NUM_KEYS):
  """decode(encode(x, key)) for `num` keys, `[num, d]` float64."""
  def one(key):
    payload, _ = compressor.encode({"x": x}, (), key)
    return compressor.decode(payload, {"x": x})["x"]
  keys = jax.random.split(jax.random.PRNGKey(123), num)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _nbytes_numpy(payload):
  return sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(payload))


# ---------------------------------------------------------------- bit packing

@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_bits_matches_numpy_packbits(bits):
  rng = np.random.default_rng(bits)
  d = 37
  codes = rng.integers(0, 1 << bits, size=d).astype(np.uint32)
  packed = np.asarray(C.pack_bits(jnp.asarray(codes), bits))
  bit_matrix = (codes[:, None] >> np.arange(bits)) & 1            # [d, bits], LSB first
  want = np.packbits(bit_matrix.reshape(-1).astype(np.uint8), bitorder="little")
  assert packed.dtype == np.uint8 and packed.shape == (math.ceil(d * bits / 8),)
  np.testing.assert_array_equal(packed, want)
  np.testing.assert_array_equal(np.asarray(C.unpack_bits(jnp.asarray(packed), bits, d)), codes)


# ---------------------------------------------------------------- unbiasedness, variance

def _check_unbiased(draws, x):
  """|mean_i - x_i| <= 5 standard errors (empirical) + 1e-6, every coordinate."""
  mean = draws.mean(axis=0)
  se = draws.std(axis=0, ddof=1) / math.sqrt(draws.shape[0])
  assert np.all(np.abs(mean - np.asarray(x, np.float64)) <= 5 * se + 1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_unbiased_and_variance_matches_lemma_3_1(bits):
  x = _vector()
  draws = _draws(C.qsgd(bits), x)
  _check_unbiased(draws, x)
  xd = np.asarray(x, np.float64)
  d, s, norm = xd.size, qsgd_levels(bits), np.linalg.norm(xd)
  r = np.abs(xd) / norm * s
  frac = r - np.floor(r)
  exact = (norm / s) ** 2 * np.sum(frac * (1 - frac))        # E||Q - x||^2, Bernoulli rounding
  bound = min(d / s**2, math.sqrt(d) / s) * norm**2          # Alistarh et al., Lemma 3.1
  empirical = np.mean(np.sum((draws - xd) ** 2, axis=1))
  assert exact <= bound
  assert empirical == pytest.approx(exact, rel=0.05)
  assert empirical <= bound


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_uniform_unbiased_and_variance_within_suresh_bound(bits):
  x = _vector(seed=1)
  draws = _draws(C.uniform(bits), x)
  _check_unbiased(draws, x)
  xd = np.asarray(x, np.float64)
  levels = 2**bits - 1
  step = (xd.max() - xd.min()) / levels
  t = (xd - xd.min()) / step
  frac = t - np.floor(t)
  exact = step**2 * np.sum(frac * (1 - frac))
  bound = xd.size * (xd.max() - xd.min()) ** 2 / (4 * levels**2)   # Suresh et al. 2017
  empirical = np.mean(np.sum((draws - xd) ** 2, axis=1))
  assert empirical == pytest.approx(exact, rel=0.05)
  assert empirical <= bound <= xd.size * np.sum(xd**2) / (2 * levels**2)


def test_rotated_quantiser_unbiased_and_error_shrinks_on_a_spiky_vector():
  """A spiky vector has a wide range; after the rotation the range (and the error) shrinks."""
  x = np.zeros(64, np.float32)
  x[3], x[40] = 5.0, -4.0
  x = jnp.asarray(x + 0.01 * np.random.default_rng(2).normal(size=64).astype(np.float32))
  rotated = _draws(C.rotated(C.uniform(2)), x, 10_000)
  plain = _draws(C.uniform(2), x, 10_000)
  _check_unbiased(rotated, x)
  mse = lambda d: np.mean(np.sum((d - np.asarray(x, np.float64)) ** 2, axis=1))
  assert mse(rotated) < 0.5 * mse(plain)


def test_hadamard_transform_and_rotation_are_exact():
  hadamard = np.ones((1, 1))
  for n in (1, 2, 4, 8, 16, 32, 64):           # Sylvester's construction, H_2n = [[H, H], [H, -H]]
    if n > 1:
      hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    if n in (1, 2, 8, 64):
      x = np.random.default_rng(n).normal(size=n).astype(np.float32)
      np.testing.assert_allclose(C.hadamard_transform(jnp.asarray(x)), hadamard @ x,
                                 rtol=1e-5, atol=1e-5)
  from fedjax_med.aggregators.compression.rotation import rotate, unrotate
  x = _vector(d=13)
  seed = jnp.asarray([7], jnp.uint32)
  y = rotate(x, seed)
  assert y.shape == (16,)
  np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-6)   # orthonormal
  np.testing.assert_allclose(unrotate(y, seed, 13), x, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- identities

@pytest.mark.parametrize("compressor", [C.qsgd(32), C.uniform(32), C.top_k(1.0), C.float32()],
                         ids=["qsgd32", "uniform32", "top100%", "float32"])
def test_b32_and_k100_are_the_identity(compressor):
  x = {"w": _vector(d=13), "b": jnp.asarray([0.25], jnp.float32)}
  payload, _ = compressor.encode(x, compressor.init(x), jax.random.PRNGKey(0))
  y = compressor.decode(payload, x)
  for name in x:
    np.testing.assert_array_equal(np.asarray(y[name]), np.asarray(x[name]))
  assert C.payload_nbytes(payload) == 4 * 14   # the float32 reference


# ---------------------------------------------------------------- top-k

def test_top_k_keeps_exactly_the_k_largest_magnitudes():
  rng = np.random.default_rng(3)
  values = rng.permutation(np.arange(1, 38)).astype(np.float32) * rng.choice([-1, 1], 37)
  tree = {"a": jnp.asarray(values[:30].reshape(5, 6)), "b": jnp.asarray(values[30:])}
  comp = C.top_k(0.1)                      # k = ceil(3.7) = 4
  payload, _ = comp.encode(tree, (), jax.random.PRNGKey(0))
  assert payload["indices"].dtype == jnp.uint8 and payload["values"].shape == (4,)
  out = np.concatenate([np.asarray(v).reshape(-1) for v in
                        jax.tree_util.tree_leaves(comp.decode(payload, tree))])
  flat = np.concatenate([np.asarray(v).reshape(-1) for v in jax.tree_util.tree_leaves(tree)])
  keep = np.argsort(-np.abs(flat))[:4]
  want = np.zeros_like(flat)
  want[keep] = flat[keep]
  np.testing.assert_array_equal(out, want)
  assert C.num_kept(0.07, 100) == 7 and C.num_kept(0.01, 14) == 1


# ---------------------------------------------------------------- error feedback

def _np_top_k(p, k):
  out = np.zeros_like(p)
  idx = np.argsort(-np.abs(p), kind="stable")[:k]
  out[idx] = p[idx]
  return out


def test_error_feedback_carries_the_exact_residual_vs_sequential_reference():
  """uplink(error_feedback(top_k)) over rounds with changing cohorts == a NumPy loop
  over sites keeping e_k, p = u + e_k, sent = top_k(p), e_k <- p - sent."""
  k_sites, dim, fraction = 4, 10, 0.2
  link = C.uplink(C.error_feedback(C.top_k(fraction)))
  template = {"w": jnp.zeros((dim,), jnp.float32)}
  state = link.init(template, k_sites)
  residual = np.zeros((k_sites, dim), np.float32)
  rng = np.random.default_rng(4)
  cohorts = [[0, 2], [1, 2, 3], [0, 1, 2, 3], [3, 0]]
  for r, cohort in enumerate(cohorts):
    updates = rng.normal(size=(len(cohort), dim)).astype(np.float32)
    weights = np.ones(len(cohort), np.float32)
    if r == 2:
      weights[1] = 0.0                      # site 1 sends nothing this round
    ctx = agg.AggregationContext(jnp.asarray(cohort, jnp.int32), k_sites,
                                 jnp.ones(len(cohort), jnp.int32))
    decoded, _, state, metrics = link.apply({"w": jnp.asarray(updates)}, jnp.asarray(weights),
                                       state, jax.random.PRNGKey(r), ctx)
    for c, site in enumerate(cohort):
      p = updates[c] + residual[site]
      sent = _np_top_k(p, 2)
      np.testing.assert_array_equal(np.asarray(decoded["w"][c]), sent)
      if weights[c] > 0:
        residual[site] = p - sent
    np.testing.assert_array_equal(np.asarray(state["w"]), residual)
    np.testing.assert_array_equal(np.asarray(metrics["bytes_up"]),
                                  np.where(weights > 0, 2 * 4 + 2 * 1, 0))


def test_ef_sign_matches_reference_over_rounds():
  link = C.uplink(C.error_feedback(C.sign()))
  template = {"w": jnp.zeros((9,), jnp.float32)}
  state = link.init(template, 2)
  e = np.zeros((2, 9), np.float64)
  rng = np.random.default_rng(5)
  ctx = agg.full_context(jnp.asarray([3, 4]))
  for r in range(4):
    u = rng.normal(size=(2, 9)).astype(np.float32)
    decoded, _, state, _ = link.apply({"w": jnp.asarray(u)}, jnp.ones(2), state,
                                      jax.random.PRNGKey(r), ctx)
    p = u + e
    sent = np.abs(p).mean(axis=1, keepdims=True) * np.where(p >= 0, 1.0, -1.0)
    np.testing.assert_allclose(np.asarray(decoded["w"]), sent, rtol=1e-5, atol=1e-6)
    e = p - sent
    np.testing.assert_allclose(np.asarray(state["w"]), e, rtol=1e-5, atol=1e-6)


def test_error_feedback_needs_num_sites():
  link = C.uplink(C.error_feedback(C.top_k(0.5)))
  with pytest.raises(ValueError, match="num_sites"):
    link.init({"w": jnp.zeros(3)})
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.1), batch_size=2,
                              aggregator=agg.chain(link, agg.weighted_mean()))
  with pytest.raises(ValueError, match="num_sites"):
    algo.init(init_params())


# ---------------------------------------------------------------- exact bytes

LOGISTIC = {"w": jnp.zeros((13,), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}


@pytest.mark.parametrize("compressor,expected", [
    (C.float32(), 56),                    # 14 float32
    (C.qsgd(8), (13 + 4) + (1 + 4)),      # codes + ||v|| per tensor
    (C.qsgd(4), (7 + 4) + (1 + 4)),       # 13 codes x 4 bits = 7 bytes
    (C.uniform(1), (2 + 8) + (1 + 8)),    # (lo, hi) per tensor
    (C.uniform(3), (5 + 8) + (1 + 8)),    # 39 bits = 5 bytes
    (C.rotated(C.uniform(4)), (8 + 8 + 4) + (1 + 8 + 4)),   # 13 -> 16 padded, + seed
    (C.sign(), (2 + 4) + (1 + 4)),
    (C.error_feedback(C.sign()), 11),
    (C.top_k(0.01), 4 + 1),               # one float32 value + one uint8 index
    (C.top_k(0.5), 7 * 4 + 7),
], ids=lambda v: getattr(v, "name", str(v)))
def test_byte_counts_equal_nbytes_of_the_encoded_arrays(compressor, expected):
  x = {"w": _vector(d=13), "b": jnp.asarray([0.5], jnp.float32)}
  payload, _ = compressor.encode(x, compressor.init(x), jax.random.PRNGKey(0))
  assert C.payload_nbytes(payload) == _nbytes_numpy(payload) == expected
  assert C.encoded_nbytes(compressor, LOGISTIC) == expected
  for leaf in jax.tree_util.tree_leaves(payload):
    assert leaf.dtype in (jnp.uint8, jnp.float32, jnp.uint32)


def test_index_dtype_grows_with_the_update():
  big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=300), jnp.float32)}
  payload, _ = C.top_k(0.01).encode(big, (), jax.random.PRNGKey(0))
  assert payload["indices"].dtype == jnp.uint16
  assert C.payload_nbytes(payload) == 3 * 4 + 3 * 2 == _nbytes_numpy(payload)


def test_round_metrics_hold_exact_bytes_per_site_and_totals():
  sites = make_sites([6, 3, 5])
  data = fm.FederatedData.from_sites(sites)
  comm = C.communication(C.qsgd(4), C.uniform(8), record_payloads=True)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.1), batch_size=2,
                              aggregator=comm.aggregator, downlink=comm.downlink)
  state, metrics = algo.round(algo.init(init_params()), data, jax.random.PRNGKey(0))
  payload = {n: np.asarray(v) for n, v in metrics.items() if n.startswith("payload")}
  per_site = sum(a.nbytes for a in payload.values()) // 3
  assert per_site == (2 + 4) + (1 + 4)    # w [3]: 12 bits -> 2 bytes, + norm; b [1]
  np.testing.assert_array_equal(metrics["bytes_up"], [per_site] * 3)
  assert int(metrics["bytes_up_total"]) == 3 * per_site
  down = (3 + 8) + (1 + 8)                 # uniform(8) on the broadcast model
  np.testing.assert_array_equal(metrics["bytes_down"], [down] * 3)
  assert int(metrics["bytes_down_total"]) == 3 * down
  assert int(metrics["bytes_down_per_site"]) == down
  assert int(metrics["bytes_reference_per_site"]) == 16


def test_identity_compressed_fedavg_equals_fedavg_bit_for_bit():
  sites = make_sites([7, 2, 5, 4], seed=6)
  data = fm.FederatedData.from_sites(sites)
  kwargs = dict(client_optimizer=optax.sgd(0.2), local_epochs=2, batch_size=2)
  plain = fm.algorithms.fedavg(bce_loss, **kwargs)
  comm = C.communication()            # float32 uplink, exact downlink
  compressed = fm.algorithms.fedavg(bce_loss, aggregator=comm.aggregator,
                                    downlink=comm.downlink, **kwargs)
  a, b = plain.init(init_params()), compressed.init(init_params(), 4)
  for r in range(3):
    key = jax.random.PRNGKey(r)
    a, _ = plain.round(a, data, key)
    b, metrics = compressed.round(b, data, key)
    for name in ("w", "b"):
      np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]))
  assert int(metrics["bytes_up_total"]) == 4 * 16


def test_compressed_fedavg_with_cohorts_only_changes_participants_residuals():
  sites = make_sites([5, 4, 6, 3], seed=7)
  data = fm.FederatedData.from_sites(sites)
  comm = C.communication(C.error_feedback(C.top_k(0.25)))
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=2, aggregator=comm.aggregator)
  state = algo.init(init_params(), 4)
  before = np.asarray(state.aggregator_state[0]["w"])
  state, metrics = algo.round(state, data, jax.random.PRNGKey(1))
  after = np.asarray(state.aggregator_state[0]["w"])
  cohort = set(np.asarray(metrics["cohort"]).tolist())
  for k in range(4):
    assert (not np.array_equal(before[k], after[k])) == (k in cohort)


def test_downlink_hook_compresses_the_broadcast_and_rejects_state():
  hook = C.downlink(C.uniform(8))
  w = {"w": _vector(d=5), "b": jnp.asarray([0.1], jnp.float32)}
  received, metrics = hook(w, jax.random.PRNGKey(0))
  assert int(metrics["bytes_down_per_site"]) == (5 + 8) + (1 + 8)
  np.testing.assert_allclose(received["w"], w["w"], atol=float(jnp.ptp(w["w"])) / 255 + 1e-6)
  with pytest.raises(OptionError, match="stateless"):
    C.downlink(C.error_feedback(C.sign()))(w, jax.random.PRNGKey(0))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("make,match", [
    (lambda: C.qsgd(0), "bits must be >= 1"),
    (lambda: C.qsgd(-3), "bits must be >= 1"),
    (lambda: C.qsgd(1), "bits must be >= 2"),
    (lambda: C.uniform(0), "bits must be >= 1"),
    (lambda: C.uniform(20), "<= 16"),
    (lambda: C.uniform(2.5), "must be an integer"),
    (lambda: C.top_k(0.0), r"fraction must be in \(0, 1\]"),
    (lambda: C.top_k(1.5), r"fraction must be in \(0, 1\]"),
    (lambda: C.top_k(-0.1), r"fraction must be in \(0, 1\]"),
    (lambda: C.rotated(C.top_k(0.5)), "per-tensor"),
    (lambda: C.uplink("qsgd"), "Compressor"),
])
def test_bad_input_raises_clear_errors(make, match):
  with pytest.raises(OptionError, match=match):
    make()
