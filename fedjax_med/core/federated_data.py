"""`FederatedData`: K sites stacked on a leading axis, padded, with a row mask.

Every site k holds n_k examples. To run all sites under one `jax.vmap`, the
sites are stacked on a leading axis K and padded to a common length N_max:

    x     [K, N_max, *feature_shape]   padded rows are zeros
    y     [K, N_max, *label_shape]     padded rows are zeros
    mask  [K, N_max] bool              True on real rows; n_k = mask[k].sum()
    site_ids [K] int32                 each site's identity (default 0..K-1)

A site's randomness derives from its id, not its position:
`client_key = fold_in(round_key, site_ids[k])`. So taking a cohort, permuting
the sites or inserting an empty site (`subset`) leaves every site's key, and
hence its local training, unchanged.

Padding is exact everywhere in fedjax_med: a padded row never enters a loss,
a gradient, a statistic or a metric. Validation happens once, here, on
concrete host arrays, so a round never re-checks its data.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LABEL_TYPES = ("binary", "multiclass", "real")


def _name(site_names, k):
  if site_names is None:
    return f"site {k}"
  return f"site {k} ({site_names[k]!r})"


def _check_site_ids(site_ids, num_sites: int):
  if site_ids is None:
    return jnp.arange(num_sites, dtype=jnp.int32)
  ids = np.asarray(site_ids)
  if ids.shape != (num_sites,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f"FederatedData: field 'site_ids' must be {num_sites} integers, got"
        f" {ids.dtype} {ids.shape}")
  if (ids < 0).any() or len(np.unique(ids)) != num_sites:
    raise ValueError(
        f"FederatedData: field 'site_ids' must be distinct non-negative ints, got"
        f" {ids.tolist()}")
  return jnp.asarray(ids, dtype=jnp.int32)


def _as_numpy(value, what: str) -> np.ndarray:
  try:
    return np.asarray(value)
  except Exception as err:  # pragma: no cover - exotic inputs
    raise ValueError(f"{what}: cannot convert to an array ({err})") from err


def _canonical_dtype(array: np.ndarray, field: str, where: str) -> np.ndarray:
  if array.dtype == np.bool_:
    return array.astype(np.float32) if field == "y" else array.astype(np.int32)
  if np.issubdtype(array.dtype, np.floating):
    return array.astype(np.float32)
  if np.issubdtype(array.dtype, np.integer):
    return array.astype(np.int32)
  raise ValueError(
      f"{where}: field {field!r} has dtype {array.dtype}; expected a numeric"
      " (float, int or bool) array")


def _check_finite(values: np.ndarray, where: str, field: str) -> None:
  if not np.issubdtype(values.dtype, np.floating):
    return
  bad = ~np.isfinite(values)
  if bad.any():
    row = int(np.argwhere(bad.reshape(bad.shape[0], -1).any(axis=1))[0, 0])
    kind = "NaN" if np.isnan(values).any() else "inf"
    raise ValueError(
        f"{where}: field {field!r} contains {kind} (first bad row {row});"
        " clean or impute the data before building FederatedData")


def _check_labels(y: np.ndarray, mask: np.ndarray, label_type: str | None,
                  site_names) -> None:
  """Checks that the real rows' labels fit `label_type`."""
  if label_type is None or label_type == "real":
    return
  for k in range(y.shape[0]):
    real = y[k][mask[k]]
    if real.size == 0:
      continue
    if label_type == "binary":
      bad = ~np.isin(real, (0, 1))
      expected = "labels in {0, 1}"
    else:  # multiclass
      bad = (real < 0) | (real != np.round(real))
      expected = "non-negative integer class labels"
    if bad.any():
      value = real[bad].ravel()[0]
      raise ValueError(
          f"{_name(site_names, k)}: field 'y' holds {value!r}; a {label_type}"
          f" loss needs {expected}")


@jax.tree_util.register_pytree_node_class
class FederatedData:
  """K sites' examples stacked and padded on a leading site axis.

  Attributes:
    x: features, `[K, N_max, *feature_shape]`; padded rows are zero.
    y: labels, `[K, N_max, *label_shape]`; padded rows are zero.
    mask: `[K, N_max]` bool, True on real rows.
    site_ids: `[K]` int32 site identities (randomness follows them).
    site_names: tuple of K names, or None.
    label_type: "binary", "multiclass", "real" or None (unchecked). Losses
      that need a label domain (e.g. binary cross-entropy) check it.

  Build it with `FederatedData.from_sites`. It is a pytree whose leaves are
  (x, y, mask, site_ids); names and label type are static metadata.
  """

  def __init__(self, x, y, mask, site_names: Sequence[str] | None = None,
               label_type: str | None = None, *, site_ids=None, validate: bool = True):
    self.x = x
    self.y = y
    self.mask = mask
    if site_ids is None:
      site_ids = jnp.arange(jnp.shape(mask)[0], dtype=jnp.int32)
    self.site_ids = site_ids
    self.site_names = None if site_names is None else tuple(
        str(s) for s in site_names)
    self.label_type = label_type
    if validate:
      self._validate()

  # -- construction ----------------------------------------------------------

  @classmethod
  def from_sites(cls, sites: Iterable[tuple[Any, Any]],
                 site_names: Sequence[str] | None = None, *,
                 label_type: str | None = None,
                 pad_to: int | None = None, site_ids=None) -> "FederatedData":
    """Stacks a list of per-site `(x_k, y_k)` arrays into padded arrays.

    Args:
      sites: K pairs `(x_k, y_k)`, `x_k` of shape `[n_k, *feature_shape]`
        (rank >= 2) and `y_k` of shape `[n_k, *label_shape]`. A site may be
        empty (n_k = 0), but not every site.
      site_names: optional K names (e.g. hospital names).
      label_type: optional label domain to check now: "binary" ({0, 1}),
        "multiclass" (non-negative integers) or "real".
      pad_to: optional N_max >= max n_k (default: max n_k).
      site_ids: optional K distinct non-negative ints identifying the sites
        (default 0..K-1); a site's random stream is derived from its id.

    Returns:
      FederatedData with `x [K, N_max, ...]`, `y [K, N_max, ...]`,
      `mask [K, N_max]`. Floats are stored as float32, integers as int32.

    Raises:
      ValueError naming the site index and the field on wrong ranks,
      mismatched feature or label shapes, x/y length mismatch, NaN or inf,
      labels outside `label_type`, or when every site is empty.
    """
    sites = list(sites)
    if not sites:
      raise ValueError("from_sites: got no sites; need at least one (x, y) pair")
    if site_names is not None:
      site_names = tuple(str(s) for s in site_names)
      if len(site_names) != len(sites):
        raise ValueError(
            f"from_sites: got {len(site_names)} site_names for {len(sites)} sites")
    if label_type is not None and label_type not in LABEL_TYPES:
      raise ValueError(
          f"from_sites: unknown label_type {label_type!r}; expected one of"
          f" {LABEL_TYPES} or None")
    xs, ys = [], []
    for k, site in enumerate(sites):
      where = _name(site_names, k)
      try:
        x_k, y_k = site
      except (TypeError, ValueError):
        raise ValueError(f"{where}: expected an (x, y) pair, got {type(site).__name__}")
      x_k = _as_numpy(x_k, f"{where} field 'x'")
      y_k = _as_numpy(y_k, f"{where} field 'y'")
      if x_k.ndim < 2:
        raise ValueError(
            f"{where}: field 'x' has rank {x_k.ndim} (shape {x_k.shape}); expected"
            " [n_k, *feature_shape] with rank >= 2 (use x[:, None] for a single"
            " feature)")
      if y_k.ndim < 1:
        raise ValueError(
            f"{where}: field 'y' has rank 0; expected [n_k, *label_shape]")
      if x_k.shape[0] != y_k.shape[0]:
        raise ValueError(
            f"{where}: field 'x' has {x_k.shape[0]} rows but field 'y' has"
            f" {y_k.shape[0]}")
      if xs and x_k.shape[1:] != xs[0].shape[1:]:
        raise ValueError(
            f"{where}: field 'x' has feature shape {x_k.shape[1:]}, but site 0"
            f" has {xs[0].shape[1:]}")
      if ys and y_k.shape[1:] != ys[0].shape[1:]:
        raise ValueError(
            f"{where}: field 'y' has label shape {y_k.shape[1:]}, but site 0"
            f" has {ys[0].shape[1:]}")
      x_k = _canonical_dtype(x_k, "x", where)
      y_k = _canonical_dtype(y_k, "y", where)
      _check_finite(x_k, where, "x")
      _check_finite(y_k, where, "y")
      xs.append(x_k)
      ys.append(y_k)
    sizes = [x.shape[0] for x in xs]
    if sum(sizes) == 0:
      raise ValueError("from_sites: every site is empty (all n_k = 0)")
    n_max = max(sizes)
    if pad_to is not None:
      if int(pad_to) < n_max:
        raise ValueError(f"from_sites: pad_to={pad_to} < largest site ({n_max} rows)")
      n_max = int(pad_to)
    x_dtype = np.result_type(*[x.dtype for x in xs])
    y_dtype = np.result_type(*[y.dtype for y in ys])
    x = np.zeros((len(xs), n_max) + xs[0].shape[1:], x_dtype)
    y = np.zeros((len(ys), n_max) + ys[0].shape[1:], y_dtype)
    mask = np.zeros((len(xs), n_max), bool)
    for k, (x_k, y_k) in enumerate(zip(xs, ys)):
      x[k, :sizes[k]] = x_k
      y[k, :sizes[k]] = y_k
      mask[k, :sizes[k]] = True
    _check_labels(y, mask, label_type, site_names)
    ids = _check_site_ids(site_ids, len(xs))
    return cls(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), site_names,
               label_type, site_ids=ids, validate=False)

  # -- validation ------------------------------------------------------------

  def _validate(self) -> None:
    """Checks shapes and values of concrete arrays (skipped under tracing)."""
    leaves = (self.x, self.y, self.mask, self.site_ids)
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
      return
    x, y, mask = (np.asarray(a) for a in leaves[:3])
    if mask.ndim != 2 or mask.dtype != np.bool_:
      raise ValueError(
          f"FederatedData: field 'mask' must be a bool [K, N_max] array, got"
          f" {mask.dtype} {mask.shape}")
    self.site_ids = _check_site_ids(self.site_ids, mask.shape[0])
    for field, a in (("x", x), ("y", y)):
      if a.ndim < 2 or a.shape[:2] != mask.shape:
        raise ValueError(
            f"FederatedData: field {field!r} has shape {a.shape}; its first two"
            f" axes must be [K, N_max] = {mask.shape}")
    if x.ndim < 3:
      raise ValueError(
          f"FederatedData: field 'x' has shape {x.shape}; expected"
          " [K, N_max, *feature_shape] (rank >= 3)")
    if self.site_names is not None and len(self.site_names) != mask.shape[0]:
      raise ValueError(
          f"FederatedData: {len(self.site_names)} site_names for"
          f" {mask.shape[0]} sites")
    if not mask.any():
      raise ValueError("FederatedData: every site is empty (all n_k = 0)")
    if self.label_type is not None and self.label_type not in LABEL_TYPES:
      raise ValueError(f"FederatedData: unknown label_type {self.label_type!r}")
    for k in range(mask.shape[0]):
      _check_finite(x[k], _name(self.site_names, k), "x")
      _check_finite(y[k], _name(self.site_names, k), "y")
    _check_labels(y, mask, self.label_type, self.site_names)

  # -- pytree ----------------------------------------------------------------

  def tree_flatten(self):
    return (self.x, self.y, self.mask, self.site_ids), (self.site_names, self.label_type)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = cls.__new__(cls)
    obj.x, obj.y, obj.mask, obj.site_ids = children
    obj.site_names, obj.label_type = aux
    return obj

  # -- views -----------------------------------------------------------------

  @property
  def num_sites(self) -> int:
    """K, the number of sites."""
    return self.mask.shape[0]

  @property
  def max_examples(self) -> int:
    """N_max, the padded length of every site."""
    return self.mask.shape[1]

  @property
  def num_examples(self) -> jax.Array:
    """n_k for every site, int32 `[K]`."""
    return jnp.sum(self.mask, axis=1, dtype=jnp.int32)

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[2:])

  @property
  def names(self) -> tuple[str, ...]:
    """Site names, or "site_k" when none were given."""
    if self.site_names is not None:
      return self.site_names
    return tuple(f"site_{k}" for k in range(self.num_sites))

  def site(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The real rows `(x_k [n_k, ...], y_k [n_k, ...])` of site k, as numpy."""
    return self.sites()[k]

  def sites(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """All K sites' real rows, as `from_sites` takes them (numpy, on host)."""
    x, y, mask = np.asarray(self.x), np.asarray(self.y), np.asarray(self.mask)
    return [(x[k][mask[k]], y[k][mask[k]]) for k in range(self.num_sites)]

  def replace(self, **fields) -> "FederatedData":
    """A copy with some of x, y, mask, site_names, label_type replaced."""
    values = dict(x=self.x, y=self.y, mask=self.mask, site_names=self.site_names,
                  label_type=self.label_type, site_ids=self.site_ids)
    unknown = set(fields) - set(values)
    if unknown:
      raise ValueError(f"FederatedData.replace: unknown fields {sorted(unknown)}")
    values.update(fields)
    return FederatedData(**values)

  def pad_to(self, n_max: int) -> "FederatedData":
    """The same sites padded to a longer N_max (padded rows change nothing)."""
    return FederatedData.from_sites(self.sites(), self.site_names,
                                    label_type=self.label_type, pad_to=n_max,
                                    site_ids=self.site_ids)

  def subset(self, indices: Sequence[int]) -> "FederatedData":
    """Sites `indices`, in that order (a permutation, a cohort, one site).

    Sites keep their ids, hence their random streams.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= self.num_sites:
      raise ValueError(
          f"FederatedData.subset: indices {idx.tolist()} out of range for"
          f" {self.num_sites} sites")
    names = None if self.site_names is None else [self.site_names[i] for i in idx]
    return FederatedData(self.x[idx], self.y[idx], self.mask[idx], names,
                         self.label_type, site_ids=self.site_ids[idx])

  def single_site(self, site: int | str) -> "FederatedData":
    """Site `site` (an index 0..K-1 or one of `names`) alone, K = 1, keeping its id
    (hence its random streams): what one node of a deployment holds."""
    names = self.names
    index = names.index(site) if isinstance(site, str) and site in names else site
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
        0 <= index < self.num_sites):
      raise ValueError(f"FederatedData.single_site: site must be 0-{self.num_sites - 1} or"
                       f" one of {list(names)}, got {site!r}")
    return self.subset([int(index)])

  def pooled(self, name: str = "pooled") -> "FederatedData":
    """All real rows of all sites as one site (K = 1), in site order."""
    xs, ys = zip(*self.sites())
    return FederatedData.from_sites(
        [(np.concatenate(xs), np.concatenate(ys))], [name],
        label_type=self.label_type)

  def __repr__(self) -> str:
    n = np.asarray(self.num_examples).tolist()
    return (f"FederatedData(K={self.num_sites}, N_max={self.max_examples},"
            f" n_k={n}, feature_shape={self.feature_shape},"
            f" label_shape={tuple(self.y.shape[2:])}, sites={list(self.names)})")


__all__ = ["FederatedData", "LABEL_TYPES"]
