"""Robust aggregation: links and reducers that one broken or malicious site cannot wreck.

All are pieces of the core aggregation chain (`fedjax_med.core.aggregation`),
composed with `fm.aggregators.chain(...)`; they run inside the jit-compiled
round. Updates are stacked `[C, ...]` (C = the round's cohort), weights `[C]`.

Client transforms (before the reduction):

* `reject_nonfinite()`: a site whose update has any NaN or inf entry is
  dropped: its weight becomes 0 and its update 0 (so that 0 * NaN never
  reaches a sum). The reducer then renormalises the weights over the rest
  (`weighted_mean` divides by the sum of the remaining weights). The round
  metrics count the rejected sites ("num_rejected").
* `norm_bound(max_norm)`: u_k <- u_k * min(1, M / ||u_k||_2) (Sun et al. 2019,
  "Can you really backdoor federated learning?"). Put it after
  `reject_nonfinite` (the norm of a NaN update is NaN).
* `inject_faults({position: fault})`: test fixture that corrupts chosen sites'
  updates ("nan", "inf", "sign_flip", or a float scale such as 1000.0).

Reducers (the last link):

* `coordinate_median()`: per coordinate, the median over the sites with
  weight > 0 (Yin et al., ICML 2018, "Byzantine-robust distributed learning").
* `trimmed_mean(trim_fraction)`: per coordinate, drop the b = floor(beta m)
  largest and b smallest of the m sites with weight > 0 and average the rest
  (Yin et al. 2018).

NaN entries in the reducers: a NaN is a missing value at its coordinate, as a
site with weight 0 is everywhere: m counts, per coordinate, the sites with
weight > 0 whose entry is not NaN, and a coordinate with m = 0 gets 0 (no
update). So one NaN site changes neither reducer beyond removing its vote, and
the padding used inside the jit (NaN for the median, +inf for the sort of the
trimmed mean) is never returned. To drop a faulty site whole and count it, put
`reject_nonfinite()` first. `norm_bound` is not NaN-safe by itself (the norm of
a NaN or inf update is NaN or inf, and its clipped update NaN).

Both reducers are unweighted (each site counts once whatever n_k): they
estimate a robust centre of the site updates, not the n_k-weighted mean of
F(w) = sum_k (n_k/n) F_k(w); with heterogeneous sites this is a bias traded
for robustness.

Threat model: up to a minority of sites send arbitrary updates (Byzantine);
the server is honest. The median tolerates fewer than half of the
participating sites being faulty; the trimmed mean fewer than beta m per side.
None of this is a privacy mechanism.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fedjax_med.core.aggregation import Aggregator, ClientTransform
from fedjax_med.core.options import OptionError
from fedjax_med.core.tree import tree_l2_norm

FAULTS = ("nan", "inf", "sign_flip")


def _rows(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """Broadcast a `[C]` mask against a `[C, ...]` leaf."""
  return mask.reshape((-1,) + (1,) * (leaf.ndim - 1))


def site_norms(updates: Any) -> jax.Array:
  """||u_k||_2 over all leaves, `[C]`."""
  return jax.vmap(tree_l2_norm)(updates)


def site_finite(updates: Any) -> jax.Array:
  """`[C]` bool: every entry of u_k is finite."""
  leaves = jax.tree_util.tree_leaves(updates)
  ok = jnp.ones(leaves[0].shape[0], bool)
  for leaf in leaves:
    ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
  return ok


def _no_state(update_template, num_sites=None):
  del update_template, num_sites
  return ()


def reject_nonfinite() -> ClientTransform:
  """Drops sites whose update has a NaN or inf: weight 0, update zeroed.

  Metrics: num_rejected (sites dropped this round, int32), rejected [C] bool.
  """

  def apply(updates, weights, state, key, context):
    del key, context
    ok = site_finite(updates)
    updates = jax.tree_util.tree_map(
        lambda u: jnp.where(_rows(ok, u), u, jnp.zeros((), u.dtype)), updates)
    weights = jnp.where(ok, weights, 0.0)
    return updates, weights, state, {"num_rejected": jnp.sum(~ok, dtype=jnp.int32),
                                     "rejected": ~ok}

  return ClientTransform(_no_state, apply)


def _check_positive(name: str, field: str, value: Any) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: {field} must be a number > 0, got {value!r}") from None
  if not v > 0.0 or math.isinf(v):
    raise OptionError(f"{name}: {field} must be a finite number > 0, got {value!r}")
  return v


def clip_to_norm(updates: Any, max_norm: jax.Array) -> tuple[Any, jax.Array]:
  """u_k * M / max(||u_k||, M) for every site; returns (clipped, norms [C]).

  An update with ||u_k|| <= M is returned exactly unchanged.
  """
  norms = site_norms(updates)
  factor = max_norm / jnp.maximum(norms, max_norm)
  clipped = jax.tree_util.tree_map(lambda u: u * _rows(factor, u).astype(u.dtype), updates)
  return clipped, norms


def norm_bound(max_norm: float, name: str = "norm_bound", *, hparam: str = "max_norm",
               metric: str = "num_norm_bounded", as_fraction: bool = False) -> ClientTransform:
  """Clips every site's update to L2 norm <= M (the norm over the whole pytree).

  u_k <- u_k * M / max(||u_k||, M) (`clip_to_norm`). This is the one clipping
  link of fedjax_med: robust aggregation uses it as is, site-level DP as
  `privacy.clip_updates` (hparam "clip_norm", metric "dp_clipped_fraction").

  Args:
    max_norm: M > 0.
    name: the name in error messages.
    hparam: the key of M in the link's state ({hparam: float32}), traced:
      change it with `fm.set_hyperparams(state, aggregator={hparam: ...})`.
    metric: the name of the round metric: the number of participating
      sites (weight > 0) that were scaled down, or with `as_fraction` their
      share of the participating sites (0 when none participates).
  """
  m = _check_positive(name, hparam, max_norm)

  def init(update_template, num_sites=None):
    del update_template, num_sites
    return {hparam: jnp.asarray(m, jnp.float32)}

  def apply(updates, weights, state, key, context):
    del key, context
    clipped, norms = clip_to_norm(updates, state[hparam])
    active = weights > 0
    bounded = (norms > state[hparam]) & active
    if as_fraction:
      value = (jnp.sum(bounded) / jnp.maximum(jnp.sum(active), 1)).astype(jnp.float32)
    else:
      value = jnp.sum(bounded, dtype=jnp.int32)
    return clipped, weights, state, {metric: value}

  return ClientTransform(init, apply)


def inject_faults(faults: Mapping[int, Any]) -> ClientTransform:
  """Corrupts the updates of chosen sites (for robustness tests and demos).

  Args:
    faults: {site position among the K sites: fault}, fault one of "nan"
      (every entry NaN), "inf" (+inf), "sign_flip" (-u_k), or a number s
      (s * u_k, e.g. 1000.0).
  """
  table = {}
  for pos, fault in dict(faults).items():
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
      raise OptionError(f"inject_faults: site positions must be ints >= 0, got {pos!r}")
    if isinstance(fault, str):
      if fault not in FAULTS:
        raise OptionError(f"inject_faults: unknown fault {fault!r} for site {pos};"
                          f" expected one of {FAULTS} or a number")
      table[pos] = fault
    else:
      try:
        table[pos] = float(fault)
      except (TypeError, ValueError):
        raise OptionError(f"inject_faults: fault for site {pos} must be one of {FAULTS}"
                          f" or a number, got {fault!r}") from None

  def apply(updates, weights, state, key, context):
    del key
    positions = context.positions

    def corrupt(u):
      out = u
      for pos, fault in table.items():
        hit = _rows(positions == pos, u)
        if fault == "nan":
          bad = jnp.full_like(u, jnp.nan)
        elif fault == "inf":
          bad = jnp.full_like(u, jnp.inf)
        elif fault == "sign_flip":
          bad = -u
        else:
          bad = u * jnp.asarray(fault, u.dtype)
        out = jnp.where(hit, bad, out)
      return out

    return jax.tree_util.tree_map(corrupt, updates), weights, state, {}

  return ClientTransform(_no_state, apply)


def _usable(u: jax.Array, valid: jax.Array) -> jax.Array:
  """`[C, ...]` bool: site c has weight > 0 and its entry is not NaN."""
  return _rows(valid, u) & ~jnp.isnan(u)


def _masked_median(u: jax.Array, valid: jax.Array) -> jax.Array:
  usable = _usable(u, valid)
  values = jnp.where(usable, u, jnp.nan)   # nanmedian skips the NaN padding
  med = jnp.nanmedian(values, axis=0)
  return jnp.where(jnp.any(usable, axis=0), med, jnp.zeros_like(med)).astype(u.dtype)


def coordinate_median() -> Aggregator:
  """Coordinate-wise median over the sites with weight > 0 (unweighted).

  Per coordinate j, over the m_j usable values (sites with weight > 0 whose
  entry j is not NaN): the median (the mean of the two middle values when m_j
  is even); 0 where m_j = 0 (no update there). A NaN entry is a missing value
  at that coordinate, not a vote (use `reject_nonfinite` first to drop a site
  with any NaN or inf entry entirely and count it). +-inf entries are values
  like any other (a minority of them cannot move the median).

  Args:
    (none) updates `[C, ...]`, weights `[C]` (only w > 0 matters).

  Returns:
    An Aggregator; metrics num_aggregated (sites with weight > 0, int32).
  """

  def aggregate(updates, weights, state, key, context):
    del key, context
    valid = weights > 0
    return (jax.tree_util.tree_map(lambda u: _masked_median(u, valid), updates), state,
            {"num_aggregated": jnp.sum(valid, dtype=jnp.int32)})

  return Aggregator(_no_state, aggregate)


def _trimmed(u: jax.Array, valid: jax.Array, trim_fraction: float) -> jax.Array:
  c = u.shape[0]
  usable = _usable(u, valid)
  m = jnp.sum(usable, axis=0, dtype=jnp.int32)                       # [...] per coordinate
  # b = floor(beta m) for every possible m = 0..C, in Python float64 (static table).
  b = jnp.asarray([math.floor(trim_fraction * k) for k in range(c + 1)], jnp.int32)[m]
  # Padding (weight 0 or NaN) sorts after every real value, +inf included; the kept
  # ranks [b, m - b) are real values only, so the padding never enters the sum.
  sorted_u = jnp.sort(jnp.where(usable, u, jnp.inf), axis=0)
  rank = jnp.arange(c, dtype=jnp.int32).reshape((-1,) + (1,) * (u.ndim - 1))
  keep = (rank >= b) & (rank < m - b)
  total = jnp.sum(jnp.where(keep, sorted_u, jnp.zeros((), u.dtype)), axis=0)
  kept = jnp.maximum(m - 2 * b, 1).astype(u.dtype)
  return jnp.where(m > 0, total / kept, jnp.zeros((), u.dtype)).astype(u.dtype)


def trimmed_mean(trim_fraction: float) -> Aggregator:
  """Coordinate-wise beta-trimmed mean over the sites with weight > 0 (unweighted).

  Per coordinate j: sort the m_j usable values (sites with weight > 0 whose
  entry j is not NaN), drop the b_j = floor(beta m_j) smallest and b_j largest,
  average the m_j - 2 b_j >= 1 left (Yin et al. 2018); 0 where m_j = 0 (no
  update there). beta in [0, 0.5); beta = 0 is the unweighted mean of the
  usable values. A NaN entry is a missing value at that coordinate (it is not
  counted in m_j and never reaches the sum); use `reject_nonfinite` first to
  drop a site with any NaN or inf entry entirely and count it. +-inf entries
  are values: trimmed when beyond the b_j kept per side, otherwise they make
  the mean +-inf (or NaN for +inf and -inf together), as the formula says.

  Args:
    trim_fraction: beta, a float in [0, 0.5).

  Returns:
    An Aggregator on updates `[C, ...]`, weights `[C]` (only w > 0 matters);
    metrics num_aggregated (sites with weight > 0, int32).
  """
  try:
    beta = float(trim_fraction)
  except (TypeError, ValueError):
    raise OptionError(f"trimmed_mean: trim_fraction must be a number in [0, 0.5), got"
                      f" {trim_fraction!r}") from None
  if not 0.0 <= beta < 0.5:
    raise OptionError(f"trimmed_mean: trim_fraction must be in [0, 0.5), got {trim_fraction!r}")

  def aggregate(updates, weights, state, key, context):
    del key, context
    valid = weights > 0
    return (jax.tree_util.tree_map(lambda u: _trimmed(u, valid, beta), updates), state,
            {"num_aggregated": jnp.sum(valid, dtype=jnp.int32)})

  return Aggregator(_no_state, aggregate)


__all__ = ["FAULTS", "site_norms", "site_finite", "reject_nonfinite", "clip_to_norm",
           "norm_bound", "inject_faults", "coordinate_median", "trimmed_mean"]
