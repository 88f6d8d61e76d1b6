"""Federated standardisation (fedjax_med.data.standardize) against NumPy float64.

Every reference is NumPy in float64 on the pooled real train rows
(np.mean, np.std with the documented ddof), never the module itself.
"""

import jax
import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import heart_disease as hd
from fedjax_med.data import standardize as st


def _sites(seed=0, sizes=(40, 7, 0, 25), d=3, offset=0.0):
  """Raw per-site features in float64 with site-specific location and scale."""
  rng = np.random.default_rng(seed)
  return [offset + rng.normal(3.0 * k, 1.0 + k, size=(n, d)) for k, n in enumerate(sizes)]


def _fed(arrays, pad_to=None):
  return fm.FederatedData.from_sites([(x, np.zeros(len(x))) for x in arrays], pad_to=pad_to)


def _pooled(arrays):
  return np.concatenate([np.asarray(a, np.float64) for a in arrays])


@pytest.mark.parametrize("ddof", [0, 1])
def test_global_statistics_match_numpy_on_pooled_train_rows(ddof):
  arrays = _sites()
  stats = st.global_statistics(arrays, ddof=ddof)
  ref = _pooled(arrays)
  # Tolerance: float64 rounding of sums of ~70 terms of size ~10 (<< 1e-12 relative).
  np.testing.assert_allclose(stats.mean, ref.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats.std, ref.std(axis=0, ddof=ddof), rtol=1e-12)
  assert stats.num_examples == len(ref) and stats.ddof == ddof
  # Same from a FederatedData (stored in float32: compare with its float64 cast).
  data = _fed(arrays)
  stats32 = st.global_statistics(data, ddof=ddof)
  ref32 = _pooled([x for x, _ in data.sites()])
  np.testing.assert_allclose(stats32.mean, ref32.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats32.std, ref32.std(axis=0, ddof=ddof), rtol=1e-12)


def test_site_statistics_are_the_sufficient_sums():
  arrays = _sites()
  n, s1, s2 = st.site_statistics(arrays)
  for k, x in enumerate(arrays):
    assert n[k] == len(x)
    np.testing.assert_allclose(s1[k], x.sum(axis=0), rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(s2[k], (x**2).sum(axis=0), rtol=1e-13, atol=1e-12)
  shift = np.array([1.0, -2.0, 0.5])
  _, s1c, s2c = st.site_statistics(arrays, shift=shift)
  np.testing.assert_allclose(s1c[0], (arrays[0] - shift).sum(0), rtol=1e-13)
  np.testing.assert_allclose(s2c[0], ((arrays[0] - shift)**2).sum(0), rtol=1e-13)


def test_variance_is_numerically_sound_far_from_zero():
  # x = 1e8 + N(0, 1): the one-pass formula Sum x^2 / n - mean^2 in float64 loses
  # every digit (1e16 * 2^-52 ~ 2); the shifted (two-round) statistics do not.
  arrays = _sites(seed=1, offset=1e8)
  ref = _pooled(arrays)
  n = len(ref)
  naive = np.sqrt(max((ref**2).sum(0)[0] / n - ref.mean(0)[0]**2, 0.0) * n / (n - 1))
  want = ref.std(axis=0, ddof=1)
  assert abs(naive - want[0]) / want[0] > 1e-3   # the naive formula really fails here
  stats = st.global_statistics(arrays, ddof=1)
  np.testing.assert_allclose(stats.std, want, rtol=1e-7)


def test_train_statistics_standardise_test_sets_without_leakage():
  train = _sites(seed=2)
  test = _sites(seed=3, sizes=(10, 5, 3, 0))
  stats, train_z, test_z = st.federated_standardize(train, test)
  ref = _pooled(train)
  mean, std = ref.mean(0), ref.std(0, ddof=1)
  for k in range(4):
    np.testing.assert_allclose(train_z[k], (train[k] - mean) / std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(test_z[k], (test[k] - mean) / std, rtol=1e-12, atol=1e-12)
  pooled_z = _pooled(train_z)
  np.testing.assert_allclose(pooled_z.mean(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(pooled_z.std(0, ddof=1), 1.0, rtol=1e-12)
  # The test sets never enter the statistics: changing them changes nothing else.
  other = [x * 100.0 - 7.0 for x in test]
  stats2, train_z2, _ = st.federated_standardize(train, other)
  np.testing.assert_array_equal(stats2.mean, stats.mean)
  np.testing.assert_array_equal(stats2.std, stats.std)
  for a, b in zip(train_z, train_z2):
    np.testing.assert_array_equal(a, b)


def test_federated_data_in_and_out_padding_and_empty_sites_change_nothing():
  arrays = _sites(seed=4, sizes=(30, 12, 5))
  data = _fed(arrays)
  padded = _fed(arrays, pad_to=64)
  with_empty = _fed(arrays[:1] + [np.zeros((0, 3))] + arrays[1:])
  base = st.global_statistics(data)
  for other in (padded, with_empty):
    got = st.global_statistics(other)
    np.testing.assert_array_equal(got.mean, base.mean)
    np.testing.assert_array_equal(got.std, base.std)
    assert got.num_examples == base.num_examples
  stats, z = st.federated_standardize(padded)
  assert isinstance(z, fm.FederatedData) and z.max_examples == 64
  x, mask = np.asarray(z.x), np.asarray(z.mask)
  assert (x[~mask] == 0).all()                      # padded rows stay zero
  ref = _pooled([x for x, _ in data.sites()])
  want = (ref - ref.mean(0)) / ref.std(0, ddof=1)
  np.testing.assert_allclose(_pooled([x for x, _ in z.sites()]), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(z.y), np.asarray(padded.y))
  np.testing.assert_array_equal(mask, np.asarray(padded.mask))


def test_secure_aggregation_matches_within_the_stated_bound():
  raw = hd.load_raw()
  train = [raw[s]["train"][0] for s in hd.SITES]
  ref = _pooled(train)
  want_mean, want_var = ref.mean(0), ref.var(0, ddof=1)
  secure = st.SecureSumOptions(key=jax.random.PRNGKey(0), threshold=3)
  stats = st.global_statistics(train, secure=secure)
  assert stats.secure
  assert (np.abs(stats.mean - want_mean) <= stats.mean_error_bound).all()
  assert (np.abs(stats.std**2 - want_var) <= stats.var_error_bound).all()
  # The bound is meaningful: well under 1% of each feature's variance.
  assert (stats.var_error_bound < 1e-2 * want_var).all()
  # The server saw masked inputs only; they are not the sites' payloads.
  assert len(stats.server_views) == 3  # counts, first, second moment
  for view in stats.server_views:
    assert sorted(view.masked_inputs) == [0, 1, 2, 3]
  # A public per-feature unit tightens the bound (fixed-point precision).
  fine = st.global_statistics(train, secure=st.SecureSumOptions(
      key=jax.random.PRNGKey(0), threshold=3, unit=np.sqrt(want_var).round(1) + 0.1,
      clip_range=64.0))
  assert (np.abs(fine.std**2 - want_var) <= fine.var_error_bound).all()
  assert (fine.var_error_bound < 1e-4 * want_var).all()
  plain = st.global_statistics(train)
  assert plain.mean_error_bound is None and not plain.secure


def test_secure_aggregation_out_of_range_is_an_error():
  arrays = [np.full((5, 2), 1e6), np.ones((3, 2))]
  with pytest.raises(ValueError, match="clip_range"):
    st.global_statistics(arrays, secure=st.SecureSumOptions(key=jax.random.PRNGKey(0)))


def test_nan_input_is_an_error_naming_site_and_feature():
  arrays = _sites()
  arrays[1][2, 1] = np.nan
  with pytest.raises(ValueError, match=r"site 1.*NaN.*feature 1"):
    st.global_statistics(arrays)


def test_nan_in_a_test_set_is_an_error():
  test = _sites(seed=5)
  test[0][0, 0] = np.inf
  with pytest.raises(ValueError, match="site 0"):
    st.federated_standardize(_sites(), test)


def test_zero_variance_feature_is_an_error_naming_it():
  arrays = _sites()
  for x in arrays:
    x[:, 2] = 4.2
  with pytest.raises(ValueError, match=r"zero variance.*feature 2 \('chol'\)"):
    st.global_statistics(arrays, feature_names=("a", "b", "chol"))
  with pytest.raises(ValueError, match="zero variance"):
    st.global_statistics(arrays, secure=st.SecureSumOptions(key=jax.random.PRNGKey(1)))


def test_constant_within_sites_but_varying_globally_is_fine():
  # Switzerland's chol is 0 on every row, but not elsewhere: global std > 0.
  arrays = _sites()
  arrays[2] = np.zeros((6, 3))
  stats = st.global_statistics(arrays)
  np.testing.assert_allclose(stats.std, _pooled(arrays).std(0, ddof=1), rtol=1e-12)


def test_empty_federation_is_an_error():
  with pytest.raises(ValueError, match="no sites"):
    st.global_statistics([])
  with pytest.raises(ValueError, match="no real rows"):
    st.global_statistics([np.zeros((0, 3)), np.zeros((0, 3))])
  with pytest.raises(ValueError, match="ddof"):
    st.global_statistics([np.ones((1, 3))], ddof=1)


def test_mismatched_feature_shapes_are_an_error():
  with pytest.raises(ValueError, match="site 1"):
    st.global_statistics([np.ones((3, 2)), np.ones((3, 4))])
  stats = st.global_statistics(_sites())
  with pytest.raises(ValueError, match="feature shape"):
    stats.apply([np.ones((3, 4))])


def test_reexported_from_datasets():
  assert fm.datasets.federated_standardize is st.federated_standardize
