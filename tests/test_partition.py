"""Partitioners: every row in exactly one site, determinism, skew that follows alpha.

References are written here independently: a plain-Python check that the
parts are a permutation of range(N), and NumPy loops for label proportions
and total-variation distance.
"""

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import partition as P


def _labels(n=2000, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  # Unequal class sizes: 40 %, 30 %, 20 %, 10 %.
  return rng.choice(num_classes, size=n, p=[0.4, 0.3, 0.2, 0.1][:num_classes])


def _assert_exact_cover(parts, n):
  """Independent check: concatenated parts sorted == range(n), each part sorted int64."""
  flat = sorted(int(i) for p in parts for i in p)
  assert flat == list(range(n))
  assert sum(len(p) for p in parts) == n
  for p in parts:
    assert p.dtype == np.int64 and list(p) == sorted(p)


def _tv_to_global(labels, parts):
  """Mean over sites of the total-variation distance between the site's and
  the global label distribution: 0.5 sum_c |p_kc - p_c| (NumPy loop)."""
  classes = np.unique(labels)
  glob = np.array([np.mean(labels == c) for c in classes])
  tvs = []
  for p in parts:
    y = labels[p]
    site = np.array([np.mean(y == c) for c in classes])
    tvs.append(0.5 * np.abs(site - glob).sum())
  return float(np.mean(tvs))


PARTITIONERS = {
    "iid": lambda y, k, s: P.iid(len(y), k, s),
    "dirichlet": lambda y, k, s: P.dirichlet_label_skew(y, k, 0.3, s, min_size=5),
    "dirichlet_inf": lambda y, k, s: P.dirichlet_label_skew(y, k, float("inf"), s),
    "quantity": lambda y, k, s: P.quantity_skew(len(y), k, s, alpha=0.5, min_size=3),
    "power_law": lambda y, k, s: P.quantity_skew(len(y), k, s, distribution="power_law",
                                                 power=1.2),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_sites", [1, 3, 10])
def test_every_row_in_exactly_one_site(name, num_sites):
  y = _labels(1003)
  parts = PARTITIONERS[name](y, num_sites, 7)
  assert len(parts) == num_sites
  _assert_exact_cover(parts, 1003)
  P.check_partition(parts, 1003)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_deterministic_per_seed(name):
  y = _labels(500)
  a = PARTITIONERS[name](y, 5, 3)
  b = PARTITIONERS[name](y, 5, 3)
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  c = PARTITIONERS[name](y, 5, 4)   # every partitioner shuffles rows: a new seed differs
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
  parts = P.iid(103, 10, 0)
  assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
  assert [len(p) for p in parts] == [11, 11, 11] + [10] * 7   # array_split order


def test_iid_label_proportions_match_sampling_error():
  y = _labels(20000)
  parts = P.iid(len(y), 4, 0)
  props = P.label_proportions(y, parts)
  glob = np.bincount(y) / y.size
  # 5000 rows per site: binomial std <= sqrt(0.25 / 5000) = 0.0071; 5 std.
  assert np.abs(props - glob).max() < 0.035


def test_dirichlet_infinite_alpha_is_stratified_exactly():
  y = _labels(1000)
  parts = P.dirichlet_label_skew(y, 4, float("inf"), 0)
  n_c = np.bincount(y)
  for p in parts:
    counts = np.bincount(y[p], minlength=n_c.size)
    # Cuts floor(n_c * j / K): each site holds floor or ceil of n_c / K.
    assert (np.abs(counts - n_c / 4) < 1).all()


def test_dirichlet_approaches_iid_as_alpha_grows():
  """Quantified: mean TV distance to the global label mix falls with alpha,
  and at alpha = 1e6 every site is within 2 rows per class of n_c / K."""
  y = _labels(4000, num_classes=4, seed=1)
  k = 8
  tv = {a: np.mean([_tv_to_global(y, P.dirichlet_label_skew(y, k, a, s))
                    for s in range(5)])
        for a in (0.05, 0.5, 5.0, 100.0, 1e6)}
  values = [tv[a] for a in sorted(tv)]
  assert all(u > v for u, v in zip(values, values[1:])), tv
  assert tv[0.05] > 0.5          # nearly one class per site
  assert tv[100.0] < 0.05
  assert tv[1e6] < 0.005
  # An IID split of the same rows has sampling error ~ sqrt(C / n_k); alpha = 1e6 beats it.
  tv_iid = np.mean([_tv_to_global(y, P.iid(len(y), k, s)) for s in range(5)])
  assert tv[1e6] < tv_iid
  parts = P.dirichlet_label_skew(y, k, 1e6, 0)
  n_c = np.bincount(y)
  for p in parts:
    assert (np.abs(np.bincount(y[p], minlength=4) - n_c / k) <= 2).all()


def test_dirichlet_small_alpha_concentrates_each_class():
  y = _labels(3000)
  parts = P.dirichlet_label_skew(y, 10, 0.05, 0)
  props = P.label_proportions(y, parts)
  # Each class: the share held by its largest site is far above 1/K = 0.1.
  for c in range(4):
    per_site = np.array([np.sum(y[p] == c) for p in parts]) / np.sum(y == c)
    assert per_site.max() > 0.5
  # Most sites are dominated by one class.
  assert np.mean(props.max(axis=1) > 0.8) >= 0.5


def test_dirichlet_matches_reference_draw():
  """Same rng stream as a reference written from the description."""
  y = _labels(300)
  k, alpha, seed = 4, 0.7, 11
  rng = np.random.default_rng(seed)
  expected = [[] for _ in range(k)]
  for c in np.unique(y):
    rows = rng.permutation(np.flatnonzero(y == c))
    q = rng.dirichlet([alpha] * k)
    bounds = [0] + [int(np.floor(rows.size * s)) for s in np.cumsum(q)[:-1]] + [rows.size]
    for j in range(k):
      expected[j] += rows[bounds[j]:bounds[j + 1]].tolist()
  parts = P.dirichlet_label_skew(y, k, alpha, seed, min_size=0)
  assert [p.tolist() for p in parts] == [sorted(e) for e in expected]


def test_dirichlet_min_size_is_respected_and_impossible_min_size_errors():
  y = _labels(400)
  parts = P.dirichlet_label_skew(y, 10, 0.1, 0, min_size=15)
  assert min(len(p) for p in parts) >= 15
  y2 = np.array([0] * 50 + [1] * 50)
  with pytest.raises(ValueError, match="min_size"):
    P.dirichlet_label_skew(y2, 10, 0.001, 0, min_size=9, max_tries=20)


def test_quantity_skew_sizes():
  parts = P.quantity_skew(1000, 10, 0, alpha=0.2, min_size=7)
  sizes = np.array([len(p) for p in parts])
  assert sizes.sum() == 1000 and sizes.min() >= 7
  assert sizes.max() / sizes.min() > 5                  # skewed
  even = [len(p) for p in P.quantity_skew(1000, 10, 0, alpha=float("inf"))]
  assert even == [100] * 10
  heavy = np.array([len(p) for p in P.quantity_skew(10000, 20, 0, distribution="power_law",
                                                    power=0.8)])
  assert heavy.max() > 3 * np.median(heavy)


def test_quantity_skew_sizes_follow_the_dirichlet_draw():
  n, k, alpha, seed, m = 500, 6, 0.5, 3, 4
  rng = np.random.default_rng(seed)
  p = rng.dirichlet([alpha] * k)
  exact = (n - k * m) * p
  base = np.floor(exact).astype(int)
  extra = np.argsort(-(exact - base), kind="stable")[:(n - k * m) - base.sum()]
  base[extra] += 1
  parts = P.quantity_skew(n, k, seed, alpha=alpha, min_size=m)
  assert [len(q) for q in parts] == (base + m).tolist()


def test_largest_remainder():
  assert P.largest_remainder(10, [1, 1, 1]).tolist() == [4, 3, 3]
  assert P.largest_remainder(7, [0, 2, 5]).tolist() == [0, 2, 5]
  assert P.largest_remainder(5, [0.5, 0.25, 0.25]).tolist() == [3, 1, 1]


def test_by_column_exact():
  values = np.array(["b", "a", "c", "a", "b", "b"])
  parts = P.by_column(values)
  assert [p.tolist() for p in parts] == [[1, 3], [0, 4, 5], [2]]
  parts = P.by_column(values, keys=["c", "b", "a", "z"])
  assert [p.tolist() for p in parts] == [[2], [0, 4, 5], [1, 3], []]
  ints = np.array([3, 1, 3, 2])
  assert [p.tolist() for p in P.by_column(ints)] == [[1], [3], [0, 2]]
  with pytest.raises(ValueError, match="not in keys"):
    P.by_column(values, keys=["a", "b"])
  with pytest.raises(ValueError, match="distinct"):
    P.by_column(values, keys=["a", "a", "b", "c"])


def test_partition_like_mirrors_reference_per_class():
  ref = np.array([0] * 60 + [1] * 40)
  ref_parts = [np.arange(0, 30), np.arange(30, 60), np.arange(60, 100)]  # 0s, 0s, 1s
  new = np.array([0] * 10 + [1] * 7)
  parts = P.partition_like(ref, ref_parts, new, seed=0)
  _assert_exact_cover(parts, 17)
  assert [np.bincount(new[p], minlength=2).tolist() for p in parts] == [[5, 0], [5, 0], [0, 7]]
  # Mixed reference: counts are the largest-remainder shares of each class.
  y = _labels(800)
  train_parts = P.dirichlet_label_skew(y, 5, 0.5, 1)
  test_y = _labels(200, seed=9)
  test_parts = P.partition_like(y, train_parts, test_y, 2)
  _assert_exact_cover(test_parts, 200)
  for c in range(4):
    m = np.array([np.sum(y[p] == c) for p in train_parts])
    got = [int(np.sum(test_y[p] == c)) for p in test_parts]
    assert got == P.largest_remainder(int(np.sum(test_y == c)), m).tolist()


def test_make_partition_dispatch():
  y = _labels(200)
  assert [p.tolist() for p in P.make_partition("iid", 4, 1, labels=y)] == [
      p.tolist() for p in P.iid(200, 4, 1)]
  assert [p.tolist() for p in P.make_partition("dirichlet", 4, 1, labels=y, alpha=0.3)] == [
      p.tolist() for p in P.dirichlet_label_skew(y, 4, 0.3, 1)]
  assert [p.tolist() for p in P.make_partition("quantity", 4, 1, num_rows=200)] == [
      p.tolist() for p in P.quantity_skew(200, 4, 1)]
  assert len(P.make_partition("column", column=y % 3)) == 3
  with pytest.raises(fm.OptionError, match="partition"):
    P.make_partition("random", 4, labels=y)
  with pytest.raises(fm.OptionError, match="num_sites"):
    P.make_partition("column", 5, column=y % 3)


@pytest.mark.parametrize("call, match", [
    (lambda: P.iid(10, 0, 0), "num_sites"),
    (lambda: P.iid(10, 11, 0), "num_sites=11 is more than the 10 rows"),
    (lambda: P.iid(10, 2.5, 0), "num_sites"),
    (lambda: P.iid(10, 2, -1), "seed"),
    (lambda: P.iid(0, 1, 0), "num_rows"),
    (lambda: P.dirichlet_label_skew([0, 1, 1], 2, 0.0, 0), "alpha must be > 0"),
    (lambda: P.dirichlet_label_skew([0, 1, 1], 2, -1.0, 0), "alpha must be > 0"),
    (lambda: P.dirichlet_label_skew([0, 1, 1], 2, float("nan"), 0), "alpha"),
    (lambda: P.dirichlet_label_skew([0, 1, 1], 2, "a", 0), "alpha"),
    (lambda: P.dirichlet_label_skew([0, 1, 1], 4, 1.0, 0), "num_sites"),
    (lambda: P.dirichlet_label_skew(np.zeros((3, 2)), 2, 1.0, 0), "1-D"),
    (lambda: P.dirichlet_label_skew([], 1, 1.0, 0), "empty"),
    (lambda: P.dirichlet_label_skew([0.0, np.nan], 1, 1.0, 0), "NaN"),
    (lambda: P.dirichlet_label_skew([0, 1, 1, 0], 2, 1.0, 0, min_size=3), "min_size"),
    (lambda: P.quantity_skew(10, 2, 0, distribution="zipf"), "distribution"),
    (lambda: P.quantity_skew(10, 2, 0, power=0), "power"),
    (lambda: P.quantity_skew(10, 2, 0, min_size=6), "min_size"),
])
def test_bad_input_raises_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_check_partition_and_to_federated_data():
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  y = (np.arange(10) % 2).astype(np.float32)
  parts = [np.array([0, 3, 4]), np.array([1, 2, 5, 6, 7, 8, 9])]
  data = P.to_federated_data(x, y, parts, ["a", "b"], label_type="binary")
  assert isinstance(data, fm.FederatedData)
  assert data.num_examples.tolist() == [3, 7] and data.names == ("a", "b")
  np.testing.assert_array_equal(data.site(0)[0], x[[0, 3, 4]])
  np.testing.assert_array_equal(data.site(1)[1], y[[1, 2, 5, 6, 7, 8, 9]])
  with pytest.raises(ValueError, match="row 3 is assigned 2 times"):
    P.to_federated_data(x, y, [np.array([0, 3]), np.array([3, 1, 2, 4, 5, 6, 7, 8, 9])])
  with pytest.raises(ValueError, match="in no site"):
    P.to_federated_data(x, y, [np.array([0, 1])])
  sub = P.to_federated_data(x, y, [np.array([0, 1])], complete=False)
  assert sub.num_examples.tolist() == [2]
  with pytest.raises(ValueError, match="out of range"):
    P.check_partition([np.array([10])], 10)
  with pytest.raises(ValueError, match="integer index"):
    P.check_partition([np.array([0.5])], 10)
