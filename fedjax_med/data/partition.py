"""Partitioners: turn one centralised dataset into K simulated hospitals.

Every partitioner is a pure NumPy function of its inputs and an integer
seed (`numpy.random.default_rng(seed)`), so the same call gives the same
split on every machine. Each returns `parts`, a list of K int64 index arrays
into the N rows of the dataset, every array sorted ascending; unless a
partitioner says otherwise every row is in exactly one site (sizes sum to N,
no row lost or duplicated: `check_partition`).

    parts = iid(num_rows, num_sites, seed)                  # equal sizes, random rows
    parts = dirichlet_label_skew(labels, num_sites, alpha, seed, min_size=10)
    parts = quantity_skew(num_rows, num_sites, seed, alpha=0.5)  # or distribution="power_law"
    parts = by_column(hospital_id)                          # natural split, one site per value
    test_parts = partition_like(train_labels, parts, test_labels, seed)
    data = to_federated_data(x, y, parts, label_type="binary")

Methods and sources:

* IID (McMahan et al., AISTATS 2017, "IID" setting): a uniform random
  permutation of the rows cut into K near-equal blocks (sizes differ by at
  most one).
* Dirichlet label skew (Hsu, Qi & Brown 2019, arXiv:1909.06335; the
  "distribution-based label imbalance" of Li, Diao, Chen & He, NIID-Bench,
  ICDE 2022): for every class c draw q_c ~ Dir(alpha 1_K) and give site k
  the share q_c[k] of class c's rows (block cuts floor(n_c cumsum(q_c))).
  Small alpha concentrates each class on few sites; alpha -> inf gives every
  site the global label proportions (alpha = inf is accepted and means
  q_c = 1/K exactly). Draws are repeated until every site holds at least
  `min_size` rows, as in NIID-Bench (which uses min_size = 10), without its
  re-balancing step, so q_c stays Dirichlet.
* Quantity skew (NIID-Bench's "quantity skew"): site sizes n_k = min_size +
  the largest-remainder rounding of (N - K min_size) p_k with p ~ Dir(alpha 1_K)
  ("dirichlet") or p_k proportional to w_k drawn i.i.d. from a Pareto law with
  tail index `power` and scale 1, P(w > t) = t^-power for t >= 1
  ("power_law", the power-law client sizes of LEAF/FedProx's synthetic data);
  the rows themselves are assigned uniformly at random.
* By column: the natural split, one site per distinct value (e.g. a
  hospital id), exact and deterministic.
* `partition_like`: split a second set of rows (e.g. the official test set)
  so that every site gets, class by class, the same share it has of the
  reference (training) rows: site k's test label mix mirrors its train mix.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice

METHODS = ("iid", "dirichlet", "quantity", "column")
QUANTITY_DISTRIBUTIONS = ("dirichlet", "power_law")


# -- argument checks --------------------------------------------------------


def _check_int(name: str, field: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise OptionError(f"{name}: {field} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_seed(name: str, seed: Any) -> int:
  return _check_int(name, "seed", seed, 0)


def _check_sites(name: str, num_sites: Any, num_rows: int) -> int:
  num_sites = _check_int(name, "num_sites", num_sites, 1)
  if num_sites > num_rows:
    raise OptionError(
        f"{name}: num_sites={num_sites} is more than the {num_rows} rows to split;"
        " every site needs at least one row")
  return num_sites


def _check_alpha(name: str, field: str, alpha: Any) -> float:
  try:
    a = float(alpha)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: {field} must be a number > 0, got {alpha!r}") from None
  if not a > 0.0:   # also rejects NaN
    raise OptionError(f"{name}: {field} must be > 0 (a Dirichlet concentration), got {alpha!r}")
  return a


def _check_min_size(name: str, min_size: Any, num_rows: int, num_sites: int) -> int:
  min_size = _check_int(name, "min_size", min_size, 0)
  if min_size * num_sites > num_rows:
    raise OptionError(
        f"{name}: min_size={min_size} x num_sites={num_sites} = {min_size * num_sites}"
        f" rows needed, but there are only {num_rows}")
  return min_size


def _check_num_rows(name: str, num_rows: Any) -> int:
  return _check_int(name, "num_rows", num_rows, 1)


def _labels_1d(name: str, labels: Any, field: str = "labels") -> np.ndarray:
  values = np.asarray(labels)
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if values.ndim != 1:
    raise ValueError(
        f"{name}: {field} must be a 1-D array [N] (or [N, 1]), got shape {values.shape}")
  if values.size == 0:
    raise ValueError(f"{name}: {field} is empty")
  if values.dtype.kind == "f" and not np.isfinite(values).all():
    raise ValueError(f"{name}: {field} contains NaN or inf")
  if values.dtype.kind not in "biufUSO":
    raise ValueError(f"{name}: {field} has dtype {values.dtype}; expected ints or strings")
  return values


def _finish(parts: Sequence[Any]) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, dtype=np.int64).reshape(-1)) for p in parts]


def largest_remainder(total: int, weights: Any) -> np.ndarray:
  """Integer counts summing to `total`, proportional to `weights` (Hamilton's method).

  counts_k = floor(total w_k / sum w) plus one for the rows with the largest
  remainders (ties to the lower index). int64 `[K]`.
  """
  w = np.asarray(weights, dtype=np.float64)
  if w.ndim != 1 or w.size == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"largest_remainder: weights must be finite, >= 0, not all 0; got {w}")
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(np.int64)
  short = int(total - counts.sum())
  if short > 0:
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
  return counts


# -- partitioners -----------------------------------------------------------


def iid(num_rows: int, num_sites: int, seed: int = 0) -> list[np.ndarray]:
  """IID split: a random permutation of range(N) cut into K near-equal blocks.

  Site sizes are ceil(N/K) for the first N mod K sites and floor(N/K) for
  the rest (`numpy.array_split`).

  Args:
    num_rows: N >= 1.
    num_sites: K, 1 <= K <= N.
    seed: non-negative integer.

  Returns:
    K sorted int64 index arrays, together a permutation of range(N).
  """
  num_rows = _check_num_rows("iid", num_rows)
  num_sites = _check_sites("iid", num_sites, num_rows)
  rng = np.random.default_rng(_check_seed("iid", seed))
  return _finish(np.array_split(rng.permutation(num_rows), num_sites))


def dirichlet_label_skew(labels: Any, num_sites: int, alpha: float, seed: int = 0, *,
                         min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
  """Label skew: class c's rows go to the sites in proportions q_c ~ Dir(alpha 1_K).

  For each class c (in sorted order): shuffle its n_c rows, draw
  q_c ~ Dirichlet(alpha, ..., alpha) over the K sites, and give site k the
  block between floor(n_c Q_{k-1}) and floor(n_c Q_k), Q = cumsum(q_c)
  (Hsu et al. 2019; NIID-Bench's implementation). The whole draw repeats,
  continuing the same random stream, until every site has >= `min_size`
  rows. E[q_c[k]] = 1/K and Var q_c[k] = (K - 1) / (K^2 (K alpha + 1)), so as
  alpha -> inf every site's label proportions tend to the global ones;
  `alpha=float("inf")` uses q_c = 1/K exactly.

  Args:
    labels: `[N]` (or `[N, 1]`) class labels (ints or strings).
    num_sites: K, 1 <= K <= N.
    alpha: concentration > 0 (e.g. 0.1 strongly skewed, 100 nearly IID).
    seed: non-negative integer.
    min_size: every site needs at least this many rows (default 1).
    max_tries: draws attempted before giving up.

  Returns:
    K sorted int64 index arrays, together a permutation of range(N).

  Raises:
    OptionError (a ValueError) for bad options; ValueError when no draw in
    `max_tries` gives every site `min_size` rows (with the numbers).
  """
  name = "dirichlet_label_skew"
  labels = _labels_1d(name, labels)
  n = labels.size
  num_sites = _check_sites(name, num_sites, n)
  alpha = _check_alpha(name, "alpha", alpha)
  min_size = _check_min_size(name, min_size, n, num_sites)
  max_tries = _check_int(name, "max_tries", max_tries, 1)
  rng = np.random.default_rng(_check_seed(name, seed))
  classes = np.unique(labels)
  class_rows = [np.flatnonzero(labels == c) for c in classes]
  smallest = 0
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for rows in class_rows:
      rows = rng.permutation(rows)
      if np.isinf(alpha):
        q = np.full(num_sites, 1.0 / num_sites)
      else:
        q = rng.dirichlet(np.full(num_sites, alpha))
      if not np.isfinite(q).all():   # never cut with NaN proportions: redraw
        parts = None
        break
      cuts = np.floor(np.cumsum(q) * rows.size).astype(np.int64)[:-1]
      cuts = np.clip(cuts, 0, rows.size)
      for k, block in enumerate(np.split(rows, cuts)):
        parts[k].append(block)
    if parts is None:
      continue
    sizes = [sum(b.size for b in p) for p in parts]
    smallest = min(sizes)
    if smallest >= min_size:
      return _finish([np.concatenate(p) for p in parts])
  raise ValueError(
      f"{name}: no draw in {max_tries} tries gave every one of the {num_sites} sites"
      f" min_size={min_size} rows (N={n}, {classes.size} classes, alpha={alpha}; last"
      f" draw's smallest site had {smallest}). Lower min_size or num_sites, or raise"
      " alpha: with few classes and a small alpha each class lands on few sites")


def quantity_skew(num_rows: int, num_sites: int, seed: int = 0, *,
                  distribution: str = "dirichlet", alpha: float = 0.5, power: float = 1.5,
                  min_size: int = 1) -> list[np.ndarray]:
  """Quantity skew: unequal site sizes, rows assigned uniformly at random.

  Sizes n_k = min_size + r_k with r = largest_remainder(N - K min_size, p) and

    distribution="dirichlet":  p ~ Dir(alpha 1_K)    (NIID-Bench quantity skew)
    distribution="power_law":  p_k = w_k / sum_j w_j, w_k ~ Pareto(power), i.e.
                               P(w_k > t) = t^-power for t >= 1 (numpy's
                               `pareto(power) + 1`), heavier-tailed for smaller power.

  Then a random permutation of range(N) is cut into blocks of those sizes.
  Label proportions are IID in expectation; only the sizes are skewed.

  Args:
    num_rows: N >= 1.
    num_sites: K, 1 <= K <= N.
    seed: non-negative integer.
    distribution: "dirichlet" or "power_law".
    alpha: Dirichlet concentration > 0 (used by "dirichlet").
    power: Pareto tail index > 0 (used by "power_law").
    min_size: rows every site gets before the skewed share (default 1).

  Returns:
    K sorted int64 index arrays, together a permutation of range(N).
  """
  name = "quantity_skew"
  num_rows = _check_num_rows(name, num_rows)
  num_sites = _check_sites(name, num_sites, num_rows)
  check_choice(name, "distribution", distribution, QUANTITY_DISTRIBUTIONS)
  alpha = _check_alpha(name, "alpha", alpha)
  power = _check_alpha(name, "power", power)
  min_size = _check_min_size(name, min_size, num_rows, num_sites)
  rng = np.random.default_rng(_check_seed(name, seed))
  if distribution == "dirichlet":
    p = (np.full(num_sites, 1.0 / num_sites) if np.isinf(alpha)
         else rng.dirichlet(np.full(num_sites, alpha)))
  else:
    p = rng.pareto(power, size=num_sites) + 1.0
  if not np.isfinite(p).all() or p.sum() <= 0:
    p = np.full(num_sites, 1.0 / num_sites)   # degenerate draw: equal shares
  sizes = min_size + largest_remainder(num_rows - min_size * num_sites, p)
  cuts = np.cumsum(sizes)[:-1]
  return _finish(np.split(rng.permutation(num_rows), cuts))


def by_column(values: Any, keys: Sequence[Any] | None = None) -> list[np.ndarray]:
  """Natural split: one site per distinct value of a column (e.g. hospital id).

  Args:
    values: `[N]` column (ints or strings).
    keys: optional site order: site k holds the rows with values == keys[k].
      Default: the sorted distinct values (`numpy.unique(values)`). A key
      absent from `values` gives an empty site; a value absent from `keys`
      is an error (rows are never dropped silently).

  Returns:
    len(keys) sorted int64 index arrays (row order kept within each site).
  """
  name = "by_column"
  values = _labels_1d(name, values, "values")
  if keys is None:
    keys = np.unique(values)
  keys = np.asarray(keys)
  if keys.ndim != 1 or keys.size == 0:
    raise ValueError(f"{name}: keys must be a non-empty 1-D sequence, got shape {keys.shape}")
  if np.unique(keys).size != keys.size:
    raise ValueError(f"{name}: keys must be distinct, got {keys.tolist()}")
  unknown = ~np.isin(values, keys)
  if unknown.any():
    missing = np.unique(values[unknown])
    raise ValueError(
        f"{name}: {int(unknown.sum())} rows have values not in keys, e.g."
        f" {missing[:5].tolist()}; add them to keys (rows are never dropped)")
  return _finish([np.flatnonzero(values == key) for key in keys])


def partition_like(reference_labels: Any, reference_parts: Sequence[Any], labels: Any,
                   seed: int = 0) -> list[np.ndarray]:
  """Splits new rows so each site mirrors its share of the reference rows, class by class.

  For every class c of `labels`, with m_kc the reference rows of class c at
  site k, site k gets t_kc = largest_remainder(n_c, m_kc) of the n_c new
  rows of class c (chosen at random). So site k's new label mix follows
  its reference mix and its size follows its reference size: the natural
  way to give each simulated hospital a test set from its own distribution.
  A class absent from the reference is spread in proportion to the sites'
  reference sizes.

  Args:
    reference_labels: `[N_ref]` labels the reference partition was made on.
    reference_parts: K index arrays into the reference rows (a partition).
    labels: `[N]` labels of the rows to split (e.g. the official test set).
    seed: non-negative integer.

  Returns:
    K sorted int64 index arrays into range(N), together a permutation of it.
  """
  name = "partition_like"
  ref = _labels_1d(name, reference_labels, "reference_labels")
  labels = _labels_1d(name, labels)
  check_partition(reference_parts, ref.size, complete=False, name=name)
  rng = np.random.default_rng(_check_seed(name, seed))
  sizes = np.array([np.asarray(p).size for p in reference_parts], np.float64)
  parts: list[list[np.ndarray]] = [[] for _ in reference_parts]
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    counts = np.array([np.sum(ref[np.asarray(p, np.int64)] == c) for p in reference_parts],
                      np.float64)
    weights = counts if counts.sum() > 0 else sizes
    targets = largest_remainder(rows.size, weights)
    for k, block in enumerate(np.split(rows, np.cumsum(targets)[:-1])):
      parts[k].append(block)
  return _finish([np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts])


def make_partition(method: str, num_sites: int | None = None, seed: int = 0, *,
                   labels: Any = None, num_rows: int | None = None, alpha: float = 0.5,
                   min_size: int = 1, column: Any = None, distribution: str = "dirichlet",
                   power: float = 1.5) -> list[np.ndarray]:
  """One entry point for the loaders: `method` in ("iid", "dirichlet", "quantity", "column").

  "iid" and "quantity" need num_rows (or labels, for their length);
  "dirichlet" needs labels; "column" needs `column` (num_sites, if given,
  must equal its number of distinct values).
  """
  name = "make_partition"
  check_choice(name, "partition", method, METHODS)
  if labels is not None and num_rows is None:
    num_rows = np.asarray(labels).shape[0]
  if method == "column":
    if column is None:
      raise OptionError(f"{name}: partition='column' needs the column values")
    parts = by_column(column)
    if num_sites is not None and num_sites != len(parts):
      raise OptionError(
          f"{name}: partition='column' gives {len(parts)} sites (one per distinct value),"
          f" but num_sites={num_sites}")
    return parts
  if num_sites is None:
    raise OptionError(f"{name}: partition={method!r} needs num_sites")
  if method == "dirichlet":
    if labels is None:
      raise OptionError(f"{name}: partition='dirichlet' needs labels")
    return dirichlet_label_skew(labels, num_sites, alpha, seed, min_size=min_size)
  if num_rows is None:
    raise OptionError(f"{name}: partition={method!r} needs num_rows or labels")
  if method == "iid":
    return iid(num_rows, num_sites, seed)
  return quantity_skew(num_rows, num_sites, seed, distribution=distribution, alpha=alpha,
                       power=power, min_size=min_size)


# -- checks and conversion --------------------------------------------------


def check_partition(parts: Sequence[Any], num_rows: int, *, complete: bool = True,
                    name: str = "check_partition") -> None:
  """Raises ValueError unless `parts` are index arrays into range(num_rows)
  with no row in two sites (or twice in one) and, if `complete`, every row
  in some site."""
  if len(parts) == 0:
    raise ValueError(f"{name}: got no sites")
  seen = np.zeros(num_rows, np.int64)
  for k, p in enumerate(parts):
    idx = np.asarray(p)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
      raise ValueError(f"{name}: site {k}: expected a 1-D integer index array, got"
                       f" {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_rows):
      raise ValueError(f"{name}: site {k}: index out of range for {num_rows} rows")
    np.add.at(seen, idx, 1)
  if (seen > 1).any():
    row = int(np.flatnonzero(seen > 1)[0])
    raise ValueError(f"{name}: row {row} is assigned {int(seen[row])} times")
  if complete and (seen == 0).any():
    raise ValueError(f"{name}: {int((seen == 0).sum())} of {num_rows} rows are in no site"
                     f" (first: {int(np.flatnonzero(seen == 0)[0])})")


def label_proportions(labels: Any, parts: Sequence[Any], classes: Any = None) -> np.ndarray:
  """`[K, C]` share of each class among each site's rows (rows of an empty site are 0)."""
  labels = _labels_1d("label_proportions", labels)
  classes = np.unique(labels) if classes is None else np.asarray(classes)
  out = np.zeros((len(parts), classes.size))
  for k, p in enumerate(parts):
    y = labels[np.asarray(p, np.int64)]
    if y.size:
      out[k] = [(y == c).mean() for c in classes]
  return out


def to_federated_data(x: Any, y: Any, parts: Sequence[Any],
                      site_names: Sequence[str] | None = None, *,
                      label_type: str | None = None, pad_to: int | None = None,
                      complete: bool = True) -> FederatedData:
  """FederatedData whose site k holds rows `parts[k]` of `(x [N, ...], y [N, ...])`.

  Checks the partition first (`check_partition`; with complete=False rows
  may be left out), then `FederatedData.from_sites([(x[p_k], y[p_k]), ...])`.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"to_federated_data: x has shape {x.shape} and y {y.shape}; they need"
                     " the same number of rows")
  check_partition(parts, x.shape[0], complete=complete, name="to_federated_data")
  sites = [(x[np.asarray(p, np.int64)], y[np.asarray(p, np.int64)]) for p in parts]
  return FederatedData.from_sites(sites, site_names, label_type=label_type, pad_to=pad_to)


__all__ = ["iid", "dirichlet_label_skew", "quantity_skew", "by_column", "partition_like",
           "make_partition", "check_partition", "label_proportions", "to_federated_data",
           "largest_remainder", "METHODS", "QUANTITY_DISTRIBUTIONS"]
