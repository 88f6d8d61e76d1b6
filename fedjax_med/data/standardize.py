"""Federated standardisation: global feature mean and std from per-site sums.

Pooled training standardises with the statistics of all train rows pooled;
per-site standardisation (FLamby's protocol for federated and local runs)
gives every site its own. To compare federated and pooled training on the
same inputs, the federation needs the *pooled* statistics without pooling
the rows. They are functions of per-site sufficient statistics,

    n_k = #real rows of site k,   S1_k = sum_i x_ki,   S2_k = sum_i x_ki^2,

summed over sites: mean = sum_k S1_k / n, var = (sum_k S2_k - n mean^2) / (n - ddof),
n = sum_k n_k (Chan, Golub & LeVeque, "Algorithms for computing the sample
variance", Am. Stat. 1983, eq. 1.5). Padded rows never count.

Numerics. The one-pass form S2 - n mean^2 cancels catastrophically when
|mean| >> std (x = 1e8 + N(0, 1) loses every digit in float64). So the
statistics are gathered in two aggregation rounds: round 1 sums (n_k, S1_k)
and the server broadcasts the global mean m; round 2 sums the shifted second
moment M2_k = sum_i (x_ki - m)^2 (the two-pass algorithm, Chan et al.
eq. 1.1), var = sum_k M2_k / (n - ddof). Shifting by a public value reveals
nothing the first form does not (M2_k = S2_k - 2 m S1_k + n_k m^2). Every
per-site sum is computed on the host in float64.

What it reveals. Standardisation is data-dependent preprocessing and lies
outside any DP epsilon reported by `fedjax_med.privacy` (no noise is added).
* Plain sums (`secure=None`): the server receives every site's n_k, S1_k and
  M2_k, i.e. each site's own mean and variance of every feature; it publishes
  the global n, mean and std to the sites.
* Secure aggregation (`secure=SecureSumOptions(...)`, Bonawitz et al. 2017
  through `fedjax_med.aggregators.secure.secure_sum`): three secure
  sums (counts, first moment, second moment); the server learns only the
  global n, mean and variance, never a site's n_k or sums (up to collusion
  with t or more sites). The sites learn the global n, mean and std. Payloads
  are fixed point in Z_{2^32}: a stated error bound is returned
  (`mean_error_bound`, `var_error_bound`), and a payload outside
  [-clip_range, clip_range] is an error (never silently clipped).

    stats, train_z, test_z = federated_standardize(train, test)       # FederatedData
    stats = global_statistics(train, secure=SecureSumOptions(key, threshold=3))
    test_z = stats.apply(test)        # train-only statistics, x' = (x - mean) / std
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.federated_data import FederatedData

_EPS = np.finfo(np.float64).eps


@dataclasses.dataclass(frozen=True)
class SecureSumOptions:
  """Secure aggregation of the statistics (`secure_aggregation.secure_sum`).

  key: the protocol's PRNG key (round r uses `fold_in(key, r)`).
  threshold: Shamir threshold t (default floor(K / 2) + 1).
  shift, unit: public per-feature reference c and scale u (scalars or
    `[*feature_shape]`, fixed before seeing the data, e.g. plausible clinical
    ranges). Sites encode (x - c) / u; a unit near the std makes the payloads
    O(1) and the fixed-point error small.
  clip_range: R; every payload must lie in [-R, R]. The fixed-point scale is
    the largest power of two s with K (R s + 1/2) < 2^31.
  """
  key: Any
  threshold: int | None = None
  shift: Any = 0.0
  unit: Any = 1.0
  clip_range: float = 2.0**16


@dataclasses.dataclass(frozen=True)
class GlobalStatistics:
  """Global standardisation statistics of the train rows of all sites.

  mean, std: `[*feature_shape]` float64; std uses `ddof`
    (std^2 = sum_k sum_i (x_ki - mean)^2 / (n - ddof)).
  num_examples: n = sum_k n_k (real rows only).
  secure: whether the sums went through secure aggregation.
  mean_error_bound, var_error_bound: `[*feature_shape]` worst-case
    |mean - exact|, |std^2 - exact| of the fixed-point protocol (None for plain
    float64 sums).
  server_views: the `ServerView` of each secure sum (counts, first and second
    moment); empty for plain sums.
  """
  mean: np.ndarray
  std: np.ndarray
  num_examples: int
  ddof: int
  secure: bool = False
  mean_error_bound: np.ndarray | None = None
  var_error_bound: np.ndarray | None = None
  server_views: tuple = ()

  def apply(self, data):
    """x' = (x - mean) / std on real rows (train-only statistics, no leakage).

    Args:
      data: FederatedData (`x [K, N_max, *F]`; padded rows stay zero) or K
        arrays `[n_k, *F]`.

    Returns:
      The same kind: FederatedData (float32 x, same y, mask, names, ids) or a
      list of float64 arrays.
    """
    sites = _site_arrays(data, "standardize.apply")
    shape = tuple(np.shape(self.mean))
    for k, x in enumerate(sites):
      if x.shape[1:] != shape:
        raise ValueError(f"standardize.apply: site {k} has feature shape {x.shape[1:]}, the"
                         f" statistics have feature shape {shape}")
    out = [(x - self.mean) / self.std for x in sites]
    if not isinstance(data, FederatedData):
      return out
    mask = np.asarray(data.mask)
    x = np.zeros(np.shape(data.x), np.float64)
    for k, z in enumerate(out):
      x[k][mask[k]] = z
    return data.replace(x=jnp.asarray(x.astype(np.float32)))


# ----------------------------------------------------------------------------- input

def _feature_label(index, shape, feature_names) -> str:
  if not shape:
    return "the value"
  idx = np.unravel_index(int(index), shape)
  label = f"feature {idx[0]}" if len(idx) == 1 else f"feature {tuple(int(i) for i in idx)}"
  if feature_names is not None:
    label += f" ({feature_names[int(index)]!r})"
  return label


def _site_arrays(data, where: str) -> list[np.ndarray]:
  """Real rows of every site as float64 `[n_k, *F]`, checked (shape, finite)."""
  if isinstance(data, FederatedData):
    x, mask = np.asarray(data.x, np.float64), np.asarray(data.mask)
    sites = [x[k][mask[k]] for k in range(x.shape[0])]
  else:
    try:
      sites = [np.asarray(x, np.float64) for x in data]
    except (TypeError, ValueError) as err:
      raise ValueError(f"{where}: expected FederatedData or K arrays [n_k, *feature_shape]"
                       f" ({err})") from err
  if not sites:
    raise ValueError(f"{where}: empty federation: got no sites")
  for k, x in enumerate(sites):
    if x.ndim < 2:
      raise ValueError(f"{where}: site {k} has shape {x.shape}; expected [n_k, *feature_shape]"
                       " (rank >= 2)")
    if x.shape[1:] != sites[0].shape[1:]:
      raise ValueError(f"{where}: site {k} has feature shape {x.shape[1:]}, site 0 has"
                       f" {sites[0].shape[1:]}")
    bad = ~np.isfinite(x)
    if bad.any():
      row, *feature = np.argwhere(bad)[0]
      kind = "NaN" if np.isnan(x[tuple([row] + feature)]) else "inf"
      flat = np.ravel_multi_index(feature, x.shape[1:]) if feature else 0
      raise ValueError(f"{where}: site {k} row {row} holds {kind} in"
                       f" {_feature_label(flat, x.shape[1:], None)}; impute or drop it first")
  return sites


def site_statistics(data, shift: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-site sufficient statistics, float64 on the host, real rows only.

  Args:
    data: FederatedData (`x [K, N_max, *F]`, mask) or K arrays `[n_k, *F]`.
    shift: optional public reference c (scalar or `[*F]`), default 0.

  Returns:
    n `[K]` int64, S1 `[K, *F]` = sum_i (x_ki - c), S2 `[K, *F]` = sum_i (x_ki - c)^2.
  """
  sites = _site_arrays(data, "site_statistics")
  c = 0.0 if shift is None else np.asarray(shift, np.float64)
  n = np.array([len(x) for x in sites], np.int64)
  s1 = np.stack([(x - c).sum(axis=0) for x in sites])
  s2 = np.stack([((x - c)**2).sum(axis=0) for x in sites])
  return n, s1, s2


# ----------------------------------------------------------------------------- secure sums

def _fixed_point_scale(num_sites: int, clip_range: float) -> float:
  """Largest power of two s with K (R s + 1/2) < 2^31."""
  s = 2.0**np.floor(np.log2((2.0**31 / num_sites - 0.5) / clip_range))
  while num_sites * (clip_range * s + 0.5) >= 2.0**31:
    s /= 2.0
  return float(s)


def _secure_round(payloads: np.ndarray, options: SecureSumOptions, scale: float,
                  clip_range: float, round_index: int, what: str, shape, feature_names):
  """One secure sum of `[K, *F]` float64 payloads -> (sum, error bound, server view).

  The payloads are rounded to float32 on the sites (error 2^-24 |p_k|), encoded
  as round(p_k s) (s a power of two: error 1 / (2 s)), summed exactly in
  Z_{2^32}, decoded to float32 (error 2^-24 |sum|).
  """
  # Imported here: plain sums do not need the secure-aggregation module.
  from fedjax_med.aggregators import secure as sa

  k = payloads.shape[0]
  over = np.abs(payloads) > clip_range
  if over.any():
    site, *feature = np.argwhere(over)[0]
    flat = np.ravel_multi_index(feature, shape) if feature else 0
    raise ValueError(
        f"federated standardisation (secure): site {site}'s {what} for"
        f" {_feature_label(flat, shape, feature_names)} is {payloads[tuple([site] + feature)]:.4g},"
        f" outside [-clip_range, clip_range] = [-{clip_range:g}, {clip_range:g}]; pass a public"
        f" `shift`/`unit` closer to the data's location/scale or a larger clip_range")
  threshold = k // 2 + 1 if options.threshold is None else options.threshold
  q = payloads.astype(np.float32)
  result = sa.secure_sum(q, jax.random.fold_in(options.key, round_index), threshold=threshold,
                         scale=scale, clip_range=clip_range)
  if result.clipped:  # unreachable after the check above; never silently wrong
    raise ValueError(f"federated standardisation (secure): {result.clipped} entries clipped")
  total = np.asarray(result.total, np.float64)
  pre = k / (2.0 * scale) + 2.0**-24 * np.abs(payloads).sum(axis=0)
  bound = pre * (1 + 2.0**-23) + 2.0**-23 * np.abs(total)
  return total, bound, result.server_view


# ----------------------------------------------------------------------------- statistics

def global_statistics(train, *, ddof: int = 1, secure: SecureSumOptions | None = None,
                      feature_names: Sequence[str] | None = None) -> GlobalStatistics:
  """Global mean and std of all sites' train rows, from per-site sums only.

  Round 1: sum_k (n_k, S1_k) -> n, mean. Round 2: sum_k M2_k with
  M2_k = sum_i (x_ki - mean)^2 -> var = sum_k M2_k / (n - ddof). With
  `secure`, each sum is a secure sum (module docstring) of the normalised
  payloads n_k, S1_k' / n and M2_k' / n, where ' means of (x - c) / u.

  Args:
    train: FederatedData `x [K, N_max, *F]` (real rows by mask) or K arrays
      `[n_k, *F]` of raw (unstandardised) train features.
    ddof: delta degrees of freedom (default 1, the unbiased variance, as
      FLamby's pooled standardisation).
    secure: None for plain float64 sums, or `SecureSumOptions`.
    feature_names: optional names used in error messages.

  Returns:
    GlobalStatistics (mean, std `[*F]` float64, n, bounds for `secure`).

  Raises:
    ValueError: empty federation (no sites or no real rows), n <= ddof, NaN
      or inf (naming site, row and feature), a zero-variance feature (naming
      it), mismatched feature shapes, a secure payload outside clip_range.
  """
  sites = _site_arrays(train, "global_statistics")
  shape = sites[0].shape[1:]
  if feature_names is not None and len(feature_names) != int(np.prod(shape)):
    raise ValueError(f"global_statistics: {len(feature_names)} feature_names for"
                     f" {int(np.prod(shape))} features")
  if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
    raise ValueError(f"global_statistics: ddof must be an integer >= 0, got {ddof!r}")
  counts = np.array([len(x) for x in sites], np.int64)
  n = int(counts.sum())
  if n == 0:
    raise ValueError(f"global_statistics: empty federation: the {len(sites)} sites hold no"
                     " real rows")
  if n <= ddof:
    raise ValueError(f"global_statistics: n = {n} real rows <= ddof = {ddof}; the variance is"
                     " undefined")
  views = []
  if secure is None:
    _, s1, _ = site_statistics(sites)
    mean = s1.sum(axis=0) / n
    _, _, m2 = site_statistics(sites, shift=mean)
    var = m2.sum(axis=0) / (n - ddof)
    mean_bound = var_bound = None
    # A constant feature: only float64 rounding of the mean (<= n eps |mean|) is left.
    zero = np.sqrt(var) <= n * _EPS * np.abs(mean)
    zero_reason = ""
  else:
    k = len(sites)
    c = np.broadcast_to(np.asarray(secure.shift, np.float64), shape)
    u = np.broadcast_to(np.asarray(secure.unit, np.float64), shape)
    if not (np.isfinite(c).all() and np.isfinite(u).all() and (u > 0).all()):
      raise ValueError("global_statistics: secure shift must be finite and unit finite > 0")
    r = float(secure.clip_range)
    count_range = float(min(2.0**24 - 1, np.floor((2.0**31 - 1) / k - 1)))
    total, _, view = _secure_round(counts.astype(np.float64), secure, 1.0, count_range, 0,
                                   "row count", (), None)
    views.append(view)
    if int(round(float(total))) != n:  # exact integers below 2^24
      raise ValueError(f"global_statistics: secure count {total} != {n}")
    scale = _fixed_point_scale(k, r)
    p1 = np.stack([((x - c) / u).sum(axis=0) / n for x in sites])
    sum1, bound1, view = _secure_round(p1, secure, scale, r, 1, "first moment", shape,
                                       feature_names)
    views.append(view)
    mean = c + u * sum1
    mean_bound = u * bound1 + 4 * _EPS * np.abs(mean)
    p2 = np.stack([(((x - mean) / u)**2).sum(axis=0) / n for x in sites])
    sum2, bound2, view = _secure_round(p2, secure, scale, r, 2, "second moment", shape,
                                       feature_names)
    views.append(view)
    # sum_k p2_k = (var_b + (mean - exact mean)^2) / u^2, var_b = M2 / n.
    factor = n / (n - ddof)
    var = np.maximum(u**2 * sum2 * factor, 0.0)
    var_bound = u**2 * factor * (bound2 + bound1**2) + 4 * _EPS * var
    zero = var <= var_bound
    zero_reason = " (indistinguishable from 0 at the fixed-point precision)"
  if zero.any():
    flat = int(np.flatnonzero(np.ravel(zero))[0])
    names = ", ".join(_feature_label(i, shape, feature_names)
                      for i in np.flatnonzero(np.ravel(zero)))
    raise ValueError(
        f"global_statistics: zero variance{zero_reason} in {names}: the feature is constant"
        f" over all {n} train rows, so it cannot be standardised; drop it first"
        f" (first: {_feature_label(flat, shape, feature_names)})")
  return GlobalStatistics(mean=np.asarray(mean, np.float64), std=np.sqrt(var),
                          num_examples=n, ddof=int(ddof), secure=secure is not None,
                          mean_error_bound=mean_bound, var_error_bound=var_bound,
                          server_views=tuple(views))


def federated_standardize(train, *others, ddof: int = 1, secure: SecureSumOptions | None = None,
                          feature_names: Sequence[str] | None = None):
  """Standardises train and other splits with the train rows' global statistics.

  x' = (x - mean) / std, mean and std from `global_statistics(train)` (train
  rows only: the test sets never enter the statistics).

  Args:
    train: FederatedData or K arrays `[n_k, *F]`, raw features.
    *others: more splits (e.g. test), same kind and feature shape.
    ddof, secure, feature_names: as `global_statistics`.

  Returns:
    (stats, train', *others'), each split of the kind it came in.
  """
  stats = global_statistics(train, ddof=ddof, secure=secure, feature_names=feature_names)
  return (stats, stats.apply(train)) + tuple(stats.apply(o) for o in others)


__all__ = ["SecureSumOptions", "GlobalStatistics", "site_statistics", "global_statistics",
           "federated_standardize"]
